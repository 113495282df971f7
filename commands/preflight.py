"""Config-time checks that need the model and the rule registry, before any Flower process starts."""

from __future__ import annotations

from lab.config import ExperimentConfig
from lab.errors import ConfigError


def preflight(cfg: ExperimentConfig) -> None:
    """Config-time checks that need the model and the rule registry (before any process starts)."""
    # Imported here, not at the top: they bring torch, which `fl-lab --help` does not need.
    from lab.data import load_data
    from lab.records import ParamLayout
    from lab.task import build_for, state_of
    from strategies import registry, types

    data = load_data(cfg.dataset, cfg.seed)
    layout = ParamLayout.of(state_of(build_for(cfg, data)))
    ctx = types.AggregatorContext(layout=layout, clients_per_round=cfg.federated.round_size, seed=cfg.seed)
    problems = registry.check_config(cfg, ctx)
    if problems:
        raise ConfigError(problems)
