"""Validation of an experiment's values (their types are already right): every impossible value,
as 'key.path: reason' strings, so one message lists all of them."""

from __future__ import annotations

import math
import re

from lab.backdoor_validation import backdoor_problems
from lab.schema import UPDATE_MATRIX_ATTACKS, DatasetConfig, ExperimentConfig

NUM_CLASSES = {"digits": 10, "mnist": 10, "fashion-mnist": 10, "emnist-digits": 10, "cifar10": 10}
CHANNELS = {"digits": 1, "mnist": 1, "fashion-mnist": 1, "emnist-digits": 1, "cifar10": 3}
# The side of the images without dataset.image_size: digits (8x8) are upsampled to 28 (lab/data.py).
NATIVE_SIZE = {"digits": 28, "mnist": 28, "fashion-mnist": 28, "emnist-digits": 28, "cifar10": 32}
# The smallest image side a model takes: below it the last max-pool has no pixel left (lab/models.py).
MIN_SIDE = {"fltrust-cnn": 10, "lenet": 16}
# numpy's generators take seeds >= 0 and datasets' shuffles seeds < 2**32; torch takes both.
SEED_MAX = 2**32 - 1
# A run folder's name: one plain path component (never `.`, `..`, absolute or nested), printable,
# not starting with '.', '-' or a space.
PLAIN_NAME = re.compile(r"[^\s/\\.-][^/\\]{0,127}")


def image_shape(d: DatasetConfig) -> tuple[int, int, int]:
    """(channels, height, width) of the images the models, triggers and attacks see."""
    side = d.image_size or NATIVE_SIZE[d.name]
    return CHANNELS[d.name], side, side


