"""Malicious client behaviours: data poisoning during local training and update transforms after.

- Pixel-pattern backdoor (Gu et al. 2017, BadNets), two poisoning modes: `mix` stamps and relabels
  a fraction of every batch (the ClipAvg study); `append` copies source-class samples of the
  client's own data (any non-target sample when there is no source class), stamps them and appends
  them to every batch with the target label (the original project), so every batch the attacker
  trains on, a probe batch included, is poisoned.
- Scaling (FoundationFL's and FLTrust's name): that backdoor with the update multiplied by the
  round size / server lr, i.e. `backdoor` + `boost: auto` as one named preset.
- Label flipping (Tolpegin et al. 2020): source -> target, or y -> C-1-y without a source class
  (l -> 9 - l on ten classes, FoundationFL's LF: set dataset.source_class to null).
- Boosting / model replacement (Bagdasaryan et al. 2020): scale the update by gamma, or by
  "auto" = clients in the round / server lr so that FedAvg lands on the attacker's model.
- Norm-constrained evasion: project the update onto the L2 ball of radius `norm_bound`.
- Untargeted: sign flip (-s * honest update) and Gaussian noise (the update replaced by noise).
- The update-matrix attacks of `byzantine/` (trim-attack, krum-attack, min-max, min-sum, alie,
  ipm). With `attack.knowledge: full` they run on the server side of the simulation
  (`byzantine.collusion`) and the client trains honestly; with `partial` the client knows only its
  own honest update and the attack runs here with benign = own = that one update. Only ipm means
  something then (-epsilon * its own update); validation refuses the others, whose formulas need
  the spread of several updates.
- The 2025 backdoors, each a `PixelBackdoor` with its own trigger: DBA (Xie et al., ICLR 2020,
  "DBA: Distributed Backdoor Attacks against Federated Learning") gives attacker i part i mod k of
  the global trigger (`Trigger.parts`; the server measures ASR with the whole one); Blended (Chen et
  al. 2017, arXiv:1712.05526) stamps a fixed noise image at opacity `blend_alpha`; A3FL (Zhang et
  al., NeurIPS 2023) optimises the trigger each round against the global model and an
  adversarially adapted copy (`client.a3fl`). Neurotoxin (Zhang et al., ICML 2022) is the backdoor
  with its update projected onto the coordinates the previous round's global change moved least
  (`MaskProjection`, `lab.update_masks`). What they know of the round: `client.round_knowledge`.
- Edge-case (Wang et al., NeurIPS 2020): out-of-distribution images (Fashion-MNIST, `lab.edge_case`)
  labelled as the target mixed into every batch (`EdgeCasePoison`).

Every behaviour implements `ClientAttack`; `build_attack` composes them from the config, through
the `ATTACKS` registry. A malicious client sends the same reply shape as an honest one: it never
announces itself.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from byzantine.registry import MatrixAttack, build_matrix_attack
from byzantine.schedule import attacks_this_round
from client.a3fl import A3FLBudget, optimise_trigger
from lab.config import AttackConfig
from lab.data import Split
from lab.edge_case import edge_case_images
from lab.triggers import Trigger
from lab.update_masks import least_changed_mask

# attacks_this_round moved to byzantine.schedule (the server-side colluder needs it too); it is
# re-exported here for client.app.
__all__ = [
    "ATTACKS",
    "AttackSpec",
    "Boost",
    "ClientAttack",
    "Composite",
    "EdgeCasePoison",
    "GaussianNoise",
    "LabelFlip",
    "MaskProjection",
    "NormBound",
    "OwnUpdateAttack",
    "PixelBackdoor",
    "SignFlip",
    "UpdateContext",
    "attacks_this_round",
    "build_attack",
]


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
    pool: Tensor | None = None  # (P, C, H, W) the client's source-class (or non-target) images, for "append"

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
class EdgeCasePoison(ClientAttack):
    """Edge-case backdoor (Wang et al., NeurIPS 2020): round(ratio * B) samples of each batch (at least
    one) replaced by random out-of-distribution images from `pool`, labelled `target`."""

    pool: Tensor  # (P, C, H, W)
    target: int
    ratio: float

    def poison_batch(self, x: Tensor, y: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        if len(self.pool) == 0 or len(y) == 0:
            return x, y
        k = min(len(y), max(1, int(self.ratio * len(y) + 0.5)))
        slots = torch.randperm(len(y), generator=gen)[:k]
        x, y = x.clone(), y.clone()
        x[slots] = self.pool[torch.randint(len(self.pool), (k,), generator=gen)].to(x.dtype)
        y[slots] = self.target
        return x, y


@dataclass(frozen=True)
class MaskProjection(ClientAttack):
    """Neurotoxin's projection: the update with every coordinate outside `keep` set to zero."""

    keep: Tensor  # (d,) bool

    def transform_update(self, delta: Tensor, ctx: UpdateContext, gen: torch.Generator) -> Tensor:
        return torch.where(self.keep, delta, torch.zeros_like(delta))


