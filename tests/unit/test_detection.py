"""Detection as a ranking (`lab.detection`): hand-checked AUCs, rounds to detection, false alarms,
the ROC curve, and an oracle against scikit-learn's roc_auc_score."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import roc_auc_score

from lab.cost import measured
from lab.detection import (
    RoundEvidence,
    detected,
    false_alarm_rate,
    percentiles,
    pooled_auc,
    roc_auc,
    roc_curve,
    round_auc,
    rounds_to_detect,
)


def test_auc_hand_cases() -> None:
    labels = [True, True, False, False]
    assert roc_auc([4.0, 3.0, 2.0, 1.0], labels) == 1.0  # perfect ranking
    assert roc_auc([1.0, 2.0, 3.0, 4.0], labels) == 0.0  # reversed
    assert roc_auc([5.0, 5.0, 5.0, 5.0], labels) == 0.5  # all tied
    # 1 attacker above one of two honest clients, tied with the other: (1 + 0.5) / 2
    assert roc_auc([2.0, 2.0, 1.0], [True, False, False]) == 0.75


def test_auc_is_none_without_both_classes() -> None:
    assert roc_auc([1.0, 2.0], [True, True]) is None
    assert roc_auc([1.0, 2.0], [False, False]) is None
    assert round_auc({1: 0.3, 2: 0.1}, malicious=[]) is None
    assert round_auc({1: 0.3, 2: 0.1}, malicious=[1]) == 1.0


def test_auc_rejects_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="2 scores but 3 labels"):
        roc_auc([1.0, 2.0], [True, False, False])


def test_nan_scores_are_left_out() -> None:
    assert round_auc({1: math.nan, 2: 0.5, 3: 0.1}, malicious=[1, 2]) == 1.0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.booleans()), min_size=2, max_size=12))
def test_auc_matches_sklearn(points: list[tuple[int, bool]]) -> None:
    scores, labels = [float(s) for s, _ in points], [y for _, y in points]
    ours = roc_auc(scores, labels)
    if len(set(labels)) < 2:
        assert ours is None
    else:
        assert ours == pytest.approx(roc_auc_score(labels, scores))


def history() -> list[RoundEvidence]:
    """Attackers 1 and 2 among clients 0..3 (round 3: clients 0, 3 only, none malicious)."""
    return [
        RoundEvidence(1, (0, 1, 2, 3), {0: 0.9, 1: 0.8, 2: 0.1, 3: 0.2}, frozenset({0})),  # 1 in top-2
        RoundEvidence(2, (0, 1, 2, 3), {0: 0.1, 1: 0.5, 2: 0.5, 3: 0.5}, frozenset()),  # 3-way tie: nobody
        RoundEvidence(3, (0, 3), {0: 0.7, 3: 0.1}, frozenset({0})),  # no attacker: a false alarm
        RoundEvidence(4, (0, 1, 2, 3), {0: 0.0, 1: 0.9, 2: 0.8, 3: 0.1}, frozenset({1, 2})),  # both
    ]


def test_rounds_to_detect_on_a_hand_made_history() -> None:
    assert rounds_to_detect(history(), malicious=[1, 2]) == {1: 1, 2: 4}
    # an attacker never sampled, or never ranked high enough, is None
    assert rounds_to_detect(history()[:3], malicious=[1, 2, 9]) == {1: 1, 2: None, 9: None}
    # order of the evidence does not matter: the earliest round counts
    assert rounds_to_detect(list(reversed(history())), malicious=[1, 2]) == {1: 1, 2: 4}


def test_ties_count_against_detection() -> None:
    assert detected({0: 0.5, 1: 0.5, 2: 0.5}, malicious=[1]) == set()
    assert detected({0: 0.5, 1: 0.5, 2: 0.1}, malicious=[0, 1]) == {0, 1}  # tie inside the top m
    assert detected({0: 0.9, 1: 0.5, 2: 0.1}, malicious=[1]) == set()


def test_false_alarm_rate_on_a_hand_made_history() -> None:
    # only round 3 has no attacker: 1 of its 2 honest clients flagged
    assert false_alarm_rate(history(), malicious=[1, 2]) == 0.5
    assert false_alarm_rate(history(), malicious=[0, 1, 2, 3]) is None  # no clean round
    # without attackers every round is clean: 1 of 4, 0 of 4, 1 of 2, 2 of 4 flagged
    assert false_alarm_rate(history(), malicious=[]) == pytest.approx((1 + 0 + 1 + 2) / 14)
    # a rule that never drops or clips raises no alarm we could count
    unflagged = [RoundEvidence(r.server_round, r.clients, r.suspicion, None) for r in history()]
    assert false_alarm_rate(unflagged, malicious=[]) is None


def test_pooled_auc_weights_rounds_by_their_pairs() -> None:
    # attackers 1, 2 against honest 0, 3. Round 1: only 0.8 > 0.2 is right, 1 of 4 pairs; round 2:
    # 0.5 > 0.1 twice, 0.5 = 0.5 twice (1/2 each), 3 of 4; round 3: no pair; round 4: 4 of 4
    assert pooled_auc(history(), malicious=[1, 2]) == pytest.approx((1 + 3 + 4) / 12)
    assert round_auc(history()[0].suspicion or {}, [1, 2]) == 0.25
    assert pooled_auc(history(), malicious=[]) is None


def test_percentiles_share_mid_ranks() -> None:
    assert percentiles({0: 1.0, 1: 2.0, 2: 3.0}) == {0: 0.0, 1: 0.5, 2: 1.0}
    assert percentiles({0: 1.0, 1: 1.0}) == {0: 0.5, 1: 0.5}
    assert percentiles({4: 7.0}) == {4: 0.5}


def test_roc_curve_of_a_perfect_rule_goes_through_the_corner() -> None:
    perfect = [RoundEvidence(1, (0, 1, 2), {0: 0.0, 1: 0.1, 2: 5.0}, None)]
    fpr, tpr = roc_curve(perfect, malicious=[2]) or ([], [])
    assert (fpr[0], tpr[0]) == (0.0, 0.0) and (fpr[-1], tpr[-1]) == (1.0, 1.0)
    assert (0.0, 1.0) in set(zip(fpr, tpr))
    assert roc_curve(perfect, malicious=[]) is None


def _touch_fresh_pages(n_bytes: int) -> int:
    # An anonymous mapping of its own: the allocator's free lists cannot serve it, so every page
    # written is new resident memory (a torch tensor may reuse pages an earlier test freed).
    import mmap

    block = mmap.mmap(-1, n_bytes)
    for offset in range(0, n_bytes, mmap.PAGESIZE):
        block[offset] = 1
    block.close()
    return n_bytes


def test_measured_reports_seconds_and_a_peak_for_a_big_allocation() -> None:
    result, cost = measured(lambda: _touch_fresh_pages(64 << 20))
    assert result == 64 << 20
    assert cost.seconds >= 0.0
    if cost.peak_mb is not None:  # None where /proc/self/clear_refs may not be written
        assert cost.peak_mb > 48


def test_measured_counts_no_peak_for_memory_the_process_already_holds() -> None:
    _, cost = measured(lambda: sum(range(1000)))
    if cost.peak_mb is not None:
        assert cost.peak_mb < 8
