"""The Inverting-Gradients objective: cosine distance between a candidate's update and the observed one.

Geiping, Bauermeister, Droege, Moeller, "Inverting Gradients - How easy is it to break privacy in
federated learning?", NeurIPS 2020. For candidate images z (in the model's normalised input space):

    L(z) = 1 - <c(z), t> / (|c(z)| |t|)  +  alpha_TV * TV(z)

with one cosine over the concatenation of all trainable parameters. With one local step the target
t is the client's gradient, recovered exactly from the update (`-update/lr - wd * W0`) and c(z) is
the candidate's gradient; with K > 1 steps c(z) unrolls the K known SGD steps (momentum, weight
decay, the same batch each step) from W0 and t is the update itself. TV is the anisotropic mean
total variation of z.

Two backends give the gradient of L with respect to z for R restarts at once, z (R, B, C, H, W):
- `autograd`: a loop over restarts, double backward through torch.autograd (create_graph=True);
- `vmap`: torch.func.vmap over restarts of grad_and_value(L) with torch.func.grad inside. It pays
  only for one local step on a small model with many images in flight (see
  `inversion.optimizer.worth_vectorizing` for the measured numbers).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, grad_and_value, vmap

from inversion.schedule import LocalSchedule, gradient_part
from lab.capture import CapturedUpdate, check_fits
from lab.models import device_of

# (grad wrt z (R,B,C,H,W), gradient loss (R,), total objective (R,))
ObjectiveFn = Callable[[Tensor], tuple[Tensor, Tensor, Tensor]]


def total_variation(z: Tensor) -> Tensor:
    """Anisotropic mean TV of images (..., C, H, W): mean|horizontal diff| + mean|vertical diff|."""
    return (z[..., :, :-1] - z[..., :, 1:]).abs().mean() + (z[..., :-1, :] - z[..., 1:, :]).abs().mean()


def input_stats(model: nn.Module) -> tuple[Tensor, Tensor]:
    """Per-channel (mean, std) of the model's leading Normalize layer, each (1, C, 1, 1).

    Models in lab.models take [0, 1] pixels and normalise internally; the attack optimises in the
    normalised space (as the paper does), so its lr and TV weights mean what the paper's mean.
    Without a Normalize buffer pair the identity (0, 1) is used.
    """
    first = next(iter(model.children()), None)
    mean, std = getattr(first, "mean", None), getattr(first, "std", None)
    if isinstance(mean, Tensor) and isinstance(std, Tensor):
        return mean.detach().float().reshape(1, -1, 1, 1), std.detach().float().reshape(1, -1, 1, 1)
    device = device_of(model)
    return torch.zeros(1, 1, 1, 1, device=device), torch.ones(1, 1, 1, 1, device=device)


class UpdateMatcher:
    """Builds c(z) and the objective L(z) for one capture entry, labels and model.

    The model must already hold the entry's global weights and buffers and be in eval mode.
    """

    def __init__(self, entry: CapturedUpdate, model: nn.Module, labels: Tensor, tv: float) -> None:
        self.model = model
        self.labels = labels
        self.tv = tv
        self.schedule = LocalSchedule.of(entry)
        self.mean, self.std = input_stats(model)
        self.params0 = {k: entry.global_state[k].detach().float() for k, _ in model.named_parameters()}
        self.buffers = {k: v.detach() for k, v in model.named_buffers()}
        if self.schedule.steps == 1:
            exact = gradient_part(entry, self.schedule)  # (-update/lr - wd*W0): the client's gradient
            self.target = {k: exact[k] for k in self.params0}
        else:
            self.target = {k: entry.update[k].detach().float() for k in self.params0}
        # One flat target: a single dot product per evaluation is ~15% faster than per-tensor sums.
        self.target_flat = torch.cat([self.target[k].reshape(-1) for k in self.params0])  # (n_params,)
        self.target_norm = torch.linalg.vector_norm(self.target_flat)

    def laid_out(self, channels_last: bool) -> UpdateMatcher:
        """This matcher with its conv weights channels-last when asked (`lab.fastpath`'s layout:
        faster double backward for some nets and batch sizes, the same objective up to float
        rounding); the target and everything else are shared, not copied."""
        if not channels_last:
            return self
        other = copy.copy(self)
        other.params0 = {k: v.contiguous(memory_format=torch.channels_last) if v.dim() == 4 else v
                         for k, v in self.params0.items()}
        return other

    # -- the candidate's gradient / update, functional in the parameters ---------------------------
    def _task_loss(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        logits = functional_call(self.model, (params, self.buffers), (x,))
        return F.cross_entropy(logits, self.labels)

    def _unroll(self, x: Tensor, grad_of: Callable[[dict[str, Tensor]], dict[str, Tensor]],
                params0: dict[str, Tensor]) -> dict[str, Tensor]:
        """c(z): the gradient (K = 1) or the K-step SGD update (K > 1) the candidate x would cause."""
        s = self.schedule
        if s.steps == 1:
            return grad_of(params0)
        params, buf = params0, {}
        for t in range(s.steps):
            g = grad_of(params)
            d = {k: g[k] + s.weight_decay * params[k] for k in params}
            buf = d if t == 0 else {k: s.momentum * buf[k] + d[k] for k in params}
            params = {k: params[k] - s.lr * buf[k] for k in params}
        return {k: params[k] - params0[k] for k in params}

    def _objective(self, cand: dict[str, Tensor], z: Tensor) -> tuple[Tensor, Tensor]:
        flat = torch.cat([cand[k].reshape(-1) for k in self.params0])  # (n_params,)
        rec = 1.0 - (flat @ self.target_flat) / (torch.linalg.vector_norm(flat) * self.target_norm + 1e-12)
        return rec + self.tv * total_variation(z), rec

    def _pixels(self, z: Tensor) -> Tensor:
        return z * self.std + self.mean

    # -- backends ------------------------------------------------------------------------------------
    def autograd_fn(self) -> ObjectiveFn:
        """Gradient of L for each restart in turn, by double backward through torch.autograd."""
        leaves = {k: v.clone().requires_grad_(True) for k, v in self.params0.items()}

        def grad_of(params: dict[str, Tensor], x: Tensor) -> dict[str, Tensor]:
            loss = self._task_loss(params, x)
            grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
            return dict(zip(params, grads))

        def one(z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            z = z.detach().requires_grad_(True)
            x = self._pixels(z)
            cand = self._unroll(x, lambda p: grad_of(p, x), leaves)
            total, rec = self._objective(cand, z)
            (gz,) = torch.autograd.grad(total, z)
            return gz, rec.detach(), total.detach()

        def fn(zs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            gz, rec, total = zip(*(one(z) for z in zs))
            return torch.stack(gz), torch.stack(rec), torch.stack(total)

        return fn

    def vmap_fn(self) -> ObjectiveFn:
        """Gradient of L for all restarts in one torch.func.vmap call."""
        params0 = self.params0

        def objective(z: Tensor) -> tuple[Tensor, Tensor]:
            x = self._pixels(z)
            cand = self._unroll(x, lambda p: grad(self._task_loss)(p, x), params0)
            return self._objective(cand, z)

        batched = vmap(grad_and_value(objective, has_aux=True))

        def fn(zs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            gz, (total, rec) = batched(zs.detach())
            return gz, rec.detach(), total.detach()

        return fn


def model_at(entry: CapturedUpdate, model: nn.Module, device: torch.device | None = None) -> nn.Module:
    """A copy of `model` holding the entry's global weights and buffers, in eval mode, frozen,
    on `device` (default: the model's).

    Raises:
        CaptureError: the entry's keys or shapes do not fit the model.
    """
    check_fits(entry, model)
    net = copy.deepcopy(model) if device is None else copy.deepcopy(model).to(device)
    net.load_state_dict(entry.global_state, strict=True)
    net.eval()  # the paper's setting: BatchNorm (ResNet-18) uses the running statistics
    for p in net.parameters():
        p.requires_grad_(False)
    return net
