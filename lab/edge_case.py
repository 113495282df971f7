"""Edge-case backdoor data: images from outside the task's distribution, labelled as the target.

Wang et al., "Attack of the Tails: Yes, You Really Can Backdoor Federated Learning", NeurIPS 2020.
The attacker trains on rare inputs that honest clients never hold (their MNIST task: ARDIS images
of 7 labelled 1), so nothing in the benign updates pushes back; ASR is the share of held-out
edge-case images the global model classifies as the target.

The lab's stand-in (ARDIS is not on this machine): Fashion-MNIST images of one class
(`attack.edge_case_class`, default 1 = trouser) against a digits task (digits, mnist,
emnist-digits), at the task's image size. These are further out of distribution than the paper's
tail examples; what they share with them is that no honest client has any. The attackers draw from
Fashion-MNIST's training split, the server's ASR uses its test split.

`EdgeCaseTrigger` carries the held-out images so that ASR evaluation (`lab.metrics.evaluate`,
`stamp` then count target predictions) needs no code of its own: its `stamp` returns those images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from lab.backdoor_validation import DIGIT_TASKS
from lab.config import AttackConfig, DatasetConfig
from lab.data import load_data
from lab.triggers import Trigger

EDGE_CASE_DATASET = "fashion-mnist"
__all__ = ["DIGIT_TASKS", "EdgeCaseTrigger", "edge_case_images", "edge_case_trigger"]


def edge_case_images(attack: AttackConfig, height: int, split: Literal["train", "test"]) -> Tensor:
    """(N, 1, height, height) Fashion-MNIST images of class `attack.edge_case_class`.

    Read from `/usr/share/datasets/fashion-mnist` (`apt-get install dataset-fashion-mnist`) or
    ./data, never downloaded: the attack is refused one line rather than fetched in a client.

    Raises:
        DataError: the Fashion-MNIST files are not there.
    """
    bundle = load_data(DatasetConfig(name=EDGE_CASE_DATASET, image_size=height, download=False,
                                     server_fraction=0.0), seed=0)
    part = bundle.train if split == "train" else bundle.test
    return part.x[part.y == attack.edge_case_class]


@dataclass(frozen=True)
class EdgeCaseTrigger(Trigger):
    """The 'triggered' inputs of an edge-case backdoor are the held-out edge-case images themselves."""

    images: Tensor  # (N, 1, H, W)

    def stamp(self, x: Tensor) -> Tensor:
        """The held-out edge-case images (N, 1, H, W), whatever `x` holds: ASR is their share
        classified as the target."""
        return self.images.to(x.dtype)


def edge_case_trigger(attack: AttackConfig, height: int, width: int) -> EdgeCaseTrigger:
    return EdgeCaseTrigger(torch.ones(height, width), torch.zeros(height, width),
                           edge_case_images(attack, height, "test"))
