import numpy as np
import pytest
import torch

from lab.errors import ReplyError
from lab.records import ParamLayout


def state() -> dict[str, torch.Tensor]:
    return {"w": torch.arange(6.0).reshape(2, 3), "b": torch.tensor([7.0]),
            "bn.num_batches_tracked": torch.tensor(5), "h": torch.tensor([[0.5]], dtype=torch.float64)}


def test_flatten_unflatten_round_trip_keeps_int_buffers_from_base() -> None:
    s = state()
    layout = ParamLayout.of(s)
    flat = layout.flatten(s)
    assert flat.tolist() == [0, 1, 2, 3, 4, 5, 7, 0.5] and layout.num_params == 8
    base = dict(s, **{"bn.num_batches_tracked": torch.tensor(9)})
    back = layout.unflatten(flat * 2, base)
    assert back["w"].tolist() == (s["w"] * 2).tolist()
    assert back["h"].dtype == torch.float64
    assert int(back["bn.num_batches_tracked"]) == 9
    assert layout.slices()["b"] == slice(6, 7)
    assert layout.output_slice() == slice(7, 8)  # "h" (1x1) is the last 2-D weight



def test_flatten_accepts_numpy() -> None:
    s = {k: v.numpy() for k, v in state().items()}
    assert ParamLayout.of(s).flatten(s).shape == (8,)
    assert isinstance(s["w"], np.ndarray)


@pytest.mark.parametrize("mutate, match", [
    (lambda s: s.pop("b"), "keys differ"),
    (lambda s: s.__setitem__("w", torch.zeros(3, 2)), "shape"),
    (lambda s: s.__setitem__("b", torch.tensor([7], dtype=torch.int32)), "dtype"),
])
def test_check_rejects_mismatches(mutate, match) -> None:  # type: ignore[no-untyped-def]
    layout = ParamLayout.of(state())
    bad = state()
    mutate(bad)
    with pytest.raises(ReplyError, match=match):
        layout.check(bad)


def test_atomic_writes_get_ordinary_permissions(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import os

    from lab.artifacts import save_tensors, write_json

    write_json(tmp_path / "a.json", {"a": 1})
    save_tensors(tmp_path / "b.safetensors", {"x": torch.ones(2)})
    umask = os.umask(0)
    os.umask(umask)
    for name in ("a.json", "b.safetensors"):
        assert os.stat(tmp_path / name).st_mode & 0o777 == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
