"""How many clusters do n scalar scores form? Exact 1-D k-means and the gap statistic.

Tibshirani, Walther, Hastie, "Estimating the number of clusters in a data set via the gap
statistic", J. R. Statist. Soc. B 63(2), 2001. FLDetector (Zhang et al., KDD 2022) uses it on the
clients' suspicion scores: more than one cluster means an attack, and the 2-means split says who.

In one dimension the optimal k-means partition is a split of the sorted values into k contiguous
runs, so a dynamic programme finds it exactly (O(k n^2)): no random restarts, and the result does
not depend on the order of the clients.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

LOG_FLOOR = 1e-12  # W_k = 0 (k >= number of distinct values) would make log W_k = -inf


def kmeans_1d(x: Tensor, k: int) -> tuple[Tensor, float]:
    """Optimal k-means of the values `x` (n,): (labels (n,) int64 in [0, k), clusters ordered by
    value, and the within-cluster sum of squares W_k). Needs 1 <= k <= n."""
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"kmeans_1d: k={k} not in [1, {n}]")
    order = torch.argsort(x.to(torch.float64), stable=True)
    v = x.to(torch.float64)[order].tolist()
    s1 = [0.0] * (n + 1)
    s2 = [0.0] * (n + 1)
    for i, val in enumerate(v):
        s1[i + 1] = s1[i] + val
        s2[i + 1] = s2[i] + val * val

    def sse(a: int, b: int) -> float:  # values a..b-1 as one cluster
        m = b - a
        return max(0.0, s2[b] - s2[a] - (s1[b] - s1[a]) ** 2 / m)

    inf = math.inf
    cost = [[inf] * (n + 1) for _ in range(k + 1)]  # cost[j][i]: first i values in j clusters
    cut = [[0] * (n + 1) for _ in range(k + 1)]
    cost[0][0] = 0.0
    for j in range(1, k + 1):
        for i in range(j, n + 1):
            for a in range(j - 1, i):
                c = cost[j - 1][a] + sse(a, i)
                if c < cost[j][i]:
                    cost[j][i], cut[j][i] = c, a
    labels_sorted = [0] * n
    i = n
    for j in range(k, 0, -1):
        a = cut[j][i]
        for t in range(a, i):
            labels_sorted[t] = j - 1
        i = a
    labels = torch.empty(n, dtype=torch.int64)
    labels[order] = torch.tensor(labels_sorted, dtype=torch.int64)
    return labels, cost[k][n]


def gap_clusters(x: Tensor, generator: torch.Generator, *, k_max: int = 10, references: int = 20) -> int:
    """The number of clusters of the values `x` (n,) by the gap statistic.

    The values are min-max scaled to [0, 1]; each reference set is n uniform draws on [0, 1].
    Gap(k) = mean_b log W*_kb - log W_k, s_k = sd_b(log W*_kb) sqrt(1 + 1/B); the answer is the
    smallest k with Gap(k) >= Gap(k + 1) - s_{k + 1} (k_max if none). Constant values: 1.
    """
    n = x.shape[0]
    lo, hi = float(x.min()), float(x.max())
    if n < 2 or not hi > lo:
        return 1
    z = (x.to(torch.float64) - lo) / (hi - lo)
    k_max = min(k_max, n)
    refs = torch.rand(references, n, generator=generator, dtype=torch.float64)
    gaps, sds = [], []
    for k in range(1, k_max + 1):
        ref_logs = torch.tensor([math.log(max(kmeans_1d(r, k)[1], LOG_FLOOR)) for r in refs])
        gaps.append(float(ref_logs.mean()) - math.log(max(kmeans_1d(z, k)[1], LOG_FLOOR)))
        sds.append(float(ref_logs.std(correction=0)) * math.sqrt(1.0 + 1.0 / references))
    for k in range(1, k_max):
        if gaps[k - 1] >= gaps[k] - sds[k]:
            return k
    return k_max
