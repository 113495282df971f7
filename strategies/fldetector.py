"""FLDetector: predict each client's update from its last one, and flag the clients that keep
disagreeing with the prediction.

Zhang, Fang, Cao, Jia, Gong, "FLDetector: Defending Federated Learning Against Model Poisoning
Attacks via Detecting Malicious Clients", KDD 2022 (arXiv:2207.09209).

Round t, global model G_t, client i's update U_i^t (an update is minus a step along a gradient,
so the Hessian below is that of the update map; the L-BFGS formula is odd in the y's, so the
sign needs no special care):

1. Hessian-vector product by L-BFGS (Byrd, Nocedal, Schnabel 1994, compact form) from the last N
   pairs s_r = G_r - G_r' (r' the round before r) and y_r = g_r - g_r' of global-model and
   global-update differences (g_r = this rule's aggregate of round r):
   B v = sigma v - [sigma S, Y] M^-1 [sigma S^T v; Y^T v], M = [[sigma S^T S, L], [L^T, -D]],
   L = strictly lower part of S^T Y, D = its diagonal, sigma = y_last^T s_last / s_last^T s_last.
2. Prediction U_i^t ~ U_i^tau + B (G_t - G_tau), tau = the last round client i was seen (the
   paper has every client every round: tau = t - 1; with sampling the model difference is the sum
   of the steps since tau, known while those rounds are in the window).
3. d_i = ||prediction - U_i^t||, normalised over the round's predicted clients (d / sum d); the
   suspicion score s_i is the mean of the client's last N normalised d's.
4. From the `warmup`-th round with predictions on: if the gap statistic finds more than one
   cluster among the scores (`strategies.gap_statistic`), the 2-means cluster with the larger mean
   is malicious. The paper then removes those clients and restarts training; a rule cannot
   restart the run, so it removes them: from this round on (`ban`, default) or this round only.
5. update = mean of the remaining clients' updates (the paper's base rule is FedAvg).

State (checkpointed, `Checkpointable`): the last global model and aggregate, the last N steps and
pairs, each client's last update and round, score window and the removed clients.
Memory: one d-vector per client ever seen plus 2N + 2 more (see bench/RESULTS.md).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from torch import Tensor

from lab.errors import AggregationError, ConfigError
from strategies.clipping import round_generator
from strategies.gap_statistic import gap_clusters, kmeans_1d
from strategies.kernels import require_clients
from strategies.types import Aggregate, AggregatorContext, RoundInfo

log = logging.getLogger(__name__)


def lbfgs_hvp(s: Tensor, y: Tensor, v: Tensor) -> Tensor:
    """(d,) L-BFGS approximation B v of the Hessian times `v` (d,) from the pairs `s`, `y` (m, d),
    oldest first (compact form, see the module docstring). M is solved by least squares, so
    collinear pairs give the minimum-norm answer rather than an error."""
    ss = (s @ s.T).to(torch.float64)  # (m, m)
    sy = (s @ y.T).to(torch.float64)  # (m, m): s_i . y_j
    sigma = float(sy[-1, -1] / ss[-1, -1])
    low = torch.tril(sy, diagonal=-1)
    m_mat = torch.cat([torch.cat([sigma * ss, low], 1), torch.cat([low.T, -torch.diag(sy.diagonal())], 1)], 0)
    rhs = torch.cat([sigma * (s @ v).to(torch.float64), (y @ v).to(torch.float64)])  # (2m,)
    p = torch.linalg.lstsq(m_mat, rhs[:, None]).solution.squeeze(1)
    m = s.shape[0]
    coef_s, coef_y = (sigma * p[:m]).to(v.dtype), p[m:].to(v.dtype)
    return sigma * v - coef_s @ s - coef_y @ y


class FLDetector:
    """FLDetector (Zhang et al., KDD 2022): see the module docstring.

    Suspicion (`Aggregate.suspicion`): the window-mean normalised prediction error s_i, plus 1 for
    a client removed this round (so the removed rank first). A client with no prediction yet gets
    the round's mean score (0 before any prediction).
    """

    def __init__(self, ctx: AggregatorContext, *, window: int = 10, warmup: int = 3, ban: bool = True,
                 references: int = 20) -> None:
        """Check the hyperparameters (ConfigError) and set up the rule.

        Args:
            window: N, the pairs kept for L-BFGS and the rounds averaged in a client's score.
            warmup: rounds with predictions before the first detection (>= 1).
            ban: a detected client stays removed for the rest of the run (the paper's removal).
            references: uniform reference sets of the gap statistic.
        """
        for name, value, low in (("window", window, 1), ("warmup", warmup, 1), ("references", references, 2)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"fldetector: {name} must be an integer >= {low}, got {value!r}")
        if ctx.clients_per_round < 3:
            raise ConfigError(f"fldetector: needs clients_per_round >= 3 (two clusters and a majority), "
                              f"got {ctx.clients_per_round}")
        self.window, self.warmup, self.ban, self.references = window, warmup, ban, references
        self.seed = ctx.seed
        self.num_params = ctx.layout.num_params
        self.last_global: Tensor | None = None
        self.last_aggregate: Tensor | None = None
        self.last_round = -1
        self.steps: dict[int, Tensor] = {}  # round r -> s_r = G_r - G of the call before
        self.pairs: dict[int, Tensor] = {}  # round r -> y_r (only where s_r and y_r are both nonzero)
        self.updates: dict[int, Tensor] = {}  # client -> its last update
        self.seen: dict[int, int] = {}  # client -> the round of that update
        self.window_scores: dict[int, Tensor] = {}  # client -> (<= N,) normalised errors, oldest first
        self.predicted_rounds = 0
        self.banned: set[int] = set()

    # ------------------------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Tensor]:
        state: dict[str, Tensor] = {
            "meta": torch.tensor([self.last_round, self.predicted_rounds], dtype=torch.int64),
            "banned": torch.tensor(sorted(self.banned), dtype=torch.int64),
        }
        if self.last_global is not None and self.last_aggregate is not None:
            state["last.global"], state["last.aggregate"] = self.last_global, self.last_aggregate
        state |= {f"step.{r}": s for r, s in self.steps.items()}
        state |= {f"pair.{r}": y for r, y in self.pairs.items()}
        state |= {f"update.{c}": u for c, u in self.updates.items()}
        state |= {f"seen.{c}": torch.tensor([r], dtype=torch.int64) for c, r in self.seen.items()}
        state |= {f"scores.{c}": s for c, s in self.window_scores.items()}
        return {k: v.clone() for k, v in state.items()}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        def group(prefix: str) -> dict[int, Tensor]:
            return {int(k.removeprefix(prefix)): v.clone() for k, v in state.items() if k.startswith(prefix)}

        self.last_round, self.predicted_rounds = (int(x) for x in state["meta"].tolist())
        self.banned = {int(c) for c in state["banned"].tolist()}
        self.last_global = state["last.global"].clone() if "last.global" in state else None
        self.last_aggregate = state["last.aggregate"].clone() if "last.aggregate" in state else None
        self.steps, self.pairs = group("step."), group("pair.")
        self.updates, self.window_scores = group("update."), group("scores.")
        self.seen = {c: int(r.item()) for c, r in group("seen.").items()}

    # ------------------------------------------------------------------------------------ round

    def __call__(self, updates: Tensor, info: RoundInfo) -> Aggregate:
        """`updates` is (n, d). Raises AggregationError for n < 1, duplicate client ids, a missing
        global model, or a round in which every client has been removed."""
        n = require_clients(updates, info, 1, "fldetector")
        ids = info.client_ids
        if len(set(ids)) != n:
            raise AggregationError(f"fldetector: duplicate client ids in one round: {ids}")
        if info.global_params is None:
            raise AggregationError("fldetector: needs RoundInfo.global_params (the model differences)")
        if updates.shape[1] != self.num_params:
            raise AggregationError(f"fldetector: updates have {updates.shape[1]} params, layout has {self.num_params}")
        g = info.global_params.reshape(-1).to(torch.float32)
        t = info.server_round
        if self.last_global is not None:
            self.steps[t] = g - self.last_global
        errors = self._prediction_errors(updates, ids, t)  # client -> d_i (unnormalised)
        if errors:
            total = sum(errors.values())
            self.predicted_rounds += 1
            for cid, d in errors.items():
                norm_d = torch.tensor([d / total if total > 0 else 0.0], dtype=torch.float64)
                prev = self.window_scores.get(cid, torch.zeros(0, dtype=torch.float64))
                self.window_scores[cid] = torch.cat([prev, norm_d])[-self.window :]
        scored = {cid: float(self.window_scores[cid].mean()) for cid in ids if cid in self.window_scores}
        flagged = self._detect(scored, t) if self.predicted_rounds >= self.warmup else set()
        if self.ban:
            self.banned |= flagged
        removed = torch.tensor([cid in flagged or cid in self.banned for cid in ids])
        if bool(removed.all()):
            raise AggregationError(f"fldetector: every client of round {t} has been removed")
        kept = ~removed
        w = kept.to(torch.float64) / kept.sum()
        update = w.to(updates.dtype) @ updates
        self._remember(updates, ids, g, update, t)
        fill = sum(scored.values()) / len(scored) if scored else 0.0
        score = torch.tensor([scored.get(cid, fill) for cid in ids], dtype=torch.float64)
        log.debug("fldetector: round %d scores=%s removed=%s", t, score.tolist(), removed.tolist())
        return Aggregate(
            update=update,
            kept=kept,
            weights=w.to(updates.dtype),
            scores=score.to(updates.dtype),
            suspicion=score + removed.to(torch.float64),
            stats={"agg.predicted": float(len(errors)), "agg.flagged": float(len(flagged)),
                   "agg.banned": float(len(self.banned)), "agg.pairs": float(len(self.pairs))},
        )

    def _prediction_errors(self, updates: Tensor, ids: tuple[int, ...], t: int) -> dict[int, float]:
        """||U_i^tau + B (G_t - G_tau) - U_i^t|| for every client of the round that can be predicted:
        seen before, with every step since then still in the window, and at least one pair."""
        rounds = sorted(r for r in self.pairs if r < t)[-self.window :]
        if not rounds:
            return {}
        s = torch.stack([self.steps[r] for r in rounds])  # (m, d)
        y = torch.stack([self.pairs[r] for r in rounds])  # (m, d)
        hvp: dict[int, Tensor] = {}  # tau -> B (G_t - G_tau), shared by the clients seen at tau
        errors = {}
        for i, cid in enumerate(ids):
            tau = self.seen.get(cid)
            if tau is None:
                continue
            if tau not in hvp:
                since = [r for r in self.steps if tau < r <= t]
                if tau != self.last_round and not any(r <= tau for r in self.steps):
                    continue  # steps between tau and now have left the window
                hvp[tau] = lbfgs_hvp(s, y, torch.stack([self.steps[r] for r in since]).sum(0)) \
                    if since else torch.zeros_like(updates[i])
            errors[cid] = float(torch.linalg.vector_norm(self.updates[cid] + hvp[tau] - updates[i]))
        return errors

    def _detect(self, scored: dict[int, float], t: int) -> set[int]:
        """The clients of the high-score 2-means cluster, if the gap statistic sees > 1 cluster."""
        if len(scored) < 3:
            return set()
        cids = sorted(scored)
        values = torch.tensor([scored[c] for c in cids], dtype=torch.float64)
        k = gap_clusters(values, round_generator(self.seed, t, "fldetector"), references=self.references)
        if k < 2:
            return set()
        labels, _ = kmeans_1d(values, 2)  # label 1 = the higher-valued cluster
        flagged = {c for c, lab in zip(cids, labels.tolist()) if lab == 1}
        log.info("fldetector: round %d: gap statistic found %d clusters; removing %s", t, k, sorted(flagged))
        return flagged

    def _remember(self, updates: Tensor, ids: tuple[int, ...], g: Tensor, update: Tensor, t: int) -> None:
        """Store this round's pair, the clients' updates and the model; drop what left the window."""
        s_t = self.steps.get(t)
        if s_t is not None and self.last_aggregate is not None:
            y_t = update - self.last_aggregate
            if float(s_t.norm()) > 0 and float(y_t.norm()) > 0:
                self.pairs[t] = y_t
        for i, cid in enumerate(ids):
            self.updates[cid] = updates[i].clone()  # the matrix is reused by the server: copy
            self.seen[cid] = t
        self.last_global, self.last_aggregate, self.last_round = g.clone(), update.clone(), t
        for r in sorted(self.steps)[: -self.window]:
            del self.steps[r]
            self.pairs.pop(r, None)
