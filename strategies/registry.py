"""Aggregation rules by the name used in the YAML (`federated.aggregator.name`).

A factory takes the server's `AggregatorContext` and the rule's hyperparameters and returns an
`Aggregator`. Bad names, unknown hyperparameters and impossible settings (e.g. Krum with
n <= 2f + 2) fail here, at config time, never mid-run.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import partial
from typing import Any

from lab.config import ExperimentConfig
from lab.errors import ConfigError
from strategies.mean import weighted_mean
from strategies.types import Aggregate, Aggregator, AggregatorContext

Factory = Callable[..., Aggregator]


def _pure(fn: Callable[..., Aggregate], check: Callable[..., None] | None = None) -> Factory:
    """factory(ctx, **hp) -> fn with hp bound; unknown hp names and `check` failures raise ConfigError."""

    def factory(ctx: AggregatorContext, **hp: Any) -> Aggregator:
        try:
            inspect.signature(fn).bind(None, None, **hp)
        except TypeError as exc:
            raise ConfigError(f"federated.aggregator.params: {exc}") from None
        if check is not None:
            check(ctx, **hp)
        return partial(fn, **hp)

    factory.__doc__ = fn.__doc__
    return factory


AGGREGATORS: dict[str, Factory] = {
    "fedavg": _pure(weighted_mean),
}


def build_aggregator(name: str, params: dict[str, Any], ctx: AggregatorContext) -> Aggregator:
    if name not in AGGREGATORS:
        raise ConfigError(f"federated.aggregator.name: unknown rule {name!r}; known: {', '.join(sorted(AGGREGATORS))}")
    return AGGREGATORS[name](ctx, **params)


def check_config(cfg: ExperimentConfig, ctx: AggregatorContext) -> list[str]:
    """Problems building the configured rule, as config-error strings (empty when fine)."""
    try:
        build_aggregator(cfg.federated.aggregator.name, dict(cfg.federated.aggregator.params), ctx)
    except ConfigError as exc:
        return exc.problems
    return []
