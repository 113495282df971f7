"""Detection as a ranking: how well a rule's per-client suspicion singles out the true attackers.

Every rule reports a suspicion score per client and round (`strategies.types.Aggregate.suspicion`,
higher = more suspicious, in the rule's own units). Only the order within a round is meaningful
(a Krum score and a cosine live on different scales, and one rule's scale drifts as training
converges), so every metric here compares clients of the same round only:

- `roc_auc`: the per-round ROC AUC, i.e. the Mann-Whitney probability that a random attacker of the
  round is more suspicious than a random honest client of the same round (ties count 1/2). None
  when the round's sample holds no attacker or no honest client.
- `pooled_auc`: the same probability over every (attacker, honest) pair that shared a round, i.e.
  the per-round AUCs weighted by their number of pairs (Hanley and McNeil 1982 for the AUC as a
  Mann-Whitney statistic).
- `rounds_to_detect`: the first round in which each attacker was *detected*: ranked among the m
  most suspicious clients of its round, m = the number of attackers in that round's sample. Ties
  count against detection: the attacker is detected only if at most m clients (itself included)
  have a suspicion >= its own, so a rule that scores everyone alike detects nobody. Dropping a
  client is not detection here: Krum drops all but one client every round, honest ones included.
- `false_alarm_rate`: on rounds whose sample holds no attacker, the share of the honest clients
  that the rule acted against (dropped or clipped). A ranking alone has no threshold, so rules
  that never drop or clip (coordinate-wise median, trimmed mean, RFOut) have None.
- `roc_curve`: the curve drawn in the report, over within-round rank percentiles (0 = least, 1 =
  most suspicious of its round; ties share their mid-rank), pooled over rounds.

NaN suspicions (a rule that could not score a client) are left out of every metric.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class RoundEvidence:
    """One round as the evaluation sees it: who took part, the rule's suspicion of each and whom it
    acted against (None when the rule does not drop or clip)."""

    server_round: int
    clients: tuple[int, ...]
    suspicion: Mapping[int, float] | None
    flagged: frozenset[int] | None


def _scored(suspicion: Mapping[int, float]) -> dict[int, float]:
    return {c: float(s) for c, s in suspicion.items() if s is not None and not math.isnan(float(s))}


def _pairs(scores: Sequence[float], labels: Sequence[bool]) -> tuple[float, int]:
    """(correctly ordered pairs, ties counted 1/2; number of pairs) over (positive, negative) pairs."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    wins = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg)
    return float(wins), len(pos) * len(neg)


def roc_auc(scores: Sequence[float], labels: Sequence[bool]) -> float | None:
    """ROC AUC of `scores` (higher = positive) against `labels`; ties 1/2; None without both classes."""
    if len(scores) != len(labels):
        raise ValueError(f"{len(scores)} scores but {len(labels)} labels")
    wins, pairs = _pairs(scores, labels)
    return wins / pairs if pairs else None


def round_auc(suspicion: Mapping[int, float], malicious: Iterable[int]) -> float | None:
    """The round's AUC: suspicion {client: score} against the ground truth `malicious`."""
    bad = set(malicious)
    scored = _scored(suspicion)
    return roc_auc(list(scored.values()), [c in bad for c in scored])


def pooled_auc(rounds: Iterable[RoundEvidence], malicious: Iterable[int]) -> float | None:
    """The AUC over every within-round (attacker, honest) pair of every round; None without any pair."""
    bad = set(malicious)
    wins, pairs = 0.0, 0
    for r in rounds:
        if r.suspicion is None:
            continue
        scored = _scored(r.suspicion)
        w, p = _pairs(list(scored.values()), [c in bad for c in scored])
        wins, pairs = wins + w, pairs + p
    return wins / pairs if pairs else None


def detected(suspicion: Mapping[int, float], malicious: Iterable[int]) -> set[int]:
    """The attackers of the round ranked among its m most suspicious clients (m = attackers in the
    round), ties counted against detection (see the module docstring)."""
    scored = _scored(suspicion)
    bad = set(malicious) & set(scored)
    m = len(bad)
    return {c for c in bad if sum(s >= scored[c] for s in scored.values()) <= m}


