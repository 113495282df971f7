"""DeepSight: inspect what each local model does, cluster the models, drop the suspicious clusters.

Rieger, Nguyen, Miettinen, Sadeghi, "DeepSight: Mitigating Backdoor Attacks in Federated Learning
Through Deep Model Inspection", NDSS 2022 (arXiv:2201.00763).

Per round, with W_i = G + U_i the local models and P classes:

1. Threshold exceedings. NEUP of output neuron k: the update energy e_k = |Δb_k| + sum_j |ΔW_kj|
   of the output layer, c_k = e_k^2 / sum_l e_l^2. TE_i = #{k : c_k > xi}, xi = max(0.01, 1/P)
   * max_k c_k. A backdoor trains on few labels, so few neurons carry its energy: a model is
   labelled suspicious when TE_i <= median(TE) / 2.
2. Three views of each model, each clustered with HDBSCAN (min_cluster_size 2, min_samples 1):
   DDifs, DDif_{i,k} = (1/N) sum_x p_k(x; W_i) / p_k(x; G) over N random probe inputs x (uniform
   noise in [0, 1] pixel space, one set per seed, the same every round); the NEUPs; and the
   cosine distances of the output-layer bias updates. Each clustering gives a 0/1 "not in the
   same cluster" matrix (an HDBSCAN noise point is its own cluster); the final distance is the
   mean of (the seeds' mean DDif matrix, the NEUP matrix, the cosine matrix), clustered once more.
3. A cluster is accepted if the share of suspicious-labelled models in it is < tau (1/3); a noise
   point is accepted if it is not labelled suspicious itself.
4. Clipping: the accepted updates are scaled to at most the median L2 norm of all updates, then
   averaged. No accepted model: the update is zero (the global model stays), with a WARNING.

The public codes (FLPoison, BackFed) divide raw network outputs; the paper divides predicted
probabilities, as here. The paper's 20,000 probe inputs per seed cost (n + 1) x 3 x 20,000
forward passes a round; the default here is 2,000 (`num_samples`) so that a CPU round stays in
seconds on the lab's small models. The model forward comes from `AggregatorContext.model` (the
server's `ModelSpec`): without it the rule fails at its first round, not at build time, because
config checks build rules without a model.
"""

from __future__ import annotations

import logging

import torch
from sklearn.cluster import HDBSCAN
from torch import Tensor, nn

from lab.errors import AggregationError, ConfigError
from lab.records import ParamLayout
from strategies.clipping import clip_factors, round_generator
from strategies.flame import cosine_distances
from strategies.kernels import gram_matrix, require_clients
from strategies.types import Aggregate, AggregatorContext, RoundInfo

log = logging.getLogger(__name__)

PROBE_BATCH = 500
PROB_FLOOR = 1e-12  # p_k(x; G) underflowing to 0 must not divide by zero


def output_layer(layout: ParamLayout) -> tuple[slice, slice | None, int]:
    """(weight slice, bias slice or None, P) of the output layer: the last 2-D weight and the
    entry named like it with "bias" for "weight"."""
    slices = layout.slices()
    last = next((e for e in reversed(layout.entries) if e.floating and len(e.shape) == 2), None)
    if last is None:
        raise ConfigError("deepsight: the model has no 2-D output layer weight")
    bias_key = last.key[: -len("weight")] + "bias" if last.key.endswith("weight") else None
    return slices[last.key], slices.get(bias_key) if bias_key else None, last.shape[0]


def neups_and_te(weight_update: Tensor, bias_update: Tensor | None) -> tuple[Tensor, Tensor]:
    """NEUPs (n, P) and threshold exceedings (n,) from the output layer's updates (n, P, h), (n, P)."""
    energy = weight_update.abs().sum(dim=2).to(torch.float64)  # (n, P)
    if bias_update is not None:
        energy = energy + bias_update.abs().to(torch.float64)
    sq = energy.square()
    total = sq.sum(dim=1, keepdim=True)
    p = sq.shape[1]
    neups = torch.where(total > 0, sq / total.clamp_min(1e-300), torch.full_like(sq, 1.0 / p))
    xi = max(0.01, 1.0 / p) * neups.amax(dim=1, keepdim=True)
    return neups, (neups > xi).sum(dim=1)


