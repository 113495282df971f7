"""`strategies.ingest`: replies -> update rows without a copy, and every hostile reply a ReplyError.

The oracle is the old path of `RobustFedAvg._accept`: `Array.numpy()` per array,
`ParamLayout.check`, `flatten_into`, `sub_(global)`; the norm's is the row's in float64 (ours
sums float32 chunks in float64, closer to it than `row.norm()`'s float32 accumulation).
"""

from __future__ import annotations

import io
import tracemalloc
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor

flwr = pytest.importorskip("flwr")

from flwr.app import Array, ArrayRecord

from lab.errors import ReplyError
from lab.records import ParamLayout
from strategies.ingest import (
    NOT_FINITE,
    OVERFLOW,
    IngestPlan,
    UpdateMatrix,
    ingest_into,
)

NPY = "numpy.ndarray"


def model_state(seed: int) -> dict[str, np.ndarray]:
    g = np.random.default_rng(seed)
    return {
        "conv.weight": g.standard_normal((4, 3, 3, 3), dtype=np.float32),
        "bn.running_mean": g.standard_normal(4, dtype=np.float32),
        "bn.num_batches_tracked": np.array(7 + seed, dtype=np.int64),  # an int buffer, never in the row
        "fc.weight": np.asfortranarray(g.standard_normal((3, 5), dtype=np.float32)),  # fortran_order
        "fc.bias": g.standard_normal(3).astype(np.float64),  # a float64 entry: rounded like flatten_into
        "scale": np.array(1.5, dtype=np.float32),  # 0-d
        "empty": np.zeros((0, 2), dtype=np.float32),
    }


def record(state: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in state.items()})


def old_path(arrays: ArrayRecord, layout: ParamLayout, global_flat: Tensor) -> tuple[Tensor, float]:
    state = {k: torch.from_numpy(v.numpy()) for k, v in arrays.items()}
    layout.check(state)
    row = layout.flatten_into(state, torch.empty(layout.num_params))
    assert bool(torch.isfinite(row).all())
    row.sub_(global_flat)
    return row, float(row.double().norm())


@pytest.fixture
def setup() -> tuple[ParamLayout, Tensor]:
    layout = ParamLayout.of(model_state(0))
    global_flat = layout.flatten(model_state(0))
    return layout, global_flat


def ingest(arrays: Any, layout: ParamLayout, global_flat: Tensor) -> tuple[Tensor, float]:
    row = torch.full((layout.num_params,), 123.0)  # garbage from an earlier reply
    return row, ingest_into(arrays, layout, global_flat, row)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_rows_equal_the_old_path_bit_for_bit_and_norms_to_float32_precision(setup: tuple[ParamLayout, Tensor], seed: int) -> None:
    layout, global_flat = setup
    arrays = record(model_state(seed))
    row, norm = ingest(arrays, layout, global_flat)
    want, want_norm = old_path(arrays, layout, global_flat)
    assert torch.equal(row, want) and norm == pytest.approx(want_norm, rel=1e-6)
    assert row.shape == (4 * 27 + 4 + 15 + 3 + 1,)  # no room for the int buffer


def test_one_plan_serves_every_reply_and_knows_np_saves_headers(setup: tuple[ParamLayout, Tensor]) -> None:
    layout, global_flat = setup
    plan = IngestPlan.of(layout)
    for seed in (4, 5):
        arrays = record(model_state(seed))
        row = torch.empty(layout.num_params)
        assert plan(arrays, global_flat, row) == pytest.approx(old_path(arrays, layout, global_flat)[1], rel=1e-6)
        assert torch.equal(row, old_path(arrays, layout, global_flat)[0])
        for slot in plan.slots:  # what makes the no-parse path the common one
            assert arrays[slot.entry.key].data.startswith(slot.header) or slot.entry.key == "fc.weight"


