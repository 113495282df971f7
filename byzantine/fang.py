"""Fang et al.'s full-knowledge attacks on Trimmed mean / Median and on Krum ("Local Model
Poisoning Attacks to Byzantine-Robust Federated Learning", USENIX Security 2020, arXiv:1911.11815).

Written in update space (update = local model - global model w_Re), which is the paper's setting
shifted by w_Re: the paper's w_Re - lambda * s is the update -lambda * s, and D(w_i, w_Re) is
||update_i||. s_j is the sign of the j-th global parameter's change with no attack: the sign of the
mean of every honest update the adversary knows (the benign ones and its own before-attack ones).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def direction(benign: Tensor, own: Tensor) -> Tensor:
    """(d,) s = sign of the mean honest update (benign and own rows together), in {-1, 0, 1}."""
    return torch.sign(torch.cat([benign, own]).mean(dim=0))


def trim_attack(benign: Tensor, own: Tensor, *, gen: torch.Generator | None = None, b: float = 2.0,
                extremes: str = "benign", sample: str = "uniform") -> Tensor:
    """Fang et al.'s Trim attack (against Trimmed mean and Median), full knowledge: (m, d).

    Per coordinate j, with w_max,j / w_min,j the largest / smallest benign value: where s_j = -1
    each attacker samples uniformly in [w_max,j, b * w_max,j] (w_max,j > 0) or [w_max,j, w_max,j / b]
    (otherwise); where s_j = 1, in [w_min,j / b, w_min,j] (w_min,j > 0) or [b * w_min,j, w_min,j]
    (otherwise): beyond the benign extreme, against the direction the model would move. Where
    s_j = 0 the attackers send 0. The paper uses b = 2.

    Public code reads the paper two other ways, kept as options so that a result can be checked
    against each: the FLTrust family's scripts take w_max / w_min over every client's honest
    gradient, the attackers' own included (`extremes="all"`), and one of Fang et al.'s own scripts
    sends the far end of the interval instead of a uniform sample (`sample="farthest"`: b * w_max,
    w_max / b, ...). On FoundationFL's FedAvg x Trim cell neither moved the accuracy path by more
    than 0.05 over 400 rounds (bench/RESULTS.md, issue 14).

    Args:
        gen: the random generator for the uniform samples (seeded by the caller).
        b: > 1, how far beyond the benign extreme the values may go.
        extremes: "benign" (the paper: the benign devices' extremes) or "all" (benign and own rows).
        sample: "uniform" (the paper) or "farthest" (the interval's end away from the extreme).
    """
    if benign.shape[0] < 1:
        raise ValueError("trim_attack: needs at least one benign update")
    if not b > 1:
        raise ValueError(f"trim_attack: b must be > 1, got {b}")
    if extremes not in ("benign", "all") or sample not in ("uniform", "farthest"):
        raise ValueError(f"trim_attack: extremes must be benign|all and sample uniform|farthest, "
                         f"got {extremes!r}, {sample!r}")
    m, d = own.shape[0], benign.shape[1]
    s = direction(benign, own)  # (d,)
    known = benign if extremes == "benign" else torch.cat([benign, own])
    hi, lo = known.max(dim=0).values, known.min(dim=0).values  # (d,)
    # s = -1: the interval [a, a * b] or [a / b, a] above w_max; s = 1: below w_min. up_hi and
    # down_lo are the far ends.
    up_lo, up_hi = hi, torch.where(hi > 0, hi * b, hi / b)
    down_lo, down_hi = torch.where(lo > 0, lo / b, lo * b), lo
    if sample == "farthest":
        up, down = up_hi.expand(m, d), down_lo.expand(m, d)
    else:
        u = torch.rand((m, d), generator=gen, dtype=benign.dtype)  # (m, d) uniform in [0, 1)
        up = up_lo + u * (up_hi - up_lo)
        down = down_lo + u * (down_hi - down_lo)
    return torch.where(s < 0, up, torch.where(s > 0, down, torch.zeros_like(up)))


def krum_lambda_bound(benign: Tensor, num_clients: int, num_byzantine: int) -> float:
    """The upper bound on lambda of Fang et al.'s Theorem 1 (in update space):

    1 / ((n - 2c - 1) sqrt(d)) * min_i sum_{l in N_i} ||w_l - w_i|| + max_i ||w_i|| / sqrt(d),

    over the benign updates w_i, with N_i the n - c - 2 benign updates nearest to w_i.
    """
    n, c = num_clients, num_byzantine
    k, d = benign.shape
    if n - 2 * c - 1 < 1 or n - c - 2 < 1 or k != n - c:
        raise ValueError(f"krum_attack: needs n > 2c + 2 and n - c benign updates, got n={n}, c={c}, {k} benign")
    dist = torch.cdist(benign, benign).double()  # (k, k) Euclidean
    dist.fill_diagonal_(float("inf"))
    near = torch.topk(dist, n - c - 2, dim=1, largest=False).values.sum(dim=1)  # (k,)
    return float(near.min() / ((n - 2 * c - 1) * math.sqrt(d)) + benign.norm(dim=1).double().max() / math.sqrt(d))


def krum_selects_malicious(benign: Tensor, s: Tensor, lam: float, m: int, num_byzantine: int,
                           benign_dist: Tensor | None = None) -> bool:
    """Does Krum (n - f - 2 nearest neighbours, Blanchard et al. 2017) pick one of m copies of
    -lam * s among `benign` (k, d)? Ties go to the benign rows (they come first).

    `benign_dist`, the (k, k) squared benign distances, may be passed to save its computation.
    """
    k = benign.shape[0]
    n = k + m
    if benign_dist is None:
        benign_dist = torch.cdist(benign, benign).double().pow(2)
    sq, bs, ss = benign.pow(2).sum(1).double(), (benign @ s).double(), float(s @ s)
    to_mal = (sq + 2 * lam * bs + lam**2 * ss).clamp_min(0)  # (k,) squared distances to -lam * s
    dist = torch.zeros((n, n), dtype=torch.float64)  # the copies are at distance 0 from each other
    dist[:k, :k] = benign_dist
    dist[:k, k:] = to_mal[:, None]
    dist[k:, :k] = to_mal[None, :]
    dist.fill_diagonal_(float("inf"))
    neighbours = max(1, min(n - num_byzantine - 2, n - 1))
    scores = torch.topk(dist, neighbours, dim=1, largest=False).values.sum(dim=1)  # (n,)
    return int(torch.argmin(scores)) >= k


def krum_attack(benign: Tensor, own: Tensor, *, num_byzantine: int | None = None,
                threshold: float = 1e-5) -> Tensor:
    """Fang et al.'s Krum attack, full knowledge: (m, d) copies of -lambda * s.

    lambda starts at `krum_lambda_bound` and is halved until Krum, run on the benign updates and
    the m crafted ones, selects a crafted one, or lambda falls below `threshold` (then that last,
    untested lambda is used). The paper draws the other c - 1 crafted models in a small ball around
    the first; here they are identical copies (radius 0), which only helps them be selected.

    Args:
        num_byzantine: f the server's Krum assumes; None = m, the paper's c.
        threshold: the smallest lambda tried (the paper's 1e-5).
    """
    k, m = benign.shape[0], own.shape[0]
    if k < 1:
        raise ValueError("krum_attack: needs at least one benign update")
    f = m if num_byzantine is None else num_byzantine
    s = direction(benign, own)  # (d,)
    lam = krum_lambda_bound(benign, k + m, m)
    benign_dist = torch.cdist(benign, benign).double().pow(2)  # (k, k)
    while lam >= threshold and not krum_selects_malicious(benign, s, lam, m, f, benign_dist):
        lam /= 2
    return (-lam * s).to(benign.dtype).expand(m, -1).clone()
