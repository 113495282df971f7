"""IPM, inner-product manipulation (Xie, Koyejo & Gupta, "Fall of Empires", UAI 2019,
arXiv:1903.03936).

Every attacker sends -epsilon * mean(benign): for a small epsilon the rule's output keeps a small
norm but its inner product with the true mean turns negative once the attackers are many enough.
"""

from __future__ import annotations

from torch import Tensor


def ipm(benign: Tensor, own: Tensor, *, epsilon: float = 0.5) -> Tensor:
    """(m, d) copies of -epsilon * mean(benign) over `benign` (k, d); m = own.shape[0].

    Args:
        epsilon: > 0; 0.5 is Blades' default (Xie et al. study small and large values).
    """
    if benign.shape[0] < 1:
        raise ValueError("ipm: needs at least one known honest update")
    if not epsilon > 0:
        raise ValueError(f"ipm: epsilon must be > 0, got {epsilon}")
    return (-epsilon * benign.mean(dim=0)).expand(own.shape[0], -1).clone()