@pytest.mark.parametrize("chunk", [4, 1 << 18])  # 4: many chunks per entry, and entries split across them
def test_a_round_at_once_fills_the_rows_of_the_accepted_replies_in_order(
    setup: tuple[ParamLayout, Tensor], monkeypatch: pytest.MonkeyPatch, chunk: int
) -> None:
    monkeypatch.setattr("strategies.ingest.CHUNK", chunk)
    layout, global_flat = setup
    states = [model_state(s) for s in range(6)]
    states[1]["conv.weight"][0, 0, 0, 0] = np.nan
    states[3]["fc.bias"] = states[3]["fc.bias"].astype(np.float32)  # wrong dtype: refused before reading
    states[4]["conv.weight"] *= np.float32(1e30)  # finite, but its norm overflows
    replies = [record(st) for st in states]
    rows = torch.full((7, layout.num_params), 123.0)
    results = IngestPlan.of(layout).ingest_many(replies, global_flat, rows)
    assert [type(r).__name__ for r in results] == ["float", "ReplyError", "float", "ReplyError", "ReplyError",
                                                   "float"]
    assert [str(results[i]) for i in (1, 4)] == [NOT_FINITE, OVERFLOW] and "fc.bias: dtype" in str(results[3])
    for row, i in zip(rows, (0, 2, 5)):  # gaps closed: the accepted replies in rows 0, 1, 2
        want, want_norm = old_path(replies[i], layout, global_flat)
        assert torch.equal(row, want) and results[i] == pytest.approx(want_norm, rel=1e-6)


@pytest.mark.parametrize("chunk", [4, 1 << 18])
@pytest.mark.parametrize("refuse", [(), (1,), (0, 2)])
def test_the_weighted_sum_is_fedavgs_numerator_over_the_accepted_rows_only(
    setup: tuple[ParamLayout, Tensor], monkeypatch: pytest.MonkeyPatch, chunk: int, refuse: tuple[int, ...]
) -> None:
    monkeypatch.setattr("strategies.ingest.CHUNK", chunk)
    layout, global_flat = setup
    states = [model_state(s) for s in range(4)]
    for i in refuse:  # NaN: found only after the pass, so its garbage went through the sum first
        states[i]["conv.weight"][0, 0, 0, 0] = np.nan
    weights = [3.0, 1.0, 7.0, 2.0]
    rows = torch.empty((4, layout.num_params))
    total = torch.full((layout.num_params,), 5.0)
    results = IngestPlan.of(layout).ingest_many([record(st) for st in states], global_flat, rows,
                                                weights=weights, weighted_sum=total)
    kept = [i for i in range(4) if i not in refuse]
    assert [i for i, r in enumerate(results) if isinstance(r, float)] == kept
    want = torch.stack([old_path(record(states[i]), layout, global_flat)[0] for i in kept])
    w = torch.tensor([weights[i] for i in kept])
    torch.testing.assert_close(total, w @ want, rtol=1e-6, atol=1e-6)


def test_weights_without_a_sum_are_a_callers_bug(setup: tuple[ParamLayout, Tensor]) -> None:
    layout, global_flat = setup
    rows = torch.empty((1, layout.num_params))
    with pytest.raises(ValueError, match="go together"):
        IngestPlan.of(layout).ingest_many([record(model_state(0))], global_flat, rows, weights=[1.0])
    with pytest.raises(ValueError, match="1 weights for 2 replies"):
        IngestPlan.of(layout).ingest_many([record(model_state(0))] * 2, global_flat, torch.empty((2, layout.num_params)),
                                          weights=[1.0], weighted_sum=torch.empty(layout.num_params))


def test_the_norm_overflows_where_float32_norms_did(setup: tuple[ParamLayout, Tensor]) -> None:
    layout = ParamLayout.of({"w": np.zeros(4, dtype=np.float32)})
    for value, overflows in ((1e19, True), (9e18, False)):  # sum of squares 4e38 > float32 max > 3.2e38
        assert bool(torch.isinf(torch.full((4,), value).norm())) is overflows  # what the old path saw
        data = npy_file("<f4", (4,), np.full(4, value, np.float32).tobytes())
        if overflows:
            with pytest.raises(ReplyError, match=f"^{OVERFLOW}$"):
                ingest({"w": raw(data, (4,))}, layout, torch.zeros(4))
        else:
            assert ingest({"w": raw(data, (4,))}, layout, torch.zeros(4))[1] == pytest.approx(2 * value, rel=1e-6)


def test_an_int_buffer_is_checked_but_not_copied(setup: tuple[ParamLayout, Tensor]) -> None:
    layout, global_flat = setup
    a, b = model_state(1), model_state(1)
    b["bn.num_batches_tracked"] = np.array(10**9, dtype=np.int64)
    assert torch.equal(ingest(record(a), layout, global_flat)[0], ingest(record(b), layout, global_flat)[0])
    b["bn.num_batches_tracked"] = np.array(3, dtype=np.int32)
    with pytest.raises(ReplyError, match="bn.num_batches_tracked: dtype"):
        ingest(record(b), layout, global_flat)


