"""The pure reply checks (strategies.replies) and strict metrics JSON (lab.artifacts.finite_record)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from lab.artifacts import append_jsonl, finite_record, write_json
from lab.errors import ReplyError
from strategies.replies import MAX_EXAMPLES, IdentityBook, read_examples, read_loss, read_partition


@pytest.mark.parametrize("value", [1, 32, 2.5, MAX_EXAMPLES])
def test_examples_accepts_a_positive_count(value: object) -> None:
    assert read_examples(value) == float(value)


@pytest.mark.parametrize("value, why", [
    (None, "missing"), (0, "in (0,"), (-3, "in (0,"), (math.inf, "finite"), (math.nan, "finite"),
    (1e39, "in (0,"), (10**400, "finite"), (MAX_EXAMPLES + 1, "in (0,"), ("32", "number"), ([32], "number"),
    (True, "number"),
])
def test_examples_refuses_what_would_break_a_weighted_mean(value: object, why: str) -> None:
    with pytest.raises(ReplyError, match="num-examples") as err:
        read_examples(value)
    assert why in str(err.value)


def test_loss_is_optional_but_a_finite_number_when_given() -> None:
    assert read_loss(None) is None and read_loss(0.25) == 0.25 and read_loss(2) == 2.0
    for bad in ("low", [0.1], math.nan, -math.inf, False):
        with pytest.raises(ReplyError, match="train-loss"):
            read_loss(bad)


def test_partition_is_an_integer_in_range() -> None:
    assert read_partition(3, 4) == 3 and read_partition(np.int64(2), 4) == 2 and read_partition(10**6) == 10**6
    for bad, why in [(None, "missing"), ("1", "integer"), (1.0, "integer"), ([1], "integer"), (True, "integer"),
                     (-1, "outside"), (4, "outside [0, 4)"), ("x" * 500, "integer")]:
        with pytest.raises(ReplyError, match="partition-id") as err:
            read_partition(bad, 4)
        assert why in str(err.value) and len(str(err.value)) < 120  # a client-chosen value is shortened


def reasons(book: IdentityBook, claims: list[tuple[int, object]]) -> tuple[dict[int, int], dict[int, str]]:
    settled = book.settle(claims)
    return settled.partition_of, {r.node_id: r.reason for r in settled.refused}


def test_a_node_keeps_the_partition_it_first_claimed() -> None:
    book = IdentityBook(4)
    assert reasons(book, [(10, 0), (11, 1)]) == ({10: 0, 11: 1}, {})
    accepted, refused = reasons(book, [(10, 0), (11, 2)])
    assert accepted == {10: 0} and refused == {11: "node 11 holds partition 1, not 2"}


def test_a_partition_held_by_one_node_is_refused_to_another_whoever_replies_first() -> None:
    book = IdentityBook(4)
    reasons(book, [(10, 0)])
    for claims in ([(66, 0), (10, 0)], [(10, 0), (66, 0)], [(66, 0)]):
        accepted, refused = reasons(book, claims)
        assert refused == {66: "partition 0 is held by node 10"}
        assert accepted == ({10: 0} if len(claims) == 2 else {})


def test_an_unheld_partition_claimed_twice_in_a_round_goes_to_nobody() -> None:
    book = IdentityBook(4)
    for claims in ([(10, 0), (66, 0), (11, 1)], [(66, 0), (10, 0), (11, 1)]):  # arrival order decides nothing
        accepted, refused = reasons(IdentityBook(4), claims)
        assert accepted == {11: 1}
        assert refused == {10: "partition 0 claimed by 2 nodes in one round",
                           66: "partition 0 claimed by 2 nodes in one round"}
    reasons(book, [(10, 0), (66, 0)])
    assert reasons(book, [(10, 0)]) == ({10: 0}, {})  # unheld until one node claims it alone


def test_a_refused_claim_is_not_a_rival_and_a_node_replying_twice_is_refused() -> None:
    book = IdentityBook(4)
    reasons(book, [(10, 0)])
    accepted, refused = reasons(book, [(10, 1), (11, 1)])  # node 10 holds 0: its claim on 1 is void
    assert accepted == {11: 1} and "holds partition 0" in refused[10]
    accepted, refused = reasons(book, [(12, 2), (12, 2)])
    assert accepted == {} and refused == {12: "node 12 sent 2 replies in one round"}


def test_bad_claims_bind_nothing_and_settling_twice_agrees() -> None:
    book = IdentityBook(4)
    claims: list[tuple[int, object]] = [(10, "0"), (11, 9), (12, None), (13, 3), (14, 2), (15, 2)]
    first = book.settle(claims)
    assert first.partition_of == {13: 3} and [r.node_id for r in first.refused] == [10, 11, 12, 14, 15]
    assert book.settle(claims) == first  # the capture hook and the strategy both settle a round
    assert book.partition_of == {13: 3} and book.node_of == {3: 13}


def test_a_node_that_is_gone_frees_its_partition() -> None:
    book = IdentityBook(4)
    reasons(book, [(10, 0), (11, 1)])
    assert book.release_absent([11, 99]) == [10]
    assert reasons(book, [(20, 0)]) == ({20: 0}, {})  # a restarted SuperNode, under a new id


def test_finite_record_writes_null_and_names_the_nonfinite_values(tmp_path) -> None:  # type: ignore[no-untyped-def]
    row = {"round": 1, "loss": math.nan, "accuracy": 0.5, "update_norms": {3: math.inf, 4: 1.0},
           "scores": torch.tensor([1.0, -math.inf]), "x": np.float32("nan"), "ok": [1, None, "a"], "flag": True}
    clean = finite_record(row)
    assert clean == {"round": 1, "loss": None, "accuracy": 0.5, "update_norms": {"3": None, "4": 1.0},
                     "scores": [1.0, None], "x": None, "ok": [1, None, "a"], "flag": True,
                     "nonfinite": ["loss", "update_norms.3", "scores.1", "x"]}
    assert finite_record(clean) == clean  # a row read back keeps its flags
    assert "nonfinite" not in finite_record({"a": 1.0})
    append_jsonl(tmp_path / "m.jsonl", clean, allow_nan=False)
    write_json(tmp_path / "s.json", finite_record({"final_accuracy": math.nan}), allow_nan=False)

    def refuse(token: str) -> None:
        raise ValueError(token)
    assert json.loads((tmp_path / "m.jsonl").read_text(), parse_constant=refuse) == clean
    assert json.loads((tmp_path / "s.json").read_text(), parse_constant=refuse)["nonfinite"] == ["final_accuracy"]
    with pytest.raises(ValueError):
        append_jsonl(tmp_path / "m.jsonl", {"loss": math.nan}, allow_nan=False)
