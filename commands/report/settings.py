"""The report's federation-settings table: the settings papers differ in (partitioning, clients
and attackers per round, FedAvg's divisor, server learning rate, local work, evaluation cadence),
from summary.json's `settings` (server/recorder.py), else from config.yaml for older runs."""

from __future__ import annotations

from collections import Counter
from typing import Any

from commands.report.blocks import Block, Para, Table
from commands.report.collection import Collection, Run
from lab.config import load_experiment
from lab.errors import ConfigError

# summary.json's `settings` (server/recorder.py), in this order; the partitioning's own parameter
# (bias_h or dirichlet_alpha) only where that partitioning is used.
SETTING_KEYS = ("dataset.name", "training.model", "federated.num_clients", "federated.partitioning",
                "federated.bias_h", "federated.dirichlet_alpha", "federated.dirichlet_balance",
                "federated.clients_per_round",
                "federated.attackers_per_round", "federated.fedavg_divisor", "federated.fedavg_total_weight",
                "federated.server_lr", "training.local_steps", "training.local_epochs", "training.batch_size",
                "training.lr", "training.eval_every", "execution.clients_per_message")
SETTING_COLUMNS = 6  # runs side by side; more (a sweep) get one column of the values and their counts


def settings_of(run: Run) -> tuple[dict[str, Any], bool]:
    """The run's federation settings, and whether summary.json recorded them (else derived from
    config.yaml, for runs made before summary.json had `settings`)."""
    recorded = run.summary.get("settings")
    if isinstance(recorded, dict):
        return recorded, True
    try:
        return load_experiment(run.config).settings(), False
    except ConfigError:  # a config.yaml this version no longer reads: nothing to show
        return {}, False


def settings_section(col: Collection) -> list[Block]:
    """One row per setting; one column per run, or the values with their counts for many runs."""
    found = [(r, *settings_of(r)) for r in col.runs]
    keys = [k for k in SETTING_KEYS if any(k in s for _, s, _ in found)]
    if not keys:
        return [Para("No federation settings recorded (no summary.json `settings`, no config.yaml keys).")]

    def show(v: Any) -> str:
        return "null" if v is None else str(v)

    rows: list[tuple[str, ...]] = []
    if len(found) <= SETTING_COLUMNS:
        head: tuple[str, ...] = ("setting", *(r.label or r.rule for r, _, _ in found))
        rows = [(k, *(show(s[k]) if k in s else "-" for _, s, _ in found)) for k in keys]
    else:
        head = ("setting", f"values over {len(found)} runs (count)")
        for k in keys:
            counts = Counter(show(s[k]) for _, s, _ in found if k in s)
            rows.append((k, ", ".join(f"{v} ({n})" for v, n in counts.items())))
    blocks: list[Block] = [Table(head, tuple(rows))]
    note = ("Client sampling is seeded per round from training.seed (runs since summary.json `settings`); "
            "attackers_per_round null = attackers "
            "drawn like everyone else. eval_every N: central evaluation every N rounds, always round 0 and "
            "the last.")
    derived = [r.label or r.rule for r, _, recorded in found if not recorded]
    if derived:
        note += f" Derived from config.yaml (summary.json has no `settings`): {', '.join(derived)}."
    blocks.append(Para(note))
    return blocks
