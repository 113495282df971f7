"""A set of images with their labels: the unit every loader returns and every loop consumes.

Its own module so that the dataset loaders (`lab.data`, `lab.torchvision_data`) share it without
importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True)
class Split:
    x: Tensor  # (N, C, H, W) float32 in [0, 1]
    y: Tensor  # (N,) int64

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, index: Tensor) -> Split:
        return Split(self.x[index], self.y[index])
