"""The one conversion between a model's named tensors and the flat (n_params,) update vector.

Every aggregator works on client deltas (client - global) flattened and stacked into an
(n_clients, n_params) float32 matrix. `ParamLayout` owns that mapping. Integer buffers such as
BatchNorm's `num_batches_tracked` are not parameters of the update: they are carried over from the
global model and never aggregated.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from lab.errors import ReplyError

ArrayLike = Tensor | np.ndarray


@dataclass(frozen=True)
class Entry:
    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1

    @property
    def floating(self) -> bool:
        return self.dtype.is_floating_point


@dataclass(frozen=True)
class ParamLayout:
    entries: tuple[Entry, ...]

    @classmethod
    def of(cls, state: Mapping[str, ArrayLike]) -> ParamLayout:
        return cls(tuple(Entry(k, tuple(v.shape), _as_tensor(v).dtype) for k, v in state.items()))

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(e.key for e in self.entries)

    @property
    def num_params(self) -> int:
        """Length of the flat vector: the floating-point entries only."""
        return sum(e.numel for e in self.entries if e.floating)

    def check(self, state: Mapping[str, ArrayLike]) -> None:
        """Raise ReplyError unless `state` has exactly these keys, shapes and dtypes."""
        if set(state) != set(self.keys):
            missing = sorted(set(self.keys) - set(state))
            extra = sorted(set(state) - set(self.keys))
            raise ReplyError(f"keys differ from the global model (missing {missing[:3]}, extra {extra[:3]})")
        for e in self.entries:
            t = _as_tensor(state[e.key])
            if tuple(t.shape) != e.shape:
                raise ReplyError(f"{e.key}: shape {tuple(t.shape)} != {e.shape}")
            if t.dtype != e.dtype:
                raise ReplyError(f"{e.key}: dtype {t.dtype} != {e.dtype}")

    def check_keys(self, keys: Iterable[str]) -> None:
        """Raise ReplyError unless `keys` are exactly this layout's (the first half of `check`,
        for callers that read shapes and dtypes from serialised metadata: strategies.ingest)."""
        got = set(keys)
        if got != set(self.keys):
            missing = sorted(set(self.keys) - got)
            extra = sorted(got - set(self.keys))
            raise ReplyError(f"keys differ from the global model (missing {missing[:3]}, extra {extra[:3]})")

    def flatten(self, state: Mapping[str, ArrayLike]) -> Tensor:
        """(n_params,) float32 vector of the floating entries, in layout order."""
        return self.flatten_into(state, torch.empty(self.num_params))

    def flatten_into(self, state: Mapping[str, ArrayLike], out: Tensor) -> Tensor:
        """Write the floating entries of `state` into `out` (n_params,), in layout order."""
        offset = 0
        for e in self.entries:
            if e.floating:
                out[offset : offset + e.numel].copy_(_as_tensor(state[e.key]).reshape(-1))
                offset += e.numel
        return out

    def unflatten(self, vector: Tensor, base: Mapping[str, ArrayLike]) -> dict[str, Tensor]:
        """Named tensors from `vector`; non-floating entries are copied from `base`."""
        if vector.shape != (self.num_params,):
            raise ValueError(f"vector shape {tuple(vector.shape)} != ({self.num_params},)")
        out: dict[str, Tensor] = {}
        offset = 0
        for e in self.entries:
            if e.floating:
                out[e.key] = vector[offset : offset + e.numel].reshape(e.shape).to(e.dtype).clone()
                offset += e.numel
            else:
                out[e.key] = _as_tensor(base[e.key]).clone()
        return out

    def slices(self) -> dict[str, slice]:
        """Where each floating entry lives in the flat vector (e.g. the last layer for FoolsGold)."""
        out, offset = {}, 0
        for e in self.entries:
            if e.floating:
                out[e.key] = slice(offset, offset + e.numel)
                offset += e.numel
        return out


    def output_slice(self) -> slice | None:
        """Where the last 2-D weight (the output layer of our models) lives in the flat vector."""
        slices = self.slices()
        last = next((e for e in reversed(self.entries) if e.floating and len(e.shape) == 2), None)
        return None if last is None else slices[last.key]


def nonfinite_entries(state: Mapping[str, ArrayLike]) -> list[str]:
    """Keys of the floating-point entries of `state` that hold a NaN or an infinity."""
    return [k for k, v in state.items()
            if (t := _as_tensor(v)).is_floating_point() and not bool(torch.isfinite(t).all())]


def _as_tensor(value: ArrayLike) -> Tensor:
    return value if isinstance(value, Tensor) else torch.from_numpy(np.asarray(value))
