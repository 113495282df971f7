"""Inversion attacks by name, and `invert_entry`, the one call the CLI makes.

Each attack is a class with one `reconstruct(target: CapturedUpdate, model) -> Reconstruction`
method (breaching's shape); a factory per name builds it from a preset plus overrides:
- "inverting-gradients": Geiping et al., NeurIPS 2020 (`inversion.optimizer`);
- "analytic": closed form through a fully-connected first layer (`inversion.analytic`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from torch import nn

from inversion.analytic import AnalyticAttack
from inversion.optimizer import IG_PRESETS, InvertingGradients, ig_config
from inversion.types import InversionAttack, Progress, Reconstruction
from lab.capture import CapturedUpdate
from lab.errors import ConfigError

log = logging.getLogger(__name__)

# factory(preset, labels, num_images, progress, **overrides) -> attack
AttackFactory = Callable[..., InversionAttack]


def _inverting_gradients(preset: str, labels: str, num_images: int | None, progress: Progress | None,
                         **overrides: Any) -> InversionAttack:
    return InvertingGradients(ig_config(preset, **overrides), labels=labels, num_images=num_images,
                              progress=progress)


def _analytic(preset: str, labels: str, num_images: int | None, progress: Progress | None,
              **overrides: Any) -> InversionAttack:
    # No iterations to tune: every preset is the same closed form; only rel_tol may be overridden,
    # and the optimisation knobs a CLI passes through (None or not) are ignored.
    if preset not in IG_PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; known: {sorted(IG_PRESETS)}")
    rel_tol = overrides.pop("rel_tol", None)
    overrides.pop("device", None)  # a closed form: it runs where the entry's tensors are
    ignored = sorted(k for k, v in overrides.items() if v is not None)
    if ignored:
        log.info("analytic attack: ignoring optimisation parameters %s", ignored)
    return AnalyticAttack(labels=labels, num_images=num_images, **({"rel_tol": rel_tol} if rel_tol else {}))


ATTACKS: dict[str, AttackFactory] = {
    "inverting-gradients": _inverting_gradients,
    "analytic": _analytic,
}


def build_attack(name: str, preset: str = "fast-cpu", labels: str = "recovered", num_images: int | None = None,
                 progress: Progress | None = None, **overrides: Any) -> InversionAttack:
    """The named attack with `preset` and `overrides` applied.

    Raises:
        ConfigError: unknown attack, preset, labels source or parameter.
    """
    if name not in ATTACKS:
        raise ConfigError(f"unknown inversion attack {name!r}; known: {sorted(ATTACKS)}")
    return ATTACKS[name](preset, labels, num_images, progress, **overrides)


def invert_entry(entry: CapturedUpdate, model: nn.Module, attack: str = "inverting-gradients",
                 preset: str = "fast-cpu", labels: str = "recovered", num_images: int | None = None,
                 progress: Progress | None = None, **overrides: Any) -> Reconstruction:
    """Reconstruct the client's images from one capture entry.

    `model` is the architecture (any weights; it is copied and loaded with the entry's global
    state, never modified). `labels` is "known" (the entry's, when the threat model grants them)
    or "recovered" (iDLG / bias-corrected from the update). Overrides such as iterations=,
    restarts=, tv=, lr=, seed=, vectorize=, image_shape= replace the preset's values; None
    values are ignored. Ctrl-C during optimisation returns the best images so far
    (`interrupted=True`).

    Raises:
        ConfigError: unknown attack, preset, labels source or parameter.
        CaptureError: the entry does not fit the model, or labels="known" without labels.
        ValueError: the attack cannot run on this model (analytic without an FC first layer).
    """
    return build_attack(attack, preset, labels, num_images, progress, **overrides).reconstruct(entry, model)