def cluster_labels(x: Tensor, precomputed: bool = False, single: bool = False) -> Tensor:
    """(n,) HDBSCAN labels (-1 = noise) of the rows of `x` (n, k), or of the distances `x` (n, n)."""
    n = x.shape[0]
    if n < 2:
        return torch.zeros(n, dtype=torch.int64)
    model = HDBSCAN(min_cluster_size=2, min_samples=1, allow_single_cluster=single,
                    metric="precomputed" if precomputed else "euclidean", copy=True)
    return torch.from_numpy(model.fit(x.to(torch.float64).numpy()).labels_).to(torch.int64)


def apart(labels: Tensor) -> Tensor:
    """(n, n) float64: 0 where two models share a cluster (noise points are alone), else 1."""
    same = (labels[:, None] == labels[None, :]) & (labels[:, None] >= 0)
    out = (~same).to(torch.float64)
    out.fill_diagonal_(0.0)
    return out


class DeepSight:
    """DeepSight (Rieger et al., NDSS 2022): see the module docstring.

    Suspicion (`Aggregate.suspicion`): 1[rejected] + (q_i + 1 - TE_i / max TE) / 4, with q_i the
    suspicious share of the client's cluster (its own label for a noise point): every rejected
    client ranks above every accepted one; within each, a more suspicious cluster, then fewer
    threshold exceedings, rank higher.
    """

    def __init__(self, ctx: AggregatorContext, *, tau: float = 1 / 3, num_seeds: int = 3,
                 num_samples: int = 2000) -> None:
        """Check the hyperparameters (ConfigError) and set up the rule.

        Args:
            tau: a cluster with a suspicious share below tau is accepted (0 < tau <= 1).
            num_seeds: probe sets (each its own DDif clustering).
            num_samples: probe inputs per seed (the paper: 20,000).
        """
        if not isinstance(tau, (int, float)) or isinstance(tau, bool) or not 0 < tau <= 1:
            raise ConfigError(f"deepsight: tau must be in (0, 1], got {tau!r}")
        for name, value in (("num_seeds", num_seeds), ("num_samples", num_samples)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"deepsight: {name} must be an integer >= 1, got {value!r}")
        if ctx.clients_per_round < 2:
            raise ConfigError(f"deepsight: clustering needs clients_per_round >= 2, got {ctx.clients_per_round}")
        self.tau, self.num_seeds, self.num_samples = float(tau), num_seeds, num_samples
        self.weight, self.bias, self.num_classes = output_layer(ctx.layout)
        self.layout = ctx.layout
        self.spec = ctx.model
        self.seed = ctx.seed
        self._net: nn.Module | None = None
        self._probes: list[Tensor] | None = None

    def __call__(self, updates: Tensor, info: RoundInfo) -> Aggregate:
        """`updates` is (n, d). Raises AggregationError for n < 2, or without the server's model
        (`AggregatorContext.model`) or the global model (`RoundInfo.global_params`)."""
        n = require_clients(updates, info, 2, "deepsight")
        if self.spec is None:
            raise AggregationError("deepsight: needs the server's model (AggregatorContext.model) for its DDifs")
        if info.global_params is None:
            raise AggregationError("deepsight: needs RoundInfo.global_params (the local models are G + U_i)")
        w_up = updates[:, self.weight].reshape(n, self.num_classes, -1)
        b_up = updates[:, self.bias] if self.bias is not None else None
        neups, te = neups_and_te(w_up, b_up)
        suspicious = te.to(torch.float64) <= torch.quantile(te.to(torch.float64), 0.5) / 2
        bias_feats = (b_up if b_up is not None else w_up.sum(dim=2)).to(torch.float64)
        ddifs = self.ddifs(updates, info.global_params)  # (seeds, n, P)
        merged = (torch.stack([apart(cluster_labels(dd)) for dd in ddifs]).mean(0)
                  + apart(cluster_labels(neups))
                  + apart(cluster_labels(cosine_distances(gram_matrix(bias_feats)), precomputed=True))) / 3
        final = cluster_labels(merged, precomputed=True, single=True)
        share = torch.empty(n, dtype=torch.float64)  # suspicious share of each client's cluster
        for i in range(n):
            members = final == final[i] if final[i] >= 0 else torch.arange(n) == i
            share[i] = suspicious[members].to(torch.float64).mean()
        accepted = share < self.tau
        norms = torch.linalg.vector_norm(updates, dim=1).to(torch.float64)
        s_t = float(torch.quantile(norms, 0.5))
        coef = torch.where(accepted, clip_factors(norms, s_t), torch.zeros_like(norms)) / max(int(accepted.sum()), 1)
        if not bool(accepted.any()):
            log.warning("deepsight: round %d: no cluster accepted; the update is zero", info.server_round)
        te_f = te.to(torch.float64)
        suspicion = (~accepted).to(torch.float64) + (share + 1 - te_f / te_f.max().clamp_min(1.0)) / 4
        log.debug("deepsight: te=%s suspicious=%s clusters=%s accepted=%s", te.tolist(), suspicious.tolist(),
                  final.tolist(), accepted.tolist())
        return Aggregate(
            update=coef.to(updates.dtype) @ updates,
            kept=accepted,
            clipped=accepted & (norms > s_t),
            weights=coef.to(updates.dtype),
            scores=te.to(updates.dtype),
            suspicion=suspicion,
            stats={"agg.accepted": float(accepted.sum()), "agg.labelled-suspicious": float(suspicious.sum()),
                   "agg.clusters": float(final[final >= 0].unique().numel()), "agg.median-norm": s_t},
        )

    def ddifs(self, updates: Tensor, global_params: Tensor) -> Tensor:
        """(seeds, n, P) float64 division differences of the local models G + U_i against G."""
        net = self._model()
        base = net.state_dict()
        g = global_params.reshape(-1).to(torch.float32)

        def probabilities(flat: Tensor) -> list[Tensor]:
            net.load_state_dict(self.layout.unflatten(flat, base))
            with torch.no_grad():
                return [torch.cat([torch.softmax(net(x).to(torch.float64), dim=1)
                                   for x in probes.split(PROBE_BATCH)]) for probes in self._probe_sets()]

        reference = [p.clamp_min(PROB_FLOOR) for p in probabilities(g)]  # per seed (N, P)
        out = torch.empty(self.num_seeds, updates.shape[0], self.num_classes, dtype=torch.float64)
        for i in range(updates.shape[0]):
            for s, p in enumerate(probabilities(g + updates[i])):
                out[s, i] = (p / reference[s]).mean(dim=0)
        # finite weights can still make a model output NaN (a negative BatchNorm variance from a
        # hostile client): such a model gets the largest ratio there is, an outlier, not a crash
        return torch.nan_to_num(out, nan=1 / PROB_FLOOR, posinf=1 / PROB_FLOOR, neginf=0.0)

    def _model(self) -> nn.Module:
        if self._net is None:
            assert self.spec is not None
            self._net = self.spec.build().cpu().eval()
        return self._net

    def _probe_sets(self) -> list[Tensor]:
        """The seeds' probe inputs (N, C, H, W) in [0, 1], drawn once from the experiment seed."""
        if self._probes is None:
            assert self.spec is not None
            self._probes = [torch.rand(self.num_samples, *self.spec.input_shape,
                                       generator=round_generator(self.seed, s, "deepsight-probes"))
                            for s in range(self.num_seeds)]
        return self._probes
