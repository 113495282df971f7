"""A3FL's trigger: optimised each round against the global model and an adversarially adapted copy.

Zhang et al., "A3FL: Adversarially Adaptive Backdoor Attacks to Federated Learning", NeurIPS 2023.
The attacker foresees that the server's training will try to forget its trigger: it copies the
global model, adapts the copy to unlearn the trigger (SGD on stamped images with their *true*
labels), and then moves the trigger so that both the global model and the adapted copy classify
stamped images as the target:

    min_delta  CE(f_global(x + delta), t) + lambda * CE(f_adapted(x + delta), t)

with signed-gradient steps on the pattern inside the trigger's mask, pixels kept in [0, 1].

Budget (CPU-feasible, `attack.a3fl_*`): `adversary_steps` SGD steps on one batch-sized draw each
to adapt the copy, then `trigger_steps` signed-gradient steps on the trigger; with the defaults
(5 + 10 steps of 32 images) that is about 25 extra forward/backward passes per attacker and
round. The paper re-adapts the copy every few of its hundreds of trigger steps; this budget adapts
it once per round. Both models run in eval mode (no dropout draws, BatchNorm statistics as
received), so the result depends only on the global model, the attacker's data and the seed.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lab.models import device_of
from lab.triggers import Trigger


@dataclass(frozen=True)
class A3FLBudget:
    trigger_steps: int
    trigger_lr: float
    adversary_steps: int
    adversary_weight: float
    batch_size: int
    adversary_lr: float


def _draw(pool: Tensor, labels: Tensor, batch_size: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    index = torch.randint(len(pool), (min(batch_size, len(pool)),), generator=gen)
    return pool[index], labels[index]


def adapted_copy(model: nn.Module, trigger: Trigger, x: Tensor, y: Tensor, steps: int, lr: float,
                 batch_size: int, gen: torch.Generator) -> nn.Module:
    """A copy of `model` trained `steps` SGD steps to classify stamped `x` (N, C, H, W) as their true
    labels `y` (N,): the defender's best response to the trigger. `model` is not modified."""
    adversary = copy.deepcopy(model).eval()
    opt = torch.optim.SGD(adversary.parameters(), lr=lr)
    device = device_of(model)
    for _ in range(steps):
        xb, yb = _draw(x, y, batch_size, gen)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(adversary(trigger.stamp(xb).to(device)), yb.to(device)).backward()
        opt.step()
    return adversary


def optimise_trigger(model: nn.Module, start: Trigger, x: Tensor, y: Tensor, target: int, budget: A3FLBudget,
                     gen: torch.Generator) -> Trigger:
    """A3FL's trigger for this round, from `start` (its mask is kept; its pattern is optimised).

    `x` (N, C, H, W), `y` (N,): the attacker's images the backdoor applies to (source class, or every
    non-target one). Returns `start` unchanged when there are none. `model` is not modified.
    """
    if len(x) == 0:
        return start
    was_training = model.training
    model.eval()
    device = device_of(model)
    adversary = adapted_copy(model, start, x, y, budget.adversary_steps, budget.adversary_lr, budget.batch_size,
                             gen)
    free = start.mask > 0  # (H, W) the pixels the trigger may change
    pattern = start.pattern.clone()
    for _ in range(budget.trigger_steps):
        xb, _ = _draw(x, y, budget.batch_size, gen)
        delta = pattern.clone().requires_grad_(True)
        stamped = Trigger(start.mask, delta).stamp(xb).to(device)
        want = torch.full((len(xb),), target, device=device)
        loss = F.cross_entropy(model(stamped), want)
        if budget.adversary_weight > 0:
            loss = loss + budget.adversary_weight * F.cross_entropy(adversary(stamped), want)
        (grad,) = torch.autograd.grad(loss, [delta])
        pattern = torch.where(free, (pattern - budget.trigger_lr * grad.sign()).clamp(0, 1), pattern)
    model.train(was_training)
    return Trigger(start.mask, pattern.detach())
