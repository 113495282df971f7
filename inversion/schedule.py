"""The client's local SGD schedule as the server knows it, and what it implies for the update.

torch.optim.SGD with momentum m, weight decay wd and lr on the parameters W:
    d_t = g_t + wd * W_t;   buf_1 = d_1,  buf_t = m * buf_{t-1} + d_t;   W_{t+1} = W_t - lr * buf_t.
The weight-decay part of every step is proportional to W_t, so after K steps the update splits as
    W_K - W_0 = (alpha_K - 1) * W_0 + (a sum of lr-scaled gradient terms),
where the scalar alpha_K depends only on (K, lr, m, wd). Removing `(alpha_K - 1) * W_0` leaves an
update made of gradients alone: for K = 1 it is exactly `-lr * grad`, and for a fully-connected
first layer it stays rank-1 along the input (the analytic attack's exactness through momentum).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from lab.capture import CapturedUpdate


@dataclass(frozen=True)
class LocalSchedule:
    steps: int
    lr: float
    momentum: float
    weight_decay: float

    @classmethod
    def of(cls, entry: CapturedUpdate) -> LocalSchedule:
        hp = entry.hyperparams
        return cls(entry.local_steps, float(hp.lr), float(hp.momentum), float(hp.weight_decay))

    def decay_factor(self) -> float:
        """alpha_K: the coefficient of W_0 in W_K when every gradient is zero."""
        alpha, buf = 1.0, 0.0
        for t in range(self.steps):
            d = self.weight_decay * alpha
            buf = d if t == 0 else self.momentum * buf + d
            alpha -= self.lr * buf
        return alpha


def gradient_part(entry: CapturedUpdate, schedule: LocalSchedule | None = None) -> dict[str, Tensor]:
    """The update minus its weight-decay part, divided by -lr: a sum-of-gradients estimate.

    Exact for K = 1 (`-update/lr - wd * W0` is the client's gradient); for K > 1 it is the
    momentum-weighted sum of the K gradients, whose signs the label rules need.
    """
    schedule = schedule or LocalSchedule.of(entry)
    shrink = schedule.decay_factor() - 1.0
    return {k: -(u.float() - shrink * entry.global_state[k].float()) / schedule.lr
            for k, u in entry.update.items() if u.is_floating_point()}
