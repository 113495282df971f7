"""Models by name: small CNNs for digits/MNIST-sized inputs, the papers' networks (FLTrust's CNN,
FL-Defender's LeNet, FoolsGold's softmax regression) and a CIFAR-style ResNet-18.

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


def fltrust_cnn(shape: tuple[int, int, int], num_classes: int) -> nn.Sequential:
    """The FLTrust family's Fashion-MNIST CNN: conv 3x3x30 -> max-pool -> conv 3x3x50 -> max-pool
    -> FC 100 -> FC classes, ReLU after each conv and the hidden FC, no padding.

    Cao et al., NDSS 2021 (FLTrust), arXiv:2012.13995; FoundationFL (Fang et al., NDSS 2025)
    Table IX(a). Checked against the FLTrust code's MXNet `get_cnn` (valid convolutions, 2x2
    pools of stride 2). 139,960 parameters at 1x28x28 (28 -> 26 -> 13 -> 11 -> 5: FC 1250 -> 100);
    needs sides >= 10.
    """
    c, h, w = shape
    side_h, side_w = ((h - 2) // 2 - 2) // 2, ((w - 2) // 2 - 2) // 2
    return nn.Sequential(
        nn.Conv2d(c, 30, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(30, 50, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(50 * side_h * side_w, 100), nn.ReLU(),
        nn.Linear(100, num_classes),
    )


def lenet(shape: tuple[int, int, int], num_classes: int) -> nn.Sequential:
    """FL-Defender's LeNet-style CNN (the PyTorch MNIST example): conv 5x5x10 -> max-pool -> ReLU
    -> conv 5x5x20 -> dropout2d -> max-pool -> ReLU -> FC 50 -> ReLU -> dropout -> FC classes.

    Jebreel & Domingo-Ferrer, FL-Defender, Knowledge-Based Systems 2023 (arXiv:2207.00872); read
    from the authors' `CNNMNIST` (najeebjebreel/FL-Defender, models.py): valid convolutions, 2x2
    pools, dropout p=0.5 on the second conv's channels and on the hidden FC. Dropout acts in
    train mode only, so a client's update holds random masks that an eval-mode gradient inversion
    does not model. Their forward ends in log_softmax; this returns the logits, which gives the
    same cross-entropy. 21,840 parameters at 1x28x28 (28 -> 24 -> 12 -> 8 -> 4: FC 320 -> 50);
    needs sides >= 16.
    """
    c, h, w = shape
    side_h, side_w = ((h - 4) // 2 - 4) // 2, ((w - 4) // 2 - 4) // 2
    return nn.Sequential(
        nn.Conv2d(c, 10, 5), nn.MaxPool2d(2), nn.ReLU(),
        nn.Conv2d(10, 20, 5), nn.Dropout2d(0.5), nn.MaxPool2d(2), nn.ReLU(),
        nn.Flatten(),
        nn.Linear(20 * side_h * side_w, 50), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(50, num_classes),
    )


def softmax_regression(shape: tuple[int, int, int], num_classes: int) -> nn.Sequential:
    """Multinomial logistic regression: one linear layer on the flattened pixels (FoolsGold's
    MNIST model, Fung et al., RAID 2020, arXiv:1808.04866). 7,850 parameters at 1x28x28 (7,840
    weights + 10 biases); the analytic inversion's case, like `mlp`."""
    c, h, w = shape
    return nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, num_classes))


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
    "fltrust-cnn": fltrust_cnn,
    "lenet": lenet,
    "softmax": softmax_regression,
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