def test_npy_version_2_and_a_misaligned_hand_made_header_read_the_same_values() -> None:
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    layout = ParamLayout.of({"w": x})
    zero = torch.zeros(6)
    v2 = io.BytesIO()
    np.lib.format.write_array(v2, x, version=(2, 0))
    odd = npy_file("<f4", (2, 3), x.tobytes(), pad=1)  # data starts at an offset that is not 4-aligned
    for data in (v2.getvalue(), odd):
        row, norm = ingest({"w": raw(data, (2, 3))}, layout, zero)
        assert row.tolist() == list(range(6)) and norm == pytest.approx(float(np.linalg.norm(x)))


def test_the_bytes_are_read_in_place_and_never_written(setup: tuple[ParamLayout, Tensor]) -> None:
    layout, global_flat = setup
    big = {"w": np.random.default_rng(0).standard_normal(1_000_000, dtype=np.float32)}  # 4 MB
    layout = ParamLayout.of(big)
    global_flat = torch.ones(layout.num_params)
    arrays = record(big)
    before = {k: (a.data, bytes(a.data)) for k, a in arrays.items()}
    row = torch.empty(layout.num_params)
    tracemalloc.start()  # sees numpy's buffers (np.load's copy), not torch's row
    try:
        ingest_into(arrays, layout, global_flat, row)
        ours = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        old_path(arrays, layout, global_flat)
        old = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert old >= 4_000_000  # tracemalloc sees the old path's full copy ...
    assert ours < 100_000  # ... and no copy of ours
    assert all(a.data is before[k][0] and a.data == before[k][1] for k, a in arrays.items())


# ---------------------------------------------------------------------------------------------- hostile


def npy_file(descr: str, shape: tuple[int, ...], payload: bytes, *, fortran: bool = False, pad: int = 0,
             header: str | None = None, magic: bytes = b"\x93NUMPY\x01\x00") -> bytes:
    """A hand-made .npy v1 file (what a sender that does not use np.save may send)."""
    text = header if header is not None else repr({"descr": descr, "fortran_order": fortran, "shape": shape})
    text += " " * pad + "\n"
    body = text.encode("latin1")
    return magic + len(body).to_bytes(2, "little") + body + payload


def raw(data: bytes, shape: tuple[int, ...], dtype: str = "float32", stype: str = NPY) -> Array:
    return Array(dtype=dtype, shape=shape, stype=stype, data=data)


class Fake:
    """An object in an ArrayRecord's place that raises from wherever it is read."""

    def __init__(self, **fields: Any) -> None:
        self.__dict__.update({"dtype": "float32", "shape": (3,), "stype": NPY, **fields})

    def numpy(self) -> np.ndarray:
        raise RuntimeError("no")


