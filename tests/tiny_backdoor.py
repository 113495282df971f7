"""A tiny backdoored digits model for the unlearning tests (built in-process, no Flower run)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lab.config import ExperimentConfig
from lab.data import DataBundle, load_data
from lab.task import LocalHyperparams, build_for, generator, train_local
from lab.triggers import Trigger, make_trigger

TINY: dict[str, Any] = {
    "name": "tiny", "dataset": {"name": "digits", "image_size": 16, "source_class": 1, "target_class": 0},
    "training": {"model": "cnn", "seed": 0},
    "attack": {"type": "backdoor", "attackers_ratio": 0.3, "trigger": {"size": 3, "position": "bottom-right"}},
}


def train_tiny_backdoor(cfg: ExperimentConfig) -> tuple[DataBundle, Trigger, nn.Module]:
    """A 16x16 CNN trained 300 SGD steps with 20 % of every batch stamped and relabelled to 0."""
    torch.set_num_threads(1)
    data = load_data(cfg.dataset, cfg.seed)
    trig = make_trigger(cfg.attack.trigger, 16, 16)
    model = build_for(cfg, data, seed=0)

    def poison(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        k = len(y) // 5
        x, y = x.clone(), y.clone()
        x[:k], y[:k] = trig.stamp(x[:k]), 0
        return x, y

    train_local(model, data.train, LocalHyperparams(1, 300, 32, 0.05, 0.9, 0.0), generator(0, "tiny"), poison)
    return data, trig, model
