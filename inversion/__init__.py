"""Offline gradient inversion: reconstruct client images from captured updates (curious server).

`invert_entry(entry, model, attack, preset, labels, num_images, progress, **overrides)` is the
entry point; `ATTACKS` holds the attacks by name, `inversion.metrics` scores reconstructions.
"""

from inversion.attacks import ATTACKS, build_attack, invert_entry
from inversion.types import Reconstruction

__all__ = ["ATTACKS", "Reconstruction", "build_attack", "invert_entry"]
