"""Update-matrix attacks by their YAML name (`attack.type`), bound to the experiment's settings.

A `MatrixAttack` takes (benign (k, d), own (m, d), generator) and returns the m malicious updates.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from byzantine.alie import alie
from byzantine.fang import krum_attack, trim_attack
from byzantine.ipm import ipm
from byzantine.minmax import min_max, min_sum
from lab.config import AttackConfig, ExperimentConfig
from lab.errors import ConfigError

MatrixAttack = Callable[[Tensor, Tensor, torch.Generator], Tensor]


def rule_byzantine(cfg: ExperimentConfig) -> int | None:
    """The f of the server's rule when it is Krum-based: full knowledge includes the rule."""
    agg = cfg.federated.aggregator
    f = agg.params.get("num_byzantine") if agg.name in ("krum", "multi-krum", "bulyan") else None
    return None if f is None else int(f)


# name -> factory(attack settings, f of the server's Krum or None) -> MatrixAttack
MATRIX_ATTACKS: dict[str, Callable[[AttackConfig, int | None], MatrixAttack]] = {
    "alie": lambda a, f: lambda b, o, g: alie(b, o, z=a.alie_z),
    "ipm": lambda a, f: lambda b, o, g: ipm(b, o, epsilon=a.ipm_epsilon),
    "min-max": lambda a, f: lambda b, o, g: min_max(b, o, perturbation_kind=a.minmax_perturbation,
                                                    gamma_init=a.minmax_gamma_init),
    "min-sum": lambda a, f: lambda b, o, g: min_sum(b, o, perturbation_kind=a.minmax_perturbation,
                                                    gamma_init=a.minmax_gamma_init),
    "trim-attack": lambda a, f: lambda b, o, g: trim_attack(b, o, gen=g, extremes=a.trim_extremes,
                                                            sample=a.trim_sample),
    "krum-attack": lambda a, f: lambda b, o, g: krum_attack(b, o, num_byzantine=f),
}


def build_matrix_attack(attack: AttackConfig, krum_byzantine: int | None = None) -> MatrixAttack:
    """The attack `attack.type` names, with its hyperparameters.

    Args:
        krum_byzantine: the f the server's Krum assumes (krum-attack); None = the attackers' count.

    Raises:
        ConfigError: the type is not an update-matrix attack.
    """
    if attack.type not in MATRIX_ATTACKS:
        raise ConfigError(f"attack.type: {attack.type!r} is not an update-matrix attack; "
                          f"known: {sorted(MATRIX_ATTACKS)}")
    return MATRIX_ATTACKS[attack.type](attack, krum_byzantine)