def validate(cfg: ExperimentConfig) -> list[str]:
    """Every impossible value in `cfg`, as 'key.path: reason' strings."""
    p: list[str] = []
    d, f, t, a, c = cfg.dataset, cfg.federated, cfg.training, cfg.attack, cfg.capture

    def need(ok: bool, key: str, why: str) -> None:
        if not ok:
            p.append(f"{key}: {why}")

    need(PLAIN_NAME.fullmatch(cfg.name) is not None and cfg.name.isprintable(), "name",
         f"{cfg.name!r} is not a plain name: it names the run folder (no '/' or '\\', no leading '.', '-' "
         "or space, at most 128 characters)")
    classes = NUM_CLASSES[d.name]
    need(0 < d.test_fraction < 1, "dataset.test_fraction", "must be in (0, 1)")
    need(0 <= d.server_fraction < 1, "dataset.server_fraction", "must be in [0, 1)")
    need(0 <= d.target_class < classes, "dataset.target_class", f"must be in [0, {classes})")
    if d.source_class is not None:
        need(0 <= d.source_class < classes, "dataset.source_class", f"must be in [0, {classes}) or null")
        need(d.source_class != d.target_class, "dataset.source_class", "must differ from target_class")
    if d.image_size is not None:
        need(8 <= d.image_size <= 256, "dataset.image_size", "must be in [8, 256]")

    need(f.num_clients >= 1, "federated.num_clients", "must be >= 1")
    need(0 < f.fraction <= 1, "federated.fraction", "must be in (0, 1]")
    if f.clients_per_round is not None:
        need(1 <= f.clients_per_round <= f.num_clients, "federated.clients_per_round",
             f"must be in [1, num_clients={f.num_clients}]")
    # Below ~0.01 flwr-datasets' self-balancing divides by zero and dumps whole classes on one client.
    need(f.dirichlet_alpha >= 0.01, "federated.dirichlet_alpha", "must be >= 0.01")
    need(f.server_lr > 0, "federated.server_lr", "must be > 0")
    p.extend(_federation_problems(cfg))

    need(t.rounds >= 1, "training.rounds", "must be >= 1")
    need(t.local_epochs >= 1, "training.local_epochs", "must be >= 1")
    if t.local_steps is not None:
        need(t.local_steps >= 1, "training.local_steps", "must be >= 1")
    need(t.batch_size >= 1, "training.batch_size", "must be >= 1")
    need(t.lr > 0, "training.lr", "must be > 0")
    need(0 <= t.momentum < 1, "training.momentum", "must be in [0, 1)")
    need(t.weight_decay >= 0, "training.weight_decay", "must be >= 0")
    need(0 <= t.seed <= SEED_MAX, "training.seed", f"must be in [0, {SEED_MAX}]")
    need(t.eval_every >= 1, "training.eval_every", "must be >= 1 (a round count)")
    need(t.model != "resnet18" or d.name == "cifar10" or (d.image_size or 0) >= 32,
         "training.model", "resnet18 expects 32x32 inputs (cifar10, or set dataset.image_size: 32)")
    if t.model in MIN_SIDE and (d.image_size is None or 8 <= d.image_size <= 256):
        side = image_shape(d)[1]
        need(side >= MIN_SIDE[t.model], "training.model",
             f"{t.model} needs images of at least {MIN_SIDE[t.model]}x{MIN_SIDE[t.model]}, "
             f"{d.name} is {side}x{side} here (see dataset.image_size)")

    for i, r in enumerate(a.ratios):
        key = "attack.attackers_ratio" + (f"[{i}]" if isinstance(a.attackers_ratio, tuple) else "")
        need(0 <= r <= 1, key, "must be in [0, 1] (a share of num_clients, not a count)")
        if 0 < r <= 1:
            need(round(r * f.num_clients) >= 1, key,
                 f"{r} of {f.num_clients} clients rounds to zero attackers")
    if a.type != "none":
        need(any(r > 0 for r in a.ratios), "attack.attackers_ratio",
             f"attack.type={a.type!r} needs attackers_ratio > 0 (or set type: none)")
    need(0 <= a.malicious_behavior_rate <= 1, "attack.malicious_behavior_rate", "must be in [0, 1]")
    need(a.start_round >= 1, "attack.start_round", "must be >= 1")
    if a.end_round is not None:
        need(a.end_round >= a.start_round, "attack.end_round", "must be >= start_round")
    need(0 < a.poison_ratio <= 1, "attack.poison_ratio", "must be in (0, 1]")
    p.extend(_byzantine_problems(cfg))
    p.extend(backdoor_problems(cfg))
    need(a.boost == "auto" or (isinstance(a.boost, float) and a.boost > 0), "attack.boost",
         "must be > 0 or 'auto'")
    if a.norm_bound is not None:
        need(a.norm_bound > 0, "attack.norm_bound", "must be > 0")
    need(a.noise_std > 0, "attack.noise_std", "must be > 0")
    need(a.trigger.size >= 1, "attack.trigger.size", "must be >= 1")
    need(a.trigger.margin >= 0, "attack.trigger.margin", "must be >= 0")
    side, margin = image_shape(d)[1], max(a.trigger.margin, 0)
    if (d.image_size is None or 8 <= d.image_size <= 256) and a.trigger.size >= 1:
        need(a.trigger.size + margin <= side, "attack.trigger.size",
             f"a {a.trigger.size}-pixel trigger with margin {margin} does not fit the {side}x{side} "
             f"images of {d.name} (size + margin must be <= {side}; see dataset.image_size)")
    need(0 <= a.trigger.value <= 1, "attack.trigger.value", "must be in [0, 1]")

    # A disabled capture's rounds are not checked: `--set training.rounds=10` on a config that
    # captures round 40 with capture off must run.
    for i, r in enumerate(c.rounds if c.enabled else ()):
        need(1 <= r <= t.rounds, f"capture.rounds[{i}]", f"round {r} is outside 1..{t.rounds}")
    if isinstance(c.clients, tuple):
        for i, pid in enumerate(c.clients):
            need(0 <= pid < f.num_clients, f"capture.clients[{i}]", f"no partition {pid}")
    need(c.max_bytes > 0, "capture.max_bytes", "must be > 0")
    need(c.top_k >= 1, "capture.top_k", "must be >= 1")
    if c.enabled:
        need(bool(c.rounds), "capture.rounds", "capture is enabled but no rounds are listed")
    if c.probe is not None:
        need(c.probe.local_steps >= 1, "capture.probe.local_steps", "must be >= 1")
        need(c.probe.batch_size >= 1, "capture.probe.batch_size", "must be >= 1")
        need(c.probe.lr > 0, "capture.probe.lr", "must be > 0")
        if c.probe.model_round is not None:
            need(c.probe.model_round >= 1, "capture.probe.model_round", "must be >= 1 (a training round)")
            earlier = [r for r in c.rounds if r < c.probe.model_round] if c.enabled else []
            need(not earlier, "capture.probe.model_round",
                 f"round {c.probe.model_round}'s model cannot be sent in capture round(s) {earlier} before it")

    u = cfg.unlearning
    need(u.steps >= 1, "unlearning.steps", "must be >= 1")
    need(0 <= u.mix_ratio <= 1, "unlearning.mix_ratio", "must be in [0, 1]")
    need(cfg.execution.num_threads >= 1, "execution.num_threads", "must be >= 1")
    need(cfg.execution.client_cpus > 0, "execution.client_cpus", "must be > 0")
    need(cfg.execution.workers is None or cfg.execution.workers >= 1, "execution.workers", "must be >= 1")
    need(cfg.execution.checkpoint_every >= 1, "execution.checkpoint_every", "must be >= 1 (a round count)")
    return p


