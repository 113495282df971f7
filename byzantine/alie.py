"""ALIE, "A Little Is Enough" (Baruch, Baruch & Goldberg, NeurIPS 2019, arXiv:1902.06156).

Every attacker sends mu - z * sigma, with mu and sigma the coordinate-wise mean and standard
deviation of the honest updates it knows. z is the paper's z_max (its Algorithm 3): with n workers
of which f are malicious, s = floor(n / 2 + 1) - f workers must be won over, and
z_max = max { z : Phi(z) < (n - s) / n } = Phi^-1((n - s) / n).

Some public ports (Karimireddy et al.'s bucketing code, Blades) use (n - f - s) / (n - f) instead;
`z` overrides the formula either way.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def alie_z(num_clients: int, num_byzantine: int) -> float:
    """z_max = Phi^-1((n - s) / n) with s = floor(n / 2 + 1) - f (Baruch et al., Algorithm 3).

    Raises:
        ValueError: when f > n / 2, so that s < 1 (the attackers are a majority: no finite z).
    """
    n, f = num_clients, num_byzantine
    if n < 1 or f < 0:
        raise ValueError(f"alie_z: need n >= 1 and f >= 0, got n={n}, f={f}")
    s = n // 2 + 1 - f
    if s < 1:
        raise ValueError(f"alie_z: {f} of {n} clients are a majority (s = {s} < 1): no finite z_max")
    return float(torch.special.ndtri(torch.tensor((n - s) / n, dtype=torch.float64)))


def alie(benign: Tensor, own: Tensor, *, num_clients: int | None = None, z: float | None = None) -> Tensor:
    """(m, d) copies of mu - z * sigma over `benign` (k, d); m = own.shape[0].

    sigma is the sample standard deviation (ddof 1, as torch and ByzFL; ddof 0 when k = 1).

    Args:
        num_clients: n of the z formula; None = k + m (every row of the round).
        z: the factor; None = `alie_z(n, m)`.
    """
    k, m = benign.shape[0], own.shape[0]
    if k < 1:
        raise ValueError("alie: needs at least one known honest update")
    if z is None:
        z = alie_z(num_clients if num_clients is not None else k + m, m)
    if not math.isfinite(z):
        raise ValueError(f"alie: z must be finite, got {z}")
    mu = benign.mean(dim=0)  # (d,)
    sigma = benign.std(dim=0, correction=1 if k > 1 else 0)  # (d,)
    return (mu - z * sigma).expand(m, -1).clone()