def rounds_to_detect(rounds: Iterable[RoundEvidence], malicious: Iterable[int]) -> dict[int, int | None]:
    """{attacker: the first round it was detected, or None}, for every attacker in `malicious`."""
    first: dict[int, int | None] = dict.fromkeys(sorted(set(malicious)))
    for r in sorted(rounds, key=lambda e: e.server_round):
        if r.suspicion is None:
            continue
        for c in detected(r.suspicion, first):
            if first[c] is None:
                first[c] = r.server_round
    return first


def false_alarm_rate(rounds: Iterable[RoundEvidence], malicious: Iterable[int]) -> float | None:
    """Share of honest clients flagged on rounds with no attacker in the sample; None without such a
    round where the rule's flags are known."""
    bad = set(malicious)
    alarms, honest = 0, 0
    for r in rounds:
        if r.flagged is None or bad & set(r.clients):
            continue
        honest += len(r.clients)
        alarms += len(r.flagged & set(r.clients))
    return alarms / honest if honest else None


def percentiles(suspicion: Mapping[int, float]) -> dict[int, float]:
    """{client: within-round rank percentile in [0, 1]}, ties sharing their mid-rank; 0.5 for one client."""
    scored = _scored(suspicion)
    n = len(scored)
    if n < 2:
        return dict.fromkeys(scored, 0.5)
    values = list(scored.values())
    return {c: (sum(v < s for v in values) + 0.5 * (sum(v == s for v in values) - 1)) / (n - 1)
            for c, s in scored.items()}


def roc_points(rounds: Iterable[RoundEvidence], malicious: Iterable[int]) -> list[tuple[float, bool]]:
    """(within-round percentile, is attacker) of every scored client of every round with both classes."""
    bad = set(malicious)
    points: list[tuple[float, bool]] = []
    for r in rounds:
        if r.suspicion is None:
            continue
        pct = percentiles(r.suspicion)
        if {c in bad for c in pct} == {True, False}:
            points += [(p, c in bad) for c, p in pct.items()]
    return points


def roc_from_points(points: Sequence[tuple[float, bool]]) -> tuple[list[float], list[float]] | None:
    """(false-positive rates, true-positive rates) from (0, 0) to (1, 1), one step per distinct
    score; None without both classes."""
    pos = sum(y for _, y in points)
    neg = len(points) - pos
    if not pos or not neg:
        return None
    fpr, tpr = [0.0], [0.0]
    tp = fp = 0
    for threshold in sorted({p for p, _ in points}, reverse=True):
        tp += sum(1 for p, y in points if p == threshold and y)
        fp += sum(1 for p, y in points if p == threshold and not y)
        fpr.append(fp / neg)
        tpr.append(tp / pos)
    return fpr, tpr


def roc_curve(rounds: Iterable[RoundEvidence], malicious: Iterable[int]) -> tuple[list[float], list[float]] | None:
    """The ROC curve over the pooled within-round percentiles; None without a round with both classes."""
    return roc_from_points(roc_points(rounds, malicious))


def evidence_of(row: Mapping[str, Any]) -> RoundEvidence | None:
    """A metrics.jsonl line (as written: string keys, a NaN score as null) as `RoundEvidence`; None
    for a line without a `detection` block (round 0, a skipped round, a run from before issue 18)."""
    det = row.get("detection")
    if not isinstance(det, Mapping):
        return None
    scores = det.get("scores")
    marks = [row.get("dropped"), row.get("clipped")]
    return RoundEvidence(
        server_round=int(row["round"]),
        clients=tuple(int(c) for c in row.get("clients") or ()),
        suspicion=None if not isinstance(scores, Mapping) else
        {int(c): math.nan if v is None else float(v) for c, v in scores.items()},
        flagged=None if marks == [None, None] else frozenset(int(c) for m in marks for c in m or ()),
    )