def _federation_problems(cfg: ExperimentConfig) -> list[str]:
    """The partitioning, per-round sampling and FedAvg divisor keys (lab.schema.FederatedConfig)."""
    f, a = cfg.federated, cfg.attack
    p: list[str] = []
    classes = NUM_CLASSES[cfg.dataset.name]
    if not 0 <= f.bias_h <= 1:
        p.append("federated.bias_h: must be in [0, 1] (the share of a label that stays with its group)")
    if f.partitioning == "bias" and f.num_clients < classes:
        p.append(f"federated.num_clients: the bias partitioning needs at least one client per class "
                 f"({classes} groups), got {f.num_clients}")
    if f.fedavg_divisor == "total" and f.aggregator.name != "fedavg":
        p.append(f"federated.fedavg_divisor: 'total' changes FedAvg's mean only; the rule is "
                 f"{f.aggregator.name!r} (use 'sampled')")
    k = f.attackers_per_round
    if k is None:
        return p
    size = f.round_size
    if k < 0 or k > size:
        p.append(f"federated.attackers_per_round: must be in [0, clients_per_round={size}], got {k}")
        return p
    for i, r in enumerate(a.ratios):
        where = f" (attack.attackers_ratio[{i}]={r})" if isinstance(a.attackers_ratio, tuple) else ""
        bad = 0 if a.type == "none" else int(round(r * f.num_clients))
        if k > bad:
            p.append(f"federated.attackers_per_round: {k} attackers per round, but only {bad} malicious "
                     f"clients{where}" + (" (attack.type is none)" if a.type == "none" else ""))
        elif size - k > f.num_clients - bad:
            p.append(f"federated.attackers_per_round: leaves {size - k} honest places per round, but only "
                     f"{f.num_clients - bad} honest clients{where}")
    return p


def _byzantine_problems(cfg: ExperimentConfig) -> list[str]:
    """The attack types' own settings: knowledge (threat model), scaling, the update-matrix attacks'
    parameters and the round sizes their formulas need (worst case: every attacker in one round)."""
    a, f = cfg.attack, cfg.federated
    p: list[str] = []
    matrix = a.type in UPDATE_MATRIX_ATTACKS
    if a.knowledge == "full" and a.type != "none" and not matrix:
        p.append(f"attack.knowledge: 'full' is for the update-matrix attacks "
                 f"({', '.join(sorted(UPDATE_MATRIX_ATTACKS))}); {a.type} uses only the attacker's own data "
                 "or update (use auto or partial)")
    if a.knowledge == "partial" and matrix and a.type != "ipm":
        p.append(f"attack.knowledge: partial {a.type} needs the spread of several honest updates, and an attacker "
                 "in the ClientApp knows one, its own (use full: simulation only)")
    if matrix and (a.boost != 1.0 or a.norm_bound is not None):
        p.append(f"attack.boost: {a.type} crafts the whole update; boost and norm_bound apply to the data and "
                 "own-update attacks only (leave boost at 1, norm_bound null)")
    if a.type == "scaling" and a.boost != 1.0:
        p.append("attack.boost: scaling already multiplies the update by the round size / server lr "
                 "(boost auto); leave boost at 1, or use type backdoor with a boost")
    if a.alie_z is not None and not math.isfinite(a.alie_z):
        p.append("attack.alie_z: must be finite (or null: the paper's z_max)")
    if not (math.isfinite(a.ipm_epsilon) and a.ipm_epsilon > 0):
        p.append("attack.ipm_epsilon: must be > 0")
    if not (math.isfinite(a.minmax_gamma_init) and a.minmax_gamma_init > 0):
        p.append("attack.minmax_gamma_init: must be > 0")
    n = f.round_size
    for r in a.ratios if a.resolved_knowledge == "full" else ():
        c = min(int(round(r * f.num_clients)), n)  # attackers in a round, at worst
        if a.type == "alie" and a.alie_z is None and c > n // 2:
            p.append(f"attack.type: alie's z_max needs the attackers to be at most half of the round "
                     f"({c} of {n} clients per round may attack); set attack.alie_z")
        if a.type == "krum-attack" and n <= 2 * c + 2:
            p.append(f"attack.type: krum-attack needs n > 2c + 2 clients per round (Fang et al.), got n={n}, "
                     f"c={c} at worst")
    return p
