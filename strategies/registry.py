"""Aggregation rules by the name used in the YAML (`federated.aggregator.name`).

A factory takes the server's `AggregatorContext` and the rule's hyperparameters and returns an
`Aggregator`. Bad names, unknown hyperparameters and impossible settings (e.g. Krum with
n <= 2f + 2) fail here, at config time, never mid-run.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from functools import partial
from typing import Any

from lab.coerce import convert
from lab.config import ExperimentConfig
from lab.errors import ConfigError
from strategies.centered_clipping import CenteredClipping
from strategies.clipping import (
    NormClip,
    check_clip_avg,
    check_clip_avg_iqr,
    clip_avg,
    clip_avg_iqr,
)
from strategies.deepsight import DeepSight
from strategies.fl_defender import FLDefender
from strategies.flame import Flame
from strategies.fldetector import FLDetector
from strategies.fltrust import check_fltrust, fltrust
from strategies.foolsgold import FoolsGold
from strategies.freqfed import FreqFed
from strategies.geometric_median import check_geometric_median, geometric_median
from strategies.mean import weighted_mean, weighted_sum_over_total
from strategies.multi_metrics import check_multi_metrics, multi_metrics
from strategies.outliers import check_iqr, check_rfout_1d, iqr_filter, rfout_1d
from strategies.pre_aggregation import (
    PRE_AGGREGATORS,
    Bucketing,
    Preaggregated,
    PreAggregator,
    StatefulPreaggregated,
    pre_spec,
)
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
from strategies.sign_vote import check_robust_learning_rate, robust_learning_rate
from strategies.signguard import SignGuard
from strategies.spectral import DivideAndConquer
from strategies.types import Aggregate, Aggregator, AggregatorContext, Checkpointable

Factory = Callable[..., Aggregator]
PARAMS = "federated.aggregator.params"
# Rules whose state is keyed by client id: behind bucketing their rows are buckets, not clients.
PER_CLIENT_HISTORY = frozenset({"foolsgold", "fl-defender", "fldetector"})


def hyperparameter_problems(target: Callable[..., Any], hp: Mapping[Any, Any], skip: int) -> list[str]:
    """Every hyperparameter of `hp` that `target` (a rule function or class) cannot take, checked
    against its signature: unknown or missing names, and values that are not of the annotated type
    (a float must be finite, a bool a bool, a Literal one of its values), with key paths."""
    sig = inspect.signature(target)
    accepted = {n: p for n, p in list(sig.parameters.items())[skip:]
                if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    hints = typing.get_type_hints(target.__init__ if isinstance(target, type) else target)
    problems = []
    for name, value in hp.items():
        if not isinstance(name, str) or name not in accepted:
            problems.append(f"{PARAMS}: unexpected keyword {name!r}; known: {', '.join(accepted) or 'none'}")
            continue
        found: list[str] = []
        if hints.get(name, Any) is not Any:
            convert(hints[name], value, f"{PARAMS}.{name}", found)
        problems += found
    problems += [f"{PARAMS}.{n}: required, and not set" for n, p in accepted.items()
                 if p.default is p.empty and n not in hp]
    return problems


def _pure(fn: Callable[..., Aggregate], check: Callable[..., None] | None = None) -> Factory:
    """factory(ctx, **hp) -> fn with hp bound; bad hyperparameters and `check` failures raise ConfigError."""

    def factory(ctx: AggregatorContext, **hp: Any) -> Aggregator:
        problems = hyperparameter_problems(fn, hp, skip=2)
        if problems:
            raise ConfigError(problems)
        if check is not None:
            check(ctx, **hp)
        return partial(fn, **hp)

    factory.__doc__ = fn.__doc__
    return factory


def _stateful(cls: Callable[..., Aggregator]) -> Factory:
    """factory(ctx, **hp) -> cls(ctx, **hp); bad hyperparameters raise ConfigError (the class's
    __init__ checks the values and raises ConfigError itself)."""

    def factory(ctx: AggregatorContext, **hp: Any) -> Aggregator:
        problems = hyperparameter_problems(cls, hp, skip=1)
        if problems:
            raise ConfigError(problems)
        return cls(ctx, **hp)

    factory.__doc__ = cls.__doc__
    return factory


def _fedavg(ctx: AggregatorContext, **hp: Any) -> Aggregator:
    """FedAvg (`weighted_mean`); with `federated.fedavg_divisor: total` (`ctx.all_examples` set) the
    weighted sum is divided by the weight of all clients (`weighted_sum_over_total`)."""
    rule = _pure(weighted_mean)(ctx, **hp)  # checks the hyperparameters
    if ctx.all_examples is None:
        return rule
    weighted = bool(hp.get("weighted", True))
    total = float(sum(ctx.all_examples)) if weighted else float(len(ctx.all_examples))
    return partial(weighted_sum_over_total, total_weight=total, weighted=weighted)


AGGREGATORS: dict[str, Factory] = {
    "fedavg": _fedavg,
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
    "geomed": _pure(geometric_median, check_geometric_median),
    "centered-clipping": _stateful(CenteredClipping),
    "rlr": _pure(robust_learning_rate, check_robust_learning_rate),
    "dnc": _stateful(DivideAndConquer),
    "signguard": _stateful(SignGuard),
    "freqfed": _stateful(FreqFed),
    "fldetector": _stateful(FLDetector),
    "deepsight": _stateful(DeepSight),
    "multi-metrics": _pure(multi_metrics, check_multi_metrics),
}


def build_aggregator(name: str, params: Mapping[Any, Any], ctx: AggregatorContext,
                     pre: Sequence[Any] = ()) -> Aggregator:
    """The rule `name` with `params`, behind the pre-aggregators `pre` (names or {name, params}
    entries, `federated.aggregator.pre`), checked at build time.

    Raises:
        ConfigError: an unknown rule or pre-aggregator, bad hyperparameters (every one, with its key
            path) or a build-time check (e.g. Krum's n > 2f + 2, NNM's f < n/2), judged on the rows
            the rule sees after the pre-aggregators.
    """
    unknown = unknown_rule(name)
    if unknown:
        raise ConfigError(unknown)
    steps, stage = build_pre(pre, ctx)
    if steps and ctx.all_examples is not None:
        raise ConfigError("federated.fedavg_divisor: 'total' divides client sums; behind "
                          "federated.aggregator.pre the rows are mixtures (use 'sampled')")
    if name in PER_CLIENT_HISTORY and any(isinstance(step, Bucketing) for step in steps):
        raise ConfigError(f"federated.aggregator.pre: {name} keeps per-client histories; "
                          "bucketing's rows are not clients (use nnm, or no pre)")
    bad = [k for k in params if not isinstance(k, str)]
    if bad:  # not even a keyword: the factories below could not be called with them
        raise ConfigError(f"{PARAMS}: {', '.join(map(repr, bad))} is not a hyperparameter name")
    try:
        rule = AGGREGATORS[name](stage, **params)
    except ConfigError as exc:
        if not steps:
            raise
        raise ConfigError([f"{p} (the rule sees {stage.clients_per_round} rows after federated.aggregator.pre)"
                           for p in exc.problems]) from None
    if not steps:
        return rule
    return (StatefulPreaggregated if isinstance(rule, Checkpointable) else Preaggregated)(steps, rule)


def build_pre(pre: Sequence[Any], ctx: AggregatorContext) -> tuple[list[PreAggregator], AggregatorContext]:
    """The pre-aggregators of `pre`, in order, and the context the rule after them is built with
    (clients_per_round = the rows left). Every problem names its `federated.aggregator.pre[i]` key."""
    steps: list[PreAggregator] = []
    stage = ctx
    for i, item in enumerate(pre):
        key = f"federated.aggregator.pre[{i}]"
        pname, pparams = pre_spec(item)
        if pname not in PRE_AGGREGATORS:
            raise ConfigError(f"{key}.name: unknown pre-aggregator {pname!r}; known: {', '.join(sorted(PRE_AGGREGATORS))}")
        cls = PRE_AGGREGATORS[pname]
        problems = [p.replace(PARAMS, f"{key}.params", 1) for p in hyperparameter_problems(cls, pparams, skip=1)]
        if problems:
            raise ConfigError(problems)
        try:
            step = cls(stage, **pparams)
        except ConfigError as exc:
            raise ConfigError([f"{key}: {p}" for p in exc.problems]) from None
        steps.append(step)
        stage = replace(stage, clients_per_round=step.rows_out(stage.clients_per_round))
    return steps, stage


def unknown_rule(name: str) -> str | None:
    """The problem with a rule name that is not in the registry, or None."""
    if name in AGGREGATORS:
        return None
    return f"federated.aggregator.name: unknown rule {name!r}; known: {', '.join(sorted(AGGREGATORS))}"


def check_config(cfg: ExperimentConfig, ctx: AggregatorContext) -> list[str]:
    """Problems building the configured rule, as config-error strings with key paths (empty when fine)."""
    try:
        build_aggregator(cfg.federated.aggregator.name, dict(cfg.federated.aggregator.params), ctx,
                         pre=cfg.federated.aggregator.pre)
    except ConfigError as exc:
        return [p if p.startswith("federated.") else f"{PARAMS}: {p}" for p in exc.problems]
    return []
