"""Client replies into rows of the update matrix, at the speed of memory.

A reply's weights arrive as Flower `Array`s: `dtype` and `shape` strings, an `stype`, and `data`,
the bytes of an `.npy` file (`np.save`). Flower's own `Array.numpy()` is `np.load`, a full copy of
every array; the old ingest then copied again into the row and made three more passes over it
(finiteness, `- global`, norm). Here instead

1. keys, shapes and dtypes are checked against the `ParamLayout` from the metadata alone;
2. each `.npy` header is compared with the bytes `np.save` writes for that entry (every Flower
   client's), or else parsed by numpy's own bounded parser (never a pickle), and the data is
   viewed in place (`np.frombuffer`, no copy);
3. `row[entry] = weights - global` is one `torch.sub(..., out=)` per chunk of 256K columns, and the
   chunk's sum of squares is taken while it is still in cache: that sum is the norm, and it is the
   finiteness check too (a NaN or an infinity makes it non-finite; only then is the reply re-read
   to say which of the two messages applies).

So a reply costs one pass over its bytes and its row, and the server holds nothing per reply
beyond its row. `IngestPlan.ingest_many` walks the chunks across all of a round's replies, so each
chunk of the global model comes from memory once per round instead of once per reply.
`UpdateMatrix` keeps the matrix across rounds (a fresh one costs its page faults every round).
Integer buffers (`num_batches_tracked`) are checked but not copied: they are not part of the update
(`lab.records`).

Every malformed input is a `ReplyError`, never another exception: the bytes come from a client that
may be hostile. This module imports no `flwr`: it reads any object shaped like Flower's `Array`
(`WireArray`), so only `strategies.flower` depends on Flower. It silences torch's non-writable-array
warning with `warnings.catch_warnings`, which is not thread-safe: call it from one thread (Flower's
ServerApp aggregates on one).
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from numpy.lib import format as npy
from torch import Tensor

from lab.errors import ReplyError
from lab.records import Entry, ParamLayout

NUMPY_STYPE = "numpy.ndarray"  # flwr.common.constant.SType.NUMPY: bytes written by np.save
MAX_HEADER = 10_000  # numpy's own default bound on an .npy header (Flower's are ~128 bytes)
_HEAD_BYTES = 12 + MAX_HEADER  # magic (8) + header length (2 or 4) + header: all a parse may read
CHUNK = 1 << 18  # columns per step: 1 MB of float32, so a chunk of the global and of a row stay in L2
FLOAT32_MAX = float(torch.finfo(torch.float32).max)
NOT_FINITE = "non-finite values in the weights"
OVERFLOW = "update too large: its norm overflows float32"


class WireArray(Protocol):
    """What `ingest_into` reads of a Flower `flwr.app.Array`."""

    @property
    def dtype(self) -> str: ...
    @property
    def shape(self) -> tuple[int, ...]: ...
    @property
    def stype(self) -> str: ...
    @property
    def data(self) -> bytes: ...
    def numpy(self) -> np.ndarray[Any, Any]: ...


def ingest_into(arrays: Mapping[str, WireArray], layout: ParamLayout, global_flat: Tensor, row: Tensor) -> float:
    """Write the update `arrays - global` into `row` and return its L2 norm.

    `arrays` is a reply's ArrayRecord; `global_flat` and `row` are (layout.num_params,) float32,
    `row` typically one row of the preallocated (n_clients, n_params) matrix. The reply's bytes are
    read in place and never written. On a ReplyError, `row` holds garbage: reuse it for the next
    reply. The row equals the old path's (`layout.flatten_into` then `sub_(global_flat)`) bit for
    bit; the norm is the row's, summed in float64 over float32 chunks (closer to the exact norm
    than `row.norm()`, whose float32 accumulation is off by ~4e-4 at 11M parameters). Building the
    plan costs ~20 us per entry: for a round's replies, build one `IngestPlan` and call it (or its
    `ingest_many`).

    Raises:
        ReplyError: wrong keys, a shape or dtype other than the layout's (in the metadata or in the
            .npy header), a malformed header, an object or non-native-endian dtype, truncated or
            surplus data, non-finite weights ("non-finite values in the weights"), or an update
            whose sum of squares exceeds float32 ("update too large: its norm overflows float32":
            a norm above ~1.8e19, where `row.norm()` in float32 gave inf, and float32 distances
            and norms downstream would too).
        ValueError: `row` or `global_flat` is not a (num_params,) float32 tensor (a caller's bug).
    """
    return IngestPlan.of(layout)(arrays, global_flat, row)


@dataclass(frozen=True)
class _Slot:
    """One layout entry as the bytes of a reply should hold it."""

    entry: Entry
    dtype: np.dtype[Any]  # native-endian numpy dtype
    dtype_name: str  # as Flower's Array.dtype spells it: str(ndarray.dtype)
    numel: int
    start: int  # where its values go in the flat vector (floating entries only)
    header: bytes  # the .npy header np.save writes for this shape and dtype (Flower's own bytes)


@dataclass(frozen=True)
class IngestPlan:
    """`ingest_into` with the per-layout work (dtypes, offsets, expected .npy headers) done once.

    A reply whose header is byte for byte what `np.save` writes (every Flower client's) is read
    without parsing; any other goes through numpy's bounded parser and is checked field by field.
    """

    layout: ParamLayout
    slots: tuple[_Slot, ...]
    num_params: int

    @classmethod
    def of(cls, layout: ParamLayout) -> IngestPlan:
        """The plan for `layout`.

        Raises:
            TypeError: an entry's dtype has no numpy equivalent (bfloat16): no Flower reply can carry it.
        """
        slots: list[_Slot] = []
        start = 0
        for e in layout.entries:
            dtype = numpy_dtype(e.dtype)
            head = io.BytesIO()
            npy.write_array_header_1_0(head, {"descr": npy.dtype_to_descr(dtype), "fortran_order": False,
                                              "shape": e.shape})
            slots.append(_Slot(e, dtype, str(dtype), e.numel, start, head.getvalue()))
            start += e.numel if e.floating else 0
        return cls(layout, tuple(slots), start)

    def __call__(self, arrays: Mapping[str, WireArray], global_flat: Tensor, row: Tensor) -> float:
        """See `ingest_into`."""
        result = self.ingest_many([arrays], global_flat, row.unsqueeze(0))[0]
        if isinstance(result, ReplyError):
            raise result
        return result

    def ingest_many(self, replies: Sequence[Mapping[str, WireArray]], global_flat: Tensor,
                    rows: Tensor, *, weights: Sequence[float] | None = None,
                    weighted_sum: Tensor | None = None) -> list[float | ReplyError]:
        """`ingest_into` for a round's replies at once: each reply's norm, or its ReplyError.

        The accepted replies fill `rows[:k]` in reply order (k = the number of norms returned);
        `rows` is (>= len(replies), num_params) float32. Faster than one reply at a time: the
        columns are walked in chunks of `CHUNK`, so each chunk of `global_flat` is read from memory
        once for all replies, and each row chunk is still in cache when its sum of squares is taken.

        With `weights` (one per reply) and `weighted_sum` ((num_params,) float32), `weighted_sum`
        is also filled with sum_i weights[i] * row_i over the accepted replies, accumulated while
        each chunk is in cache: FedAvg's numerator without another pass over the matrix (a refused
        reply's garbage never enters it: after a refusal the sum is recomputed from the kept rows).

        Raises:
            ValueError: `rows`, `global_flat` or `weighted_sum` has the wrong shape or dtype, or
                `weights` is not one per reply (a caller's bug).
        """
        self._check_buffers(global_flat, rows, len(replies))
        if (weights is None) != (weighted_sum is None):
            raise ValueError("weights and weighted_sum go together")
        if weighted_sum is not None and weights is not None:
            self._check_buffers(global_flat, weighted_sum.unsqueeze(0), 1)
            if len(weights) != len(replies):
                raise ValueError(f"{len(weights)} weights for {len(replies)} replies")
        results: list[float | ReplyError] = []
        readers: list[tuple[int, list[Tensor]]] = []  # (reply index, its floating entries, flat float32)
        with warnings.catch_warnings():
            # The views are read-only (`bytes`); they are only ever the input of `torch.sub`.
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)
            for i, arrays in enumerate(replies):
                try:
                    readers.append((i, self._sources(arrays)))
                    results.append(math.nan)  # for now
                except ReplyError as exc:
                    results.append(exc)
                except (KeyError, TypeError, ValueError) as exc:  # a malformed record, not our bug
                    results.append(ReplyError(f"unreadable reply ({type(exc).__name__}: {str(exc)[:100]})"))
        row_weights = None if weights is None else [float(weights[i]) for i, _ in readers]
        sums = self._subtract([sources for _, sources in readers], global_flat, rows, row_weights, weighted_sum)
        kept: list[int] = []  # reader positions accepted
        for r, ((i, sources), sumsq) in enumerate(zip(readers, sums)):
            if not sumsq <= FLOAT32_MAX:  # NaN, inf, or a sum of squares that float32 cannot hold
                finite = all(bool(torch.isfinite(s).all()) for s in sources)
                results[i] = ReplyError(OVERFLOW if finite else NOT_FINITE)
                continue
            if len(kept) != r:  # close the gap a refused row left (only after a refusal)
                rows[len(kept)].copy_(rows[r])
            results[i] = math.sqrt(sumsq)
            kept.append(r)
        if weighted_sum is not None and row_weights is not None and len(kept) != len(readers):
            w = torch.tensor([row_weights[r] for r in kept], dtype=torch.float32)
            weighted_sum.copy_(w @ rows[: len(kept)])  # a refused row's garbage is out (a rare path)
        return results

    def _check_buffers(self, global_flat: Tensor, rows: Tensor, n: int) -> None:
        if tuple(global_flat.shape) != (self.num_params,) or global_flat.dtype != torch.float32:
            raise ValueError(f"global_flat must be ({self.num_params},) float32, got "
                             f"{tuple(global_flat.shape)} {global_flat.dtype}")
        if rows.dim() != 2 or rows.shape[0] < n or rows.shape[1] != self.num_params or rows.dtype != torch.float32:
            raise ValueError(f"row(s) must be ({n}+, {self.num_params}) float32, got {tuple(rows.shape)} {rows.dtype}")

    def _sources(self, arrays: Mapping[str, WireArray]) -> list[Tensor]:
        """The reply's floating entries as flat float32 tensors (views of its bytes, but for a
        Fortran-ordered or non-float32 entry: a float32 copy, rounded as `flatten_into` rounds)."""
        self.layout.check_keys(arrays)
        for slot in self.slots:  # metadata first: a wrong reply costs no byte of reading
            _check_metadata(slot, arrays[slot.entry.key])
        sources: list[Tensor] = []
        for slot in self.slots:
            src = _read(slot, arrays[slot.entry.key])  # ints too: checked, then left to the global model
            if slot.entry.floating:
                sources.append(src.reshape(-1).to(torch.float32))  # no copy for what np.save writes
        return sources

    def _subtract(self, readers: list[list[Tensor]], global_flat: Tensor, rows: Tensor,
                  weights: list[float] | None = None, weighted_sum: Tensor | None = None) -> list[float]:
        """rows[r] = readers[r] - global_flat, chunk by chunk; each row's sum of squares (float64
        over float32 chunk sums: more accurate than `Tensor.norm()`'s float32 accumulation); and
        with `weights`, weighted_sum = sum_r weights[r] * rows[r] from the same cached chunks."""
        sums = [0.0] * len(readers)
        if weighted_sum is not None and (weights is None or not readers):
            weighted_sum.zero_()
            weights = None  # nothing to add
        floating = [slot for slot in self.slots if slot.entry.floating]
        for j, slot in enumerate(floating):
            for c0 in range(0, slot.numel, CHUNK):
                c1 = min(c0 + CHUNK, slot.numel)
                a, b = slot.start + c0, slot.start + c1
                glob = global_flat[a:b]  # (c,): from memory once, then from cache for every reply
                for r, sources in enumerate(readers):
                    out = rows[r, a:b]
                    torch.sub(sources[j][c0:c1], glob, out=out)
                    sums[r] += float(out.dot(out))  # while `out` is still in cache
                    if weights is not None and weighted_sum is not None:
                        if r == 0:
                            torch.mul(out, weights[0], out=weighted_sum[a:b])
                        else:
                            weighted_sum[a:b].add_(out, alpha=weights[r])
        return sums


def numpy_dtype(dtype: torch.dtype) -> np.dtype[Any]:
    """The native-endian numpy dtype of a torch dtype (what `np.save` writes for it)."""
    return torch.empty((), dtype=dtype).numpy().dtype


def _check_metadata(slot: _Slot, array: WireArray) -> None:
    e = slot.entry
    try:
        shape = tuple(int(s) for s in array.shape)
        dtype = str(array.dtype)
    except Exception as exc:  # a hostile object may raise anything from its attributes
        raise ReplyError(f"{e.key}: unreadable array metadata ({type(exc).__name__})") from exc
    if shape != e.shape:
        raise ReplyError(f"{e.key}: shape {shape} != {e.shape}")
    if dtype != slot.dtype_name:
        raise ReplyError(f"{e.key}: dtype {dtype} != {e.dtype}")


def _read(slot: _Slot, array: WireArray) -> Tensor:
    """The entry's values as a tensor of its shape: a view of the reply's bytes for the numpy
    stype, Flower's `Array.numpy()` for any other."""
    e = slot.entry
    try:
        if array.stype != NUMPY_STYPE:
            return _checked(slot, np.asarray(array.numpy()))
        view = memoryview(array.data).cast("B")  # raises on a non-contiguous or non-buffer `data`
    except ReplyError:
        raise
    except Exception as exc:  # a hostile object may raise anything; the reply is refused, not the round
        raise ReplyError(f"{e.key}: unreadable array ({type(exc).__name__}: {str(exc)[:100]})") from exc
    nbytes = slot.numel * slot.dtype.itemsize
    if view[: len(slot.header)] == slot.header:  # np.save's own header: nothing left to parse
        shape, fortran, dtype, start = e.shape, False, slot.dtype, len(slot.header)
    else:
        shape, fortran, dtype, start = _header(e.key, view)
    if shape != e.shape:
        raise ReplyError(f"{e.key}: shape {shape} in the .npy header != {e.shape}")
    if dtype != slot.dtype:
        raise ReplyError(f"{e.key}: dtype {dtype.str} in the .npy header != {slot.dtype.str}")
    if len(view) - start != nbytes:
        raise ReplyError(f"{e.key}: {len(view) - start} data bytes, expected {nbytes} (truncated or padded)")
    flat = np.frombuffer(view, dtype=slot.dtype, count=slot.numel, offset=start)  # no copy
    if not flat.flags.aligned:  # only a hand-made header misaligns the data: copy rather than risk it
        flat = flat.copy()
    values = flat.reshape(e.shape[::-1]).T if fortran else flat.reshape(e.shape)
    return torch.from_numpy(values)


def _header(key: str, view: memoryview) -> tuple[tuple[int, ...], bool, np.dtype[Any], int]:
    """(shape, fortran_order, dtype, data offset) of the .npy file in `view`, read by numpy's
    bounded parser (a literal, never a pickle) from a copy of at most the first 10 KB."""
    head = io.BytesIO(bytes(view[:_HEAD_BYTES]))
    try:
        version = npy.read_magic(head)
        if version == (1, 0):
            shape, fortran, dtype = npy.read_array_header_1_0(head, max_header_size=MAX_HEADER)
        elif version == (2, 0):
            shape, fortran, dtype = npy.read_array_header_2_0(head, max_header_size=MAX_HEADER)
        else:
            raise ValueError(f"unsupported .npy version {version}")
    except Exception as exc:  # numpy raises ValueError mostly, but a crafted literal can do worse
        raise ReplyError(f"{key}: malformed .npy data ({type(exc).__name__}: {str(exc)[:100]})") from exc
    return tuple(shape), bool(fortran), dtype, head.tell()


def _checked(slot: _Slot, values: np.ndarray[Any, Any]) -> Tensor:
    """Flower's deserialised array, checked like the header of the zero-copy path."""
    e = slot.entry
    if tuple(values.shape) != e.shape:
        raise ReplyError(f"{e.key}: shape {tuple(values.shape)} != {e.shape}")
    if values.dtype != slot.dtype:
        raise ReplyError(f"{e.key}: dtype {values.dtype} != {e.dtype}")
    return torch.from_numpy(values)


class UpdateMatrix:
    """The (n_clients, n_params) float32 matrix replies are ingested into, kept across rounds.

    A fresh matrix every round pays the kernel's first-touch page faults over all of it (measured
    here: ~0.8 s for n = 20 at ResNet-18 size, more than the ingest itself, on a VM without huge
    pages); one kept buffer pays them in the first round only. `rows(n)` hands out a view: it is
    overwritten by the next round, so nothing may keep it (or a view of it) past its round; rules
    that keep history copy (FoolsGold clones its rows).
    """

    def __init__(self, num_params: int) -> None:
        self.num_params = num_params
        self._buffer = torch.empty((0, num_params))

    def rows(self, n: int) -> Tensor:
        """(n, num_params) view of the buffer, grown (never shrunk) to hold `n` rows; contents undefined."""
        if n > self._buffer.shape[0]:
            self._buffer = torch.empty(0)  # let the old one go before the larger one is allocated
            self._buffer = torch.empty((n, self.num_params))
        return self._buffer[:n]
