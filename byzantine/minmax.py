"""Min-Max and Min-Sum, the AGR-agnostic attacks of Shejwalkar & Houmansadr ("Manipulating the
Byzantine: Optimizing Model Poisoning Attacks and Defenses for Federated Learning", NDSS 2021).

The malicious update is grad_m = grad_b + gamma * grad_p: grad_b the mean of the known benign
updates, grad_p a perturbation (`unit-vec`: -grad_b / ||grad_b||, `sign`: -sign(grad_b), `std`:
-the coordinate-wise standard deviation), and gamma the largest value that keeps grad_m inside the
benign cloud:

- Min-Max: max_i ||grad_m - grad_i|| <= max_{i,j} ||grad_i - grad_j||
- Min-Sum: sum_i ||grad_m - grad_i||^2 <= max_i sum_j ||grad_i - grad_j||^2

gamma comes from the paper's search (its Algorithm 1): start at gamma_init, step gamma_init / 2,
move up after a success and down after a failure, halve the step, stop when the last success and
the current gamma are within tau, and return the last *success*. One public port compares squared
distances against an unsquared maximum; here both sides of each test are the same quantity.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

PERTURBATIONS = ("unit-vec", "sign", "std")


def perturbation(benign: Tensor, kind: str) -> Tensor:
    """(d,) grad_p of `benign` (k, d): -unit vector of the mean, -sign of the mean, or -std."""
    mu = benign.mean(dim=0)
    if kind == "unit-vec":
        norm = mu.norm()
        return -mu / norm if norm > 0 else torch.zeros_like(mu)
    if kind == "sign":
        return -torch.sign(mu)
    if kind == "std":
        return -benign.std(dim=0, correction=1 if benign.shape[0] > 1 else 0)
    raise ValueError(f"unknown perturbation {kind!r}; known: {', '.join(PERTURBATIONS)}")


def search_gamma(feasible: Callable[[float], bool], gamma_init: float = 10.0, tau: float = 1e-5) -> float:
    """Shejwalkar & Houmansadr's Algorithm 1: the largest feasible gamma in [0, 2 * gamma_init),
    to within tau, assuming the feasible set is an interval starting at 0; 0 if none is found."""
    if not (gamma_init > 0 and tau > 0):
        raise ValueError(f"search_gamma: gamma_init and tau must be > 0, got {gamma_init}, {tau}")
    gamma, step, success = gamma_init, gamma_init / 2, 0.0
    while abs(success - gamma) > tau:
        if feasible(gamma):
            success = gamma
            gamma += step
        else:
            gamma -= step
        step /= 2
    return success


def _quadratic(benign: Tensor, p: Tensor) -> tuple[Tensor, Tensor, float]:
    """For a_i = grad_b - grad_i: ||a_i + gamma p||^2 = sq_i + 2 gamma ap_i + gamma^2 pp.
    Returns (sq (k,), ap (k,), pp) as float64: each test of gamma is then O(k), not O(k d)."""
    a = benign.mean(dim=0) - benign  # (k, d)
    return a.pow(2).sum(1).double(), (a @ p).double(), float(p @ p)


def _craft(benign: Tensor, own: Tensor, gamma: float, p: Tensor) -> Tensor:
    return (benign.mean(dim=0) + gamma * p).expand(own.shape[0], -1).clone()


def min_max(benign: Tensor, own: Tensor, *, perturbation_kind: str = "unit-vec", gamma_init: float = 10.0,
            tau: float = 1e-5) -> Tensor:
    """Min-Max: (m, d) copies of grad_b + gamma * grad_p, the largest gamma whose distance to every
    benign update is at most the largest benign pairwise distance. `benign` is (k, d), k >= 1."""
    if benign.shape[0] < 1:
        raise ValueError("min_max: needs at least one known honest update")
    p = perturbation(benign, perturbation_kind)
    bound = float(torch.cdist(benign, benign).double().pow(2).max())  # max_ij ||g_i - g_j||^2
    sq, ap, pp = _quadratic(benign, p)

    def feasible(gamma: float) -> bool:
        return float((sq + 2 * gamma * ap + gamma**2 * pp).max()) <= bound

    return _craft(benign, own, search_gamma(feasible, gamma_init, tau), p)


def min_sum(benign: Tensor, own: Tensor, *, perturbation_kind: str = "unit-vec", gamma_init: float = 10.0,
            tau: float = 1e-5) -> Tensor:
    """Min-Sum: (m, d) copies of grad_b + gamma * grad_p, the largest gamma whose sum of squared
    distances to the benign updates is at most the largest such sum of a benign update."""
    if benign.shape[0] < 1:
        raise ValueError("min_sum: needs at least one known honest update")
    p = perturbation(benign, perturbation_kind)
    bound = float(torch.cdist(benign, benign).double().pow(2).sum(dim=1).max())
    sq, ap, pp = _quadratic(benign, p)

    def feasible(gamma: float) -> bool:
        return float((sq + 2 * gamma * ap + gamma**2 * pp).sum()) <= bound

    return _craft(benign, own, search_gamma(feasible, gamma_init, tau), p)
