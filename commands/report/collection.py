"""Reading the run folders a report is about (a run, a demo folder, a sweep folder), and the
machine it runs on."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lab.artifacts import read_jsonl
from lab.errors import LabError
from lab.task import usable_cores


@dataclass
class Run:
    """One run folder, read back."""

    path: Path
    label: str
    config: dict[str, Any]
    config_text: str
    summary: dict[str, Any]
    rounds: list[dict[str, Any]]  # metrics.jsonl without round 0
    role: str | None = None
    floor: float | None = None

    @property
    def rule(self) -> str:
        return str(self.summary.get("strategy") or self.config.get("federated", {}).get("aggregator", {}).get("name"))

    @property
    def attack(self) -> dict[str, Any]:
        return dict(self.config.get("attack") or {})

    @property
    def attacked(self) -> bool:
        return self.attack.get("type", "none") != "none"

    @property
    def attack_label(self) -> str:
        a = self.attack
        if not self.attacked:
            return "no attack"
        text = str(a.get("type"))
        if a.get("boost") not in (None, 1, 1.0):
            text += f", boost {a['boost']}"
        if a.get("norm_bound") is not None:
            text += f", norm bound {a['norm_bound']}"
        return text


@dataclass
class Collection:
    folder: Path
    runs: list[Run]
    kind: str  # "run" | "runs" | "sweep"
    demo: dict[str, Any] = field(default_factory=dict)

    @property
    def primary(self) -> Run:
        """The run the offline tools worked on (inversion / unlearning), else the first."""
        for r in self.runs:
            if (r.path / "inversion").is_dir() or (r.path / "unlearning").is_dir():
                return r
        return self.runs[0]

    def role(self, name: str) -> Run | None:
        return next((r for r in self.runs if r.role == name), None)




def _read_run(path: Path, label: str, role: str | None = None) -> Run:
    text = (path / "config.yaml").read_text()
    summary_path = path / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    rounds = [r for r in read_jsonl(path / "metrics.jsonl") if r.get("round", 0) > 0]
    return Run(path, label, yaml.safe_load(text) or {}, text, summary, rounds, role)


def _is_run(path: Path) -> bool:
    return (path / "config.yaml").is_file() and (path / "metrics.jsonl").is_file()


def collect(folder: Path) -> Collection:
    """The runs of a run folder, a demo folder or a sweep folder.

    Raises:
        LabError: no run found under `folder`.
    """
    if _is_run(folder):
        run = _read_run(folder, "")
        run.label = run.rule
        col = Collection(folder, [run], "run")
    else:
        demo = json.loads((folder / "demo.json").read_text()) if (folder / "demo.json").exists() else {}
        if demo:
            runs = [_read_run(folder / r["dir"], r["label"], r["role"]) for r in demo["runs"] if _is_run(folder / r["dir"])]
        else:
            found = sorted(p.parent for p in folder.glob("**/metrics.jsonl")
                           if not any(part.startswith(".") for part in p.relative_to(folder).parts)
                           and _is_run(p.parent))
            runs = [_read_run(p, p.relative_to(folder).as_posix()) for p in found]
        if not runs:
            raise LabError(f"{folder}: no run folder (config.yaml + metrics.jsonl) here or below")
        sweep = (folder / "results.csv").exists() or (folder / "runs").is_dir()
        col = Collection(folder, runs, "sweep" if sweep and not demo else "runs", demo)
    _fill_floors(col.runs)
    return col


def _fill_floors(runs: list[Run]) -> None:
    """ASR floor per run: summary.json's, else the no-attack run of the same rule (and seed), else FedAvg's."""
    clean: dict[tuple[str, Any], float] = {}
    for r in runs:
        if not r.attacked and r.summary.get("final_asr") is not None:
            clean.setdefault((r.rule, r.config.get("training", {}).get("seed")), r.summary["final_asr"])
    any_clean = next(iter(clean.values()), None)
    for r in runs:
        seed = r.config.get("training", {}).get("seed")
        r.floor = r.summary.get("asr_floor")
        if r.floor is None:
            r.floor = clean.get((r.rule, seed), clean.get(("fedavg", seed), any_clean))




def environment() -> dict[str, Any]:
    """Versions and hardware of this machine (the one that ran the demo, or that wrote this report)."""
    def version(pkg: str) -> str:
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    cpu = platform.processor() or "unknown"
    mem = None
    try:
        info = Path("/proc/cpuinfo").read_text()
        cpu = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), cpu)
        kb = next(int(ln.split()[1]) for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal"))
        mem = round(kb / 2**20, 1)
    except (OSError, StopIteration, ValueError):
        pass
    return {"python": platform.python_version(), "torch": version("torch"), "flwr": version("flwr"),
            "numpy": version("numpy"), "matplotlib": version("matplotlib"), "platform": platform.platform(),
            "cpu": cpu, "cpu_cores": os.cpu_count(), "usable_cores": usable_cores(), "memory_gib": mem}


def flat_config(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as {"section.key": value} (an empty section stays one key)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flat_config(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
