"""Models by name: a small CNN for digits/MNIST-sized inputs and a CIFAR-style ResNet-18.

Every model starts with a fixed `Normalize` layer holding the dataset's mean and std as buffers,
so callers feed [0, 1] pixels: triggers, reconstructions and PNGs all live in pixel space.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from lab.errors import ConfigError


class Normalize(nn.Module):
    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


def small_cnn(shape: tuple[int, int, int], num_classes: int) -> nn.Sequential:
    """Two 3x3 conv blocks + two FC layers (~100k parameters at 28x28); no BatchNorm."""
    c, h, w = shape
    return nn.Sequential(
        nn.Conv2d(c, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * (h // 4) * (w // 4), 64), nn.ReLU(),
        nn.Linear(64, num_classes),
    )


def mlp(shape: tuple[int, int, int], num_classes: int) -> nn.Sequential:
    """A fully-connected net whose first layer sees the raw input (the analytic attack's case)."""
    c, h, w = shape
    return nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, 256), nn.ReLU(),
                         nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, num_classes))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


def resnet18(shape: tuple[int, int, int], num_classes: int) -> nn.Sequential:
    """ResNet-18 for 32x32 inputs: 3x3 stem, no max-pool (He et al. 2016, CIFAR variant)."""
    c = shape[0]
    layers: list[nn.Module] = [nn.Conv2d(c, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU()]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes)]
    return nn.Sequential(*layers)


def device_of(model: nn.Module) -> torch.device:
    """Where the model's parameters live (CPU for a parameter-free module)."""
    return next(iter(model.parameters()), torch.zeros(0)).device


MODELS: dict[str, Callable[[tuple[int, int, int], int], nn.Module]] = {
    "cnn": small_cnn,
    "mlp": mlp,
    "resnet18": resnet18,
}


def build_model(
    name: str,
    shape: tuple[int, int, int],
    num_classes: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    seed: int | None = None,
) -> nn.Sequential:
    """`Normalize(mean, std)` followed by the named network; seeded init when `seed` is given."""
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}; known: {sorted(MODELS)}")
    if seed is not None:
        torch.manual_seed(seed)
    return nn.Sequential(Normalize(mean, std), MODELS[name](shape, num_classes))