THREE = np.array([1.0, 2.0, 3.0], dtype=np.float32).tobytes()
GOOD = npy_file("<f4", (3,), THREE)
STRUCTURED = "{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (3,)}"
HOSTILE: dict[str, tuple[Callable[[], Any], str]] = {
    "missing key": (dict, "keys differ"),
    "extra key": (lambda: {"w": raw(GOOD, (3,)), "x": raw(GOOD, (3,))}, "keys differ"),
    "shape in metadata": (lambda: {"w": raw(GOOD, (4,))}, "w: shape"),
    "dtype in metadata": (lambda: {"w": raw(GOOD, (3,), dtype="float64")}, "w: dtype"),
    "shape in header": (lambda: {"w": raw(npy_file("<f4", (1, 3), THREE), (3,))}, "w: shape"),
    "dtype in header": (lambda: {"w": raw(npy_file("<i4", (3,), THREE), (3,))}, "w: dtype"),
    "big-endian": (lambda: {"w": raw(npy_file(">f4", (3,), THREE), (3,))}, "w: dtype"),
    "object dtype (a pickle)": (lambda: {"w": raw(npy_file("|O", (3,), b"\x80\x04K\x01."), (3,))}, "w: dtype"),
    "structured dtype": (lambda: {"w": raw(npy_file("", (), THREE, header=STRUCTURED), (3,))}, "w: dtype"),
    "truncated": (lambda: {"w": raw(GOOD[:-1], (3,))}, "truncated"),
    "surplus bytes": (lambda: {"w": raw(GOOD + b"\0" * 4, (3,))}, "padded"),
    "no data": (lambda: {"w": raw(b"", (3,))}, "malformed"),
    "bad magic": (lambda: {"w": raw(b"PK\x03\x04" + GOOD, (3,))}, "malformed"),
    "npy version 9": (lambda: {"w": raw(npy_file("<f4", (3,), THREE, magic=b"\x93NUMPY\x09\x00"), (3,))},
                      "malformed"),
    "header is code": (lambda: {"w": raw(npy_file("", (), THREE, header="__import__('os').getcwd()"), (3,))},
                       "malformed"),
    "header nests deep": (lambda: {"w": raw(npy_file("", (), THREE, header="(" * 4000 + ")" * 4000), (3,))},
                          "malformed"),
    "header longer than the data": (lambda: {"w": raw(b"\x93NUMPY\x01\x00\xff\x00{'descr'", (3,))}, "malformed"),
    "header over the bound": (lambda: {"w": raw(b"\x93NUMPY\x02\x00" + (20_000).to_bytes(4, "little")
                                                + b" " * 20_000 + THREE, (3,))}, "malformed"),
    "negative shape": (lambda: {"w": raw(npy_file("<f4", (-3,), THREE), (3,))}, "w: shape"),
    "other stype": (lambda: {"w": raw(GOOD, (3,), stype="torch.Tensor")}, "w: unreadable array"),
    "data not a buffer": (lambda: {"w": Fake(data=3)}, "w: unreadable array"),
    "shape not a tuple": (lambda: {"w": Fake(shape=None, data=GOOD)}, "w: unreadable array metadata"),
    "NaN": (lambda: {"w": raw(npy_file("<f4", (3,), np.array([1, np.nan, 3], np.float32).tobytes()), (3,))},
            NOT_FINITE),
    "inf": (lambda: {"w": raw(npy_file("<f4", (3,), np.array([1, np.inf, 3], np.float32).tobytes()), (3,))},
            NOT_FINITE),
    "-inf": (lambda: {"w": raw(npy_file("<f4", (3,), np.array([1, 2, -np.inf], np.float32).tobytes()), (3,))},
             NOT_FINITE),
    "norm overflows": (lambda: {"w": raw(npy_file("<f4", (3,), np.full(3, 1e30, np.float32).tobytes()), (3,))},
                       OVERFLOW),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_every_hostile_reply_is_a_reply_error_with_its_reason(case: str) -> None:
    make, reason = HOSTILE[case]
    layout = ParamLayout.of({"w": np.zeros(3, dtype=np.float32)})
    with pytest.raises(ReplyError, match=reason):
        ingest(make(), layout, torch.zeros(3))


def test_a_finite_reply_whose_difference_from_the_global_overflows_is_too_large() -> None:
    layout = ParamLayout.of({"w": np.zeros(2, dtype=np.float32)})
    data = npy_file("<f4", (2,), np.array([3e38, 0], np.float32).tobytes())
    with pytest.raises(ReplyError, match=f"^{OVERFLOW}$"):
        ingest({"w": raw(data, (2,))}, layout, torch.tensor([-3e38, 0.0]))


def test_the_exact_messages_the_wrapper_reports() -> None:
    assert NOT_FINITE == "non-finite values in the weights"
    assert OVERFLOW == "update too large: its norm overflows float32"


def test_a_wrong_row_is_the_callers_bug_not_the_clients() -> None:
    layout = ParamLayout.of({"w": np.zeros(3, dtype=np.float32)})
    with pytest.raises(ValueError, match="row"):
        ingest_into({"w": raw(GOOD, (3,))}, layout, torch.zeros(3), torch.empty(4))
    with pytest.raises(ValueError, match="global_flat"):
        ingest_into({"w": raw(GOOD, (3,))}, layout, torch.zeros(3, dtype=torch.float64), torch.empty(3))


def test_the_kept_matrix_reuses_its_memory_and_grows_when_a_round_is_larger() -> None:
    matrix = UpdateMatrix(5)
    first = matrix.rows(3)
    assert first.shape == (3, 5) and matrix.rows(2).data_ptr() == first.data_ptr()
    assert matrix.rows(4).shape == (4, 5) and matrix.rows(0).shape == (0, 5)
