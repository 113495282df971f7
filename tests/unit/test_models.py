"""lab.models: the registry, the papers' networks by name, their sizes and that they train.

Parameter counts are computed by hand in each test from the layer shapes the papers give, so a
changed layer shows up as a changed number, not just a changed snapshot.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lab.config import load_experiment
from lab.errors import ConfigError
from lab.models import MODELS, Normalize, build_model
from lab.validation import MIN_SIDE

FMNIST = (1, 28, 28)  # Fashion-MNIST's image shape
MEAN, STD = (0.286,), (0.353,)  # Fashion-MNIST's training-set statistics (test_fashion_mnist.py)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def conv(cin: int, cout: int, k: int) -> int:
    return cout * cin * k * k + cout


def fc(cin: int, cout: int) -> int:
    return cout * cin + cout


def test_fltrust_cnn_has_the_papers_layers() -> None:
    # 28 -conv3-> 26 -pool-> 13 -conv3-> 11 -pool-> 5: the FC sees 50 * 5 * 5 = 1250 values.
    expected = conv(1, 30, 3) + conv(30, 50, 3) + fc(1250, 100) + fc(100, 10)
    assert expected == 139_960  # "about 140k" (FoundationFL Table IX(a))
    model = build_model("fltrust-cnn", FMNIST, 10, MEAN, STD)
    assert n_params(model) == expected
    kinds = [type(m).__name__ for m in model[1]]
    assert kinds == ["Conv2d", "ReLU", "MaxPool2d", "Conv2d", "ReLU", "MaxPool2d", "Flatten",
                     "Linear", "ReLU", "Linear"]
    assert [m.kernel_size for m in model[1] if isinstance(m, nn.Conv2d)] == [(3, 3), (3, 3)]
    assert all(m.padding == (0, 0) for m in model[1] if isinstance(m, nn.Conv2d))


def test_lenet_is_fl_defenders_cnn() -> None:
    # 28 -conv5-> 24 -pool-> 12 -conv5-> 8 -pool-> 4: the FC sees 20 * 4 * 4 = 320 values.
    expected = conv(1, 10, 5) + conv(10, 20, 5) + fc(320, 50) + fc(50, 10)
    assert expected == 21_840  # "about 22k"
    model = build_model("lenet", FMNIST, 10, MEAN, STD)
    assert n_params(model) == expected
    drops = [m for m in model[1] if isinstance(m, nn.Dropout | nn.Dropout2d)]
    assert [(type(m).__name__, m.p) for m in drops] == [("Dropout2d", 0.5), ("Dropout", 0.5)]


def test_softmax_is_one_linear_layer() -> None:
    model = build_model("softmax", FMNIST, 10, MEAN, STD)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 1 and linears[0].weight.shape == (10, 784)
    assert n_params(model) == 7_840 + 10  # FoolsGold's 7,840 weights, plus the biases


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_maps_a_batch_to_logits(name: str) -> None:
    shape = (3, 32, 32) if name == "resnet18" else FMNIST
    model = build_model(name, shape, 10, MEAN * shape[0], STD * shape[0], seed=0).eval()
    out = model(torch.rand(4, *shape))
    assert out.shape == (4, 10) and out.dtype == torch.float32 and bool(out.isfinite().all())


@pytest.mark.parametrize("name", ["fltrust-cnn", "lenet", "softmax"])
def test_the_papers_models_train_on_fashion_mnist_shaped_batches(name: str) -> None:
    torch.manual_seed(0)
    x, y = torch.rand(16, *FMNIST), torch.arange(16) % 10  # (B, 1, 28, 28) in [0, 1], (B,)
    model = build_model(name, FMNIST, 10, MEAN, STD, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        loss0 = float(F.cross_entropy(model.eval()(x), y))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(60):  # memorise one batch: the loss must fall (lenet's dropout slows it)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    with torch.no_grad():
        loss1 = float(F.cross_entropy(model.eval()(x), y))
    assert all(not torch.equal(before[k], v) for k, v in model.state_dict().items()
               if v.is_floating_point() and not k.startswith("0."))  # every weight moved
    assert loss1 < 0.7 * loss0, (loss0, loss1)


@pytest.mark.parametrize("name", ["fltrust-cnn", "lenet", "softmax"])
def test_models_normalise_inside(name: str) -> None:
    model = build_model(name, FMNIST, 10, MEAN, STD, seed=0).eval()
    assert isinstance(model[0], Normalize) and not list(model[0].parameters())
    x = torch.rand(2, *FMNIST)
    torch.testing.assert_close(model(x), model[1]((x - MEAN[0]) / STD[0]))


def test_seeded_builds_are_identical() -> None:
    a, b = (build_model("fltrust-cnn", FMNIST, 10, MEAN, STD, seed=3) for _ in range(2))
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())


@pytest.mark.parametrize("name", sorted(MIN_SIDE))
def test_min_side_in_validation_matches_the_models(name: str) -> None:
    side = MIN_SIDE[name]
    out = build_model(name, (1, side, side), 10, MEAN, STD).eval()(torch.rand(1, 1, side, side))
    assert out.shape == (1, 10)
    with pytest.raises(RuntimeError), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns about the empty Linear before failing
        build_model(name, (1, side - 1, side - 1), 10, MEAN, STD).eval()(
            torch.rand(1, 1, side - 1, side - 1))


def test_unknown_model_names_the_known_ones() -> None:
    with pytest.raises(ConfigError) as err:
        build_model("lenet5", FMNIST, 10, MEAN, STD)
    msg = str(err.value)
    assert "'lenet5'" in msg
    for name in ("cnn", "mlp", "resnet18", "fltrust-cnn", "lenet", "softmax"):
        assert f"'{name}'" in msg


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_registered_model_is_a_config_value(name: str) -> None:
    data = {"name": "cifar10"} if name == "resnet18" else {"name": "fashion-mnist"}
    cfg = load_experiment({"dataset": data, "training": {"model": name}})
    assert cfg.training.model == name


def test_config_refuses_unknown_and_too_small_models() -> None:
    with pytest.raises(ConfigError, match="training.model"):
        load_experiment({"training": {"model": "lenet5"}})
    with pytest.raises(ConfigError, match="lenet needs images of at least 16x16"):
        load_experiment({"dataset": {"name": "digits", "image_size": 12},
                         "training": {"model": "lenet"},
                         "attack": {"trigger": {"size": 2, "margin": 1}}})
