"""Config-time checks, before any Flower process starts: every problem of an experiment at once.

`check_experiment` is what `fl-lab run --check` runs, and what `fl-lab run` runs first: the file's
own problems (`lab.config.review_experiment`: YAML, types, values, the trigger's fit) and the rule's
build-time checks (`strategies.registry.check_config`: unknown rule, hyperparameter types, Krum's
n > 2f + 2, ...), gathered into one ConfigError. The kernel (lab/) cannot import the rules, so the
two halves meet here. `run_dir_problem` checks a run folder the same way: the lab writes into, and
cleans, only folders it created (RUN_MARKER) or empty ones.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lab.config import ExperimentConfig, review_experiment
from lab.errors import ConfigError
from lab.runfolder import RUN_MARKER

if TYPE_CHECKING:
    from lab.records import ParamLayout

# What a rule's build-time check reads. When one of these could not be read, or is impossible,
# the check would judge a stand-in (a default, a guess), not what the user wrote: it waits.
RULE_INPUTS = ("federated.num_clients", "federated.clients_per_round", "federated.fraction", "federated.aggregator",
               "training.model", "dataset.name", "dataset.image_size")


def check_experiment(source: str | Path | Mapping[str, Any], overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Load and check everything that can be checked without data or processes.

    Raises:
        ConfigError: every problem of the file, its overrides and the rule, each with its key path.
    """
    review = review_experiment(source, overrides)
    problems = list(review.problems)
    if review.cfg is not None and not review.touches(RULE_INPUTS):
        problems += rule_problems(review.cfg)
    elif review.cfg is not None and not review.touches(["federated.aggregator.name"]):
        from strategies.registry import (
            unknown_rule,  # the name, at least, is what the user wrote
        )

        problems += [p for p in [unknown_rule(review.cfg.federated.aggregator.name)] if p]
    if problems or review.cfg is None:
        raise ConfigError(problems)
    return review.cfg


def rule_problems(cfg: ExperimentConfig) -> list[str]:
    """The rule's build-time problems (empty when it builds), for the model the experiment trains.

    The model is built on torch's meta device: its layout (what FLAME reads) without memory or data.
    """
    from strategies import (  # brings torch, which `fl-lab --help` does not need
        registry,
        types,
    )

    layout = model_layout(cfg)
    ctx = types.AggregatorContext(layout=layout, clients_per_round=cfg.federated.round_size, seed=cfg.seed)
    return registry.check_config(cfg, ctx)


def model_layout(cfg: ExperimentConfig) -> ParamLayout:
    """The layout of the model the experiment trains, built on torch's meta device (no memory, no data)."""
    # Imported here, not at the top: they bring torch, which `fl-lab --help` does not need.
    import torch

    from lab.models import build_model
    from lab.records import ParamLayout
    from lab.validation import NUM_CLASSES, image_shape

    shape = image_shape(cfg.dataset)
    with torch.device("meta"):
        model = build_model(cfg.training.model, shape, NUM_CLASSES[cfg.dataset.name], (0.0,) * shape[0],
                            (1.0,) * shape[0])
    return ParamLayout.of(model.state_dict())


def model_bytes(cfg: ExperimentConfig) -> int:
    """Bytes of the model's named tensors: what one client's reply carries."""
    return sum(e.numel * e.dtype.itemsize for e in model_layout(cfg).entries)


def preflight(cfg: ExperimentConfig) -> None:
    """The rule's build-time checks and the dataset, for an already loaded experiment.

    Raises:
        ConfigError: the rule cannot be built as configured.
        DataError: the dataset cannot be found or read.
    """
    problems = rule_problems(cfg)
    if problems:
        raise ConfigError(problems)
    load_dataset(cfg)


def load_dataset(cfg: ExperimentConfig) -> None:
    """Load the experiment's data once here, so a missing dataset fails before Flower starts.

    Raises:
        DataError: the dataset cannot be found or read.
    """
    from lab.data import load_data

    load_data(cfg.dataset, cfg.seed)


def run_dir_problem(out_dir: Path) -> str | None:
    """Why `out_dir` cannot hold a new run, or None: it must not exist yet, be empty, or be one of
    the lab's own run folders (it holds RUN_MARKER). Nothing is created or changed."""
    try:
        out_dir = out_dir.resolve()
        if (out_dir / RUN_MARKER).is_file():
            return None
        if out_dir.exists():
            if not out_dir.is_dir():
                return f"run folder {out_dir}: exists and is not a folder"
            if any(out_dir.iterdir()):
                return (f"run folder {out_dir}: not empty and not an fl-lab run folder (it has no {RUN_MARKER}); "
                        f"the lab reuses only folders it created: choose another --out or name, or an empty "
                        f"folder (an earlier lab run folder: `touch {out_dir / RUN_MARKER}` to adopt it)")
            return None
        above = next(p for p in out_dir.parents if p.exists())
        if not above.is_dir():
            return f"run folder {out_dir}: {above} is not a folder"
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop
        return f"run folder {out_dir}: cannot be used ({getattr(exc, 'strerror', None) or exc})"
    return None


# Written into every folder of runs the lab creates (a sweep, a card); only such a folder is reused.
COLLECTION_MARKER = ".fl-lab-collection"
# What a sweep, a card or `fl-lab report` writes there: a folder holding nothing else is an older
# one of the lab's own (made before the marker) and is adopted.
COLLECTION_ENTRIES = {"runs", "logs", "plots", ".flwr", "results.csv", "results.md", "reproduction.json",
                      "reproduction.md", "report.md", "report.html", COLLECTION_MARKER}


def collection_dir_problem(out_dir: Path) -> str | None:
    """Why `out_dir` cannot hold a sweep's or a card's runs and tables, or None: it must not exist
    yet, be empty, be marked as the lab's, or hold only what the lab writes there (results.md and
    the rest would otherwise overwrite a user's files of the same name: `--out .` in a project)."""
    try:
        out_dir = out_dir.resolve()
        if (out_dir / COLLECTION_MARKER).is_file() or not out_dir.exists():
            return None
        if not out_dir.is_dir():
            return f"output folder {out_dir}: exists and is not a folder"
        names = sorted(p.name for p in out_dir.iterdir())
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop
        return f"output folder {out_dir}: cannot be used ({getattr(exc, 'strerror', None) or exc})"
    foreign = [n for n in names if n not in COLLECTION_ENTRIES]
    if not names or (not foreign and (out_dir / "runs").is_dir()):
        return None
    foreign = foreign or names  # only names the lab writes, but no runs/: results.md alone may be the user's own
    shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
    return (f"output folder {out_dir}: holds files the lab did not write ({shown}); results.md, plots/ "
            f"and the rest would land beside them: choose a new or empty --out (an earlier lab folder: "
            f"`touch {out_dir / COLLECTION_MARKER}` to adopt it)")


def claim_collection_dir(out_dir: Path) -> None:
    """Mark `out_dir` (checked by `collection_dir_problem`) as the lab's."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / COLLECTION_MARKER).touch()
