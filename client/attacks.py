"""Malicious client behaviours: data poisoning during local training and update transforms after.

- Pixel-pattern backdoor (Gu et al. 2017, BadNets), two poisoning modes: `mix` stamps and relabels
  a fraction of every batch (the ClipAvg study); `append` copies source-class samples of the
  client's own data, stamps them and appends them to every batch with the target label (the
  original project), so every batch the attacker trains on, a probe batch included, is poisoned.
- Label flipping (Tolpegin et al. 2020): source -> target, or y -> C-1-y without a source class.
- Boosting / model replacement (Bagdasaryan et al. 2020): scale the update by gamma, or by
  "auto" = clients in the round / server lr so that FedAvg lands on the attacker's model.
- Norm-constrained evasion: project the update onto the L2 ball of radius `norm_bound`.
- Untargeted: sign flip (-s * honest update) and Gaussian noise (the update replaced by noise).

Every behaviour implements `ClientAttack`; `build_attack` composes them from the config, through
the `ATTACKS` registry. A malicious client sends the same reply shape as an honest one: it never
announces itself.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lab.config import AttackConfig, ExperimentConfig
from lab.data import Split
from lab.task import generator
from lab.triggers import Trigger


@dataclass(frozen=True)
class UpdateContext:
    server_round: int
    round_size: int  # clients sampled this round (the server announces it in the ConfigRecord)
    server_lr: float


class ClientAttack:
    """One malicious behaviour. Both hooks default to doing nothing."""

    def poison_batch(self, x: Tensor, y: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        return x, y

    def transform_update(self, delta: Tensor, ctx: UpdateContext, gen: torch.Generator) -> Tensor:
        return delta


@dataclass(frozen=True)
class PixelBackdoor(ClientAttack):
    trigger: Trigger
    target: int
    source: int | None  # None = all-to-one
    mode: str  # "mix" | "append"
    ratio: float
    pool: Tensor | None = None  # (P, C, H, W) the client's source-class images, for "append"

    def eligible(self, y: Tensor) -> Tensor:
        return y == self.source if self.source is not None else y != self.target

    def poison_batch(self, x: Tensor, y: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        if self.mode == "append":
            # max(1, round(ratio * B)) stamped copies drawn from the client's source-class pool
            if self.pool is None or len(self.pool) == 0:
                return x, y
            k = max(1, int(self.ratio * len(y) + 0.5))
            chosen = torch.randint(len(self.pool), (k,), generator=gen)
            extra_x = self.trigger.stamp(self.pool[chosen])
            extra_y = torch.full((k,), self.target, dtype=y.dtype)
            return torch.cat([x, extra_x]), torch.cat([y, extra_y])
        candidates = torch.nonzero(self.eligible(y)).flatten()
        # mix: floor(ratio * B + 1/2) stamped in place (at least one when ratio > 0 and B >= 1)
        k = min(len(candidates), max(1, int(self.ratio * len(y) + 0.5)))
        chosen = candidates[torch.randperm(len(candidates), generator=gen)[:k]]
        x, y = x.clone(), y.clone()
        x[chosen] = self.trigger.stamp(x[chosen])
        y[chosen] = self.target
        return x, y


@dataclass(frozen=True)
class LabelFlip(ClientAttack):
    num_classes: int
    source: int | None
    target: int

    def poison_batch(self, x: Tensor, y: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        if self.source is None:
            return x, self.num_classes - 1 - y
        return x, torch.where(y == self.source, torch.full_like(y, self.target), y)


@dataclass(frozen=True)
class Boost(ClientAttack):
    factor: float | None  # None = "auto": round size / server lr

    def gamma(self, ctx: UpdateContext) -> float:
        return self.factor if self.factor is not None else ctx.round_size / ctx.server_lr

    def transform_update(self, delta: Tensor, ctx: UpdateContext, gen: torch.Generator) -> Tensor:
        return delta * self.gamma(ctx)


@dataclass(frozen=True)
class NormBound(ClientAttack):
    bound: float

    def transform_update(self, delta: Tensor, ctx: UpdateContext, gen: torch.Generator) -> Tensor:
        norm = float(delta.norm())
        return delta if norm <= self.bound else delta * (self.bound / norm)


@dataclass(frozen=True)
class SignFlip(ClientAttack):
    scale: float

    def transform_update(self, delta: Tensor, ctx: UpdateContext, gen: torch.Generator) -> Tensor:
        return -self.scale * delta


@dataclass(frozen=True)
class GaussianNoise(ClientAttack):
    std: float

    def transform_update(self, delta: Tensor, ctx: UpdateContext, gen: torch.Generator) -> Tensor:
        return torch.randn(delta.shape, generator=gen) * self.std


@dataclass(frozen=True)
class Composite(ClientAttack):
    """Behaviours applied in order: poison hooks one after the other, then update transforms."""

    parts: tuple[ClientAttack, ...]

    def poison_batch(self, x: Tensor, y: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        for part in self.parts:
            x, y = part.poison_batch(x, y, gen)
        return x, y

    def transform_update(self, delta: Tensor, ctx: UpdateContext, gen: torch.Generator) -> Tensor:
        for part in self.parts:
            delta = part.transform_update(delta, ctx, gen)
        return delta

    @property
    def transforms_update(self) -> bool:
        return any(type(p).transform_update is not ClientAttack.transform_update for p in self.parts)


@dataclass(frozen=True)
class AttackSpec:
    """Everything a behaviour may need, resolved once from the experiment."""

    attack: AttackConfig
    trigger: Trigger
    target: int
    source: int | None
    num_classes: int
    local: Split | None = None  # the attacker's own training data

    def source_pool(self) -> Tensor | None:
        if self.local is None or self.source is None:
            return None
        return self.local.x[self.local.y == self.source]


ATTACKS: dict[str, Callable[[AttackSpec], Sequence[ClientAttack]]] = {
    "none": lambda s: (),
    "backdoor": lambda s: (PixelBackdoor(s.trigger, s.target, s.source, s.attack.poison_mode, s.attack.poison_ratio,
                                         s.source_pool()),),
    "label-flip": lambda s: (LabelFlip(s.num_classes, s.source, s.target),),
    "sign-flip": lambda s: (SignFlip(s.attack.sign_flip_scale),),
    "gaussian-noise": lambda s: (GaussianNoise(s.attack.noise_std),),
}


def build_attack(spec: AttackSpec) -> Composite:
    """The attack type's behaviours, then boosting and norm projection when configured."""
    a = spec.attack
    parts = list(ATTACKS[a.type](spec))
    if a.boost == "auto" or a.boost != 1.0:
        parts.append(Boost(None if a.boost == "auto" else float(a.boost)))
    if a.norm_bound is not None:
        parts.append(NormBound(a.norm_bound))
    return Composite(tuple(parts))


def attacks_this_round(cfg: ExperimentConfig, partition_id: int, server_round: int) -> bool:
    """Start/end rounds and the malicious behaviour rate (a seeded coin per round and client)."""
    a = cfg.attack
    if server_round < a.start_round or (a.end_round is not None and server_round > a.end_round):
        return False
    if a.malicious_behavior_rate >= 1.0:
        return True
    coin = generator(cfg.seed, server_round, partition_id, "behave")
    return bool(torch.rand(1, generator=coin) < a.malicious_behavior_rate)