@dataclass(frozen=True)
class OwnUpdateAttack(ClientAttack):
    """An update-matrix attack with partial knowledge: the attacker knows its own honest update only."""

    attack: MatrixAttack

    def transform_update(self, delta: Tensor, ctx: UpdateContext, gen: torch.Generator) -> Tensor:
        own = delta[None]  # (1, d)
        return self.attack(own, own, gen)[0]


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
    # What the 2025 backdoors know of the round (client.round_knowledge fills these in the ClientApp).
    dba_rank: int = 0  # this attacker's index among the attackers: it plants part rank mod dba_parts
    dba_parts: int = 2
    global_model: nn.Module | None = None  # holds the round's global weights; A3FL reads it
    global_change: Tensor | None = None  # (d,) the previous round's global change, for Neurotoxin
    seed: int = 0  # A3FL's draws
    batch_size: int = 32
    lr: float = 0.05  # the local lr: A3FL adapts its copy of the global model with it

    def eligible_local(self) -> Split | None:
        """The attacker's samples the backdoor applies to: its source-class ones, or every
        non-target one for an all-to-one backdoor."""
        if self.local is None:
            return None
        keep = self.local.y == self.source if self.source is not None else self.local.y != self.target
        return self.local.subset(torch.nonzero(keep).flatten())

    def source_pool(self) -> Tensor | None:
        """The images that `append` copies: `eligible_local`'s."""
        eligible = self.eligible_local()
        return None if eligible is None else eligible.x


def _backdoor(s: AttackSpec, trigger: Trigger | None = None) -> PixelBackdoor:
    return PixelBackdoor(s.trigger if trigger is None else trigger, s.target, s.source, s.attack.poison_mode, s.attack.poison_ratio,
                         s.source_pool())


def _dba(s: AttackSpec) -> tuple[ClientAttack, ...]:
    return (_backdoor(s, s.trigger.parts(s.dba_parts)[s.dba_rank % s.dba_parts]),)


def _neurotoxin(s: AttackSpec) -> tuple[ClientAttack, ...]:
    """The backdoor, projected once the attacker knows a previous global change (from its 2nd round)."""
    if s.global_change is None:
        return (_backdoor(s),)
    return (_backdoor(s), MaskProjection(least_changed_mask(s.global_change, s.attack.neurotoxin_topk)))


def _a3fl(s: AttackSpec) -> tuple[ClientAttack, ...]:
    eligible = s.eligible_local()
    if s.global_model is None or eligible is None:
        return (_backdoor(s),)
    a = s.attack
    budget = A3FLBudget(a.a3fl_trigger_steps, a.a3fl_trigger_lr, a.a3fl_adversary_steps, a.a3fl_adversary_weight,
                        s.batch_size, s.lr)
    gen = torch.Generator().manual_seed(s.seed)
    trigger = optimise_trigger(s.global_model, s.trigger, eligible.x, eligible.y, s.target, budget, gen)
    return (_backdoor(s, trigger),)


def _matrix(s: AttackSpec) -> tuple[ClientAttack, ...]:
    """Full knowledge: nothing here (the server-side colluder crafts the row); partial: own update."""
    if s.attack.resolved_knowledge == "full":
        return ()
    return (OwnUpdateAttack(build_matrix_attack(s.attack)),)


ATTACKS: dict[str, Callable[[AttackSpec], Sequence[ClientAttack]]] = {
    "none": lambda s: (),
    "backdoor": lambda s: (_backdoor(s),),
    "scaling": lambda s: (_backdoor(s), Boost(None)),  # FoundationFL's Scaling: backdoor x n
    "label-flip": lambda s: (LabelFlip(s.num_classes, s.source, s.target),),
    "sign-flip": lambda s: (SignFlip(s.attack.sign_flip_scale),),
    "gaussian-noise": lambda s: (GaussianNoise(s.attack.noise_std),),
    "trim-attack": _matrix,
    "krum-attack": _matrix,
    "min-max": _matrix,
    "min-sum": _matrix,
    "alie": _matrix,
    "ipm": _matrix,
    "dba": _dba,
    "blended": lambda s: (_backdoor(s),),  # s.trigger is the blended one (lab.triggers.trigger_for)
    "neurotoxin": _neurotoxin,
    "a3fl": _a3fl,
    "edge-case": lambda s: (EdgeCasePoison(edge_case_images(s.attack, s.trigger.mask.shape[0], "train"), s.target,
                                           s.attack.poison_ratio),),
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
