"""Every existing rule reports a per-client suspicion that ranks an obvious attacker first."""

from __future__ import annotations

import pytest
import torch

from lab.records import ParamLayout
from strategies.mean import distances_to
from strategies.registry import build_aggregator
from strategies.types import AggregatorContext, RoundInfo

N, D = 12, 40
OUTLIER = 7  # not the first or last row: a rule that ranked by row order would fail

# The rules of the registry before issue 18, with settings valid for 12 clients. New rules test
# their own suspicion.
RULES: dict[str, dict[str, object]] = {
    "fedavg": {},
    "krum": {"num_byzantine": 2},
    "multi-krum": {"num_byzantine": 2},
    "median": {},
    "trimmed-mean": {"beta": 0.2},
    "bulyan": {"num_byzantine": 2},
    "bulyan-recursive": {"num_byzantine": 2, "selection": "recursive"},
    "fl-defender": {},
    "fltrust": {},
    "norm-clip": {"max_norm": 1.0},
    "rfout-1d": {},
    "rfout-1d-mad": {"method": "mad"},
    "iqr-filter": {},
    "iqr-filter-both": {"sides": "both"},
    "clip-avg": {},
    "clip-avg-iqr": {},
    "flame": {"noise": "none"},
}


def matrix(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(updates (N, D), the honest direction (D,)): honest rows near one direction, row OUTLIER
    a large update the opposite way."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(D, generator=g)
    updates = base + 0.1 * torch.randn(N, D, generator=g)
    updates[OUTLIER] = -5.0 * base
    return updates, base


def run(name: str, updates: torch.Tensor, reference: torch.Tensor | None = None, server_round: int = 1):
    rule = name.split("-mad")[0].removesuffix("-recursive").removesuffix("-both")
    n, d = updates.shape
    ctx = AggregatorContext(layout=ParamLayout.of({"w": torch.zeros(d)}), clients_per_round=n,
                            output_slice=slice(0, d))
    agg = build_aggregator(rule, RULES.get(name, {}), ctx)
    info = RoundInfo(server_round=server_round, client_ids=tuple(range(n)), num_examples=torch.ones(n),
                     global_params=torch.zeros(d),
                     reference_update=None if reference is None else (lambda: reference))
    return agg(updates, info)


@pytest.mark.parametrize("name", sorted(RULES))
@pytest.mark.parametrize("seed", [0, 1])
def test_rule_ranks_the_outlier_first(name: str, seed: int) -> None:
    updates, base = matrix(seed)
    out = run(name, updates, reference=base)
    s = out.suspicion
    assert s is not None, f"{name} sets no suspicion"
    assert s.shape == (N,)
    assert bool(torch.isfinite(s).all())
    order = torch.argsort(s, descending=True)
    assert int(order[0]) == OUTLIER
    assert float(s[OUTLIER]) > float(s[order[1]])  # strictly first, not tied


@pytest.mark.parametrize("seed", [0, 1])
def test_foolsgold_ranks_sybils_first(seed: int) -> None:
    """FoolsGold's threat model: Sybils look alike. Honest clients point in random directions (non-IID);
    rows 3 and 8 are the same update: they are the two most suspicious."""
    g = torch.Generator().manual_seed(seed)
    updates = torch.randn(N, D, generator=g)
    updates[8] = updates[3]
    s = run("foolsgold", updates).suspicion
    assert s is not None and s.shape == (N,)
    assert set(torch.argsort(s, descending=True)[:2].tolist()) == {3, 8}


def test_foolsgold_suspicion_orders_as_one_minus_weight() -> None:
    updates = torch.randn(N, D, generator=torch.Generator().manual_seed(3))
    updates[1] = updates[0] * 2
    out = run("foolsgold", updates)
    assert out.suspicion is not None and out.scores is not None
    # a higher suspicion never comes with a higher weight
    for i in range(N):
        for j in range(N):
            if out.suspicion[i] > out.suspicion[j]:
                assert out.scores[i] <= out.scores[j]


def test_fl_defender_history_makes_a_repeat_offender_more_suspicious() -> None:
    updates, _ = matrix()
    ctx = AggregatorContext(layout=ParamLayout.of({"w": torch.zeros(D)}), clients_per_round=N)
    rule = build_aggregator("fl-defender", {}, ctx)
    for r in (1, 2):
        out = rule(updates, RoundInfo(server_round=r, client_ids=tuple(range(N)), num_examples=torch.ones(N)))
    assert out.suspicion is not None and out.scores is not None
    assert int(torch.argmax(out.suspicion)) == OUTLIER
    assert float(out.suspicion.min()) == 0.0  # the most trusted client is the zero point


def test_fedavg_suspicion_is_the_update_norm_and_reuses_what_the_server_measured() -> None:
    from strategies.mean import weighted_mean, weighted_sum_over_total
    from strategies.types import IngestedRows

    updates, _ = matrix()
    info = RoundInfo(server_round=1, client_ids=tuple(range(N)), num_examples=torch.ones(N))
    for out in (weighted_mean(updates, info), weighted_sum_over_total(updates, info, total_weight=3.0 * N)):
        assert out.suspicion is not None and int(torch.argmax(out.suspicion)) == OUTLIER
        torch.testing.assert_close(out.suspicion, updates.double().norm(dim=1))
    # The server's own numbers (taken during ingest) are used for exactly these rows, never others.
    marked = IngestedRows(updates, torch.arange(N, dtype=torch.float64), updates.sum(dim=0) * 0 + 7.0)
    seen = RoundInfo(server_round=1, client_ids=tuple(range(N)), num_examples=torch.ones(N), ingested=marked)
    out = weighted_mean(updates, seen)
    assert out.suspicion is not None and out.suspicion.tolist() == list(range(N))
    assert torch.equal(out.update, torch.full_like(out.update, 7.0 / N))
    other = weighted_mean(updates.clone(), seen)  # another tensor: computed, not taken
    torch.testing.assert_close(other.update, updates.mean(dim=0))
    assert weighted_mean(updates, seen, weighted=False).update.allclose(updates.mean(dim=0))


def test_distances_to_matches_the_naive_norm_across_chunks() -> None:
    g = torch.Generator().manual_seed(0)
    u, c = torch.randn(5, 70_000, generator=g), torch.randn(70_000, generator=g)  # > 2 chunks
    naive = (u.double() - c.double()).norm(dim=1)
    torch.testing.assert_close(distances_to(u, c), naive, rtol=1e-6, atol=1e-6)


def test_rfout_tie_break_never_outranks_a_replaced_coordinate() -> None:
    """The count of replaced coordinates decides; the z-score part stays below one coordinate."""
    g = torch.Generator().manual_seed(0)
    updates = torch.randn(N, D, generator=g)
    updates[2, 0] = 100.0  # one replaced coordinate
    updates[5] *= 2.9  # large z-scores everywhere, but (at threshold 3) possibly none replaced
    out = run("rfout-1d", updates)
    assert out.suspicion is not None and out.scores is not None
    count = out.scores.double() * D
    for i in range(N):
        assert count[i].round() <= out.suspicion[i] < count[i].round() + 1
