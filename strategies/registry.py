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
from strategies.clipping import (
    NormClip,
    check_clip_avg,
    check_clip_avg_iqr,
    clip_avg,
    clip_avg_iqr,
)
from strategies.fl_defender import FLDefender
from strategies.flame import Flame
from strategies.fltrust import check_fltrust, fltrust
from strategies.foolsgold import FoolsGold
from strategies.mean import weighted_mean
from strategies.outliers import check_iqr, check_rfout_1d, iqr_filter, rfout_1d
from strategies.robust import (
    bulyan,
    check_bulyan,
    check_krum,
    check_multi_krum,
    check_trimmed_mean,
    coordinate_median,
    krum,
    multi_krum,
    trimmed_mean,
)
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


def _stateful(cls: Callable[..., Aggregator]) -> Factory:
    """factory(ctx, **hp) -> cls(ctx, **hp); unknown hp names raise ConfigError (the class's
    __init__ checks the values and raises ConfigError itself)."""

    def factory(ctx: AggregatorContext, **hp: Any) -> Aggregator:
        try:
            inspect.signature(cls).bind(ctx, **hp)
        except TypeError as exc:
            raise ConfigError(f"federated.aggregator.params: {exc}") from None
        return cls(ctx, **hp)

    factory.__doc__ = cls.__doc__
    return factory


AGGREGATORS: dict[str, Factory] = {
    "fedavg": _pure(weighted_mean),
    "krum": _pure(krum, check_krum),
    "multi-krum": _pure(multi_krum, check_multi_krum),
    "median": _pure(coordinate_median),
    "trimmed-mean": _pure(trimmed_mean, check_trimmed_mean),
    "bulyan": _pure(bulyan, check_bulyan),
    "foolsgold": _stateful(FoolsGold),
    "fl-defender": _stateful(FLDefender),
    "fltrust": _pure(fltrust, check_fltrust),
    "norm-clip": _stateful(NormClip),
    "rfout-1d": _pure(rfout_1d, check_rfout_1d),
    "iqr-filter": _pure(iqr_filter, check_iqr("iqr-filter")),
    "clip-avg": _pure(clip_avg, check_clip_avg),
    "clip-avg-iqr": _pure(clip_avg_iqr, check_clip_avg_iqr),
    "flame": _stateful(Flame),
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
