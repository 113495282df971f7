"""The honest capture's choice of suspects (server.suspects) and the capture disclosure helpers."""

from __future__ import annotations

import pytest
import torch

from lab.capture import UPPER_BOUND_NOTE, capture_selection, stamped
from lab.config import CaptureConfig
from lab.errors import LabError
from lab.task import LocalHyperparams
from lab.triggers import Trigger
from server.capture import CapturePlan
from server.suspects import SuspectBook


def _rounds(book: SuspectBook, n_rounds: int, sybils: set[int], n: int = 6, dim: int = 50, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    backdoor = torch.randn(dim, generator=gen)
    for _ in range(n_rounds):
        common = torch.randn(dim, generator=gen)  # the round's honest descent direction
        book.observe_updates({p: common + 1.5 * torch.randn(dim, generator=gen) + (2.0 * backdoor if p in sybils else 0)
                              for p in range(n)})


def test_history_similarity_puts_sybils_sharing_a_direction_first() -> None:
    book = SuspectBook()
    _rounds(book, 20, {1, 4})
    assert set(book.rank(list(range(6)))[:2]) == {1, 4}


def test_a_large_model_keeps_sketched_histories_whose_cosines_match_the_exact_ones() -> None:
    exact, sketched = SuspectBook(), SuspectBook(exact_up_to=10_000, sketch_dims=4096)
    for book in (exact, sketched):
        _rounds(book, 12, {1, 4}, n=8, dim=200_000)
    assert all(h.numel() == 4096 for h in sketched.history.values())  # 1/50 of the memory
    assert all(h.numel() == 200_000 for h in exact.history.values())
    parts = list(range(8))
    want, got = exact.similarity(parts), sketched.similarity(parts)
    assert max(abs(want[p] - got[p]) for p in parts) < 0.05  # ~1/sqrt(4096) per cosine
    assert set(sketched.rank(parts)[:2]) == {1, 4} == set(exact.rank(parts)[:2])
    a, b = torch.randn(200_000), torch.randn(200_000)  # linear: the sketch of a sum is the sum of sketches
    assert torch.allclose(sketched._kept(a + b), sketched._kept(a) + sketched._kept(b), atol=1e-3)


def test_similarity_is_the_largest_cosine_with_another_client() -> None:
    book = SuspectBook()
    book.observe_updates({0: torch.tensor([1.0, 0.0]), 1: torch.tensor([1.0, 1.0]), 2: torch.tensor([-1.0, 0.0])})
    sim = book.similarity([0, 1, 2])
    assert sim[0] == pytest.approx(2 ** -0.5) and sim[1] == pytest.approx(2 ** -0.5)
    assert sim[2] == pytest.approx(-(2 ** -0.5))  # cos -1 with client 0, -0.71 with client 1
    assert book.similarity([0, 2]) == {0: pytest.approx(-1.0), 2: pytest.approx(-1.0)}


def test_the_rules_drops_come_first_then_similarity_and_its_suspicion_only_breaks_ties() -> None:
    book = SuspectBook()
    _rounds(book, 20, {1, 4})
    book.observe_decisions([0, 1, 2, 3, 4, 5], dropped=[5], suspicion=None)
    assert book.rank(list(range(6)))[0] == 5
    # a no-defense rule's suspicion that points away from the sybils does not override their similarity
    book.observe_decisions([0, 1, 2, 3, 4, 5], dropped=[], suspicion={0: 0.1, 1: 0.0, 2: 0.9, 3: 0.2, 4: 0.3, 5: 0.5})
    assert book.rank(list(range(6)))[0] == 5 and set(book.rank(list(range(6)))[1:3]) == {1, 4}
    scores = book.scores([2, 5])
    assert scores[5]["dropped_rounds"] == 1.0 and scores[2]["rule_suspicion"] == pytest.approx(1.0)
    tied = SuspectBook()  # no history: the rule's suspicion decides
    tied.observe_decisions([0, 1, 2], None, {0: 0.2, 1: 0.9, 2: 0.1})
    assert tied.rank([0, 1, 2]) == [1, 0, 2]


def test_a_suspicion_tensor_in_row_order_and_non_finite_values() -> None:
    book = SuspectBook()
    book.observe_decisions([7, 8, 9], None, torch.tensor([0.0, float("nan"), 3.0]))
    assert book.rank([7, 8, 9])[0] == 9
    book2 = SuspectBook()
    book2.observe_decisions([7, 8], None, [1.0])  # misaligned: ignored, not misattributed
    assert book2.scores([7, 8])[7]["rule_suspicion"] is None


def test_no_history_ranks_by_partition_id_deterministically() -> None:
    assert SuspectBook().rank([3, 1, 2]) == [1, 2, 3]


def test_plan_marks_the_ground_truth_capture_as_an_upper_bound() -> None:
    hp = LocalHyperparams(1, None, 32, 0.05, 0.9, 0.0)
    honest = CapturePlan.of(CaptureConfig(enabled=True, rounds=(1,)), hp, frozenset({2}), (1, 8, 8))
    assert honest.mode == "suspects" and honest.selection == {"mode": "suspects", "upper_bound": False, "top_k": 3}
    assert all(honest.select(p) for p in range(5))  # chosen after aggregation, not by identity
    truth = CapturePlan.of(CaptureConfig(enabled=True, rounds=(1,), clients="malicious"), hp, frozenset({2}), (1, 8, 8))
    assert truth.selection["upper_bound"] is True and truth.select(2) and not truth.select(1)
    with pytest.raises(LabError, match="top_k"):
        CapturePlan.of(CaptureConfig(enabled=True, rounds=(1,), top_k=0), hp, frozenset(), (1, 8, 8))


def test_capture_selection_from_the_row_or_the_config() -> None:
    assert capture_selection({"selection": {"mode": "suspects", "suspect_rank": 1}}, "malicious")["mode"] == "suspects"
    old = capture_selection({}, "malicious")  # a manifest from before the field existed
    assert old == {"mode": "malicious", "upper_bound": True, "note": UPPER_BOUND_NOTE}
    assert capture_selection({}, (1, 2)) == {"mode": "listed", "upper_bound": False}


def test_stamped_finds_the_images_that_carry_the_trigger() -> None:
    mask = torch.zeros(6, 6)
    mask[4:6, 4:6] = 1
    trig = Trigger(mask, torch.ones(6, 6))
    x = torch.rand(3, 1, 6, 6) * 0.5
    x[1] = trig.stamp(x[1])
    assert stamped(x, trig).tolist() == [False, True, False]
