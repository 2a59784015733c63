"""The optimisers a run can take (`OPTIMIZERS`), and AdamP without host synchronisation.

The `adamp` package's AdamP (Heo et al., ICLR 2021; the seed's optimiser) decides per weight tensor with
`if cosine.max() < bound:` whether to project the update: a host sync per tensor (two where the channel
test fails), each one draining a GPU's queue (56 in a resnet50 step). This AdamP makes the same update and
decides on the device (`torch.where`). Its per-channel sums reduce over dimensions, so channels-last conv
weights (the GPU default) work, where the package's `.view` fails. Its state (`step` a Python int,
`exp_avg`, `exp_avg_sq`) is the package's: checkpoints written with either load into the other.
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Callable, Optional

import torch


def projection(p: torch.Tensor, grad: torch.Tensor, perturb: torch.Tensor, delta: float,
               eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(perturb without its radial part, by_channel, by_layer), the decisions 0-dim bool tensors on the device.

    As the package: the channel view is chosen where every channel's |cos(grad, p)| is below
    delta/sqrt(channel size), else the layer view where |cos| is below delta/sqrt(numel), else none; the
    chosen view's radial part p_n * sum(p_n * perturb), p_n = p / (|p| + eps), is removed. The layer's sums
    are the channels' sums added up, so four reductions over the weight serve both views, and the choice is
    a `torch.where` of per-channel coefficients: the host never reads it. Reductions over all but the first
    dimension work on any memory layout (channels-last conv weights included)."""
    dims = tuple(range(1, p.dim()))
    p_norm, g_norm = torch.linalg.vector_norm(p, dim=dims), torch.linalg.vector_norm(grad, dim=dims)
    gp, pq = (grad * p).sum(dims), (p * perturb).sum(dims)
    p_layer, g_layer = p_norm.square().sum().sqrt(), g_norm.square().sum().sqrt()
    cos_channel = gp.abs() / (g_norm.clamp_min(eps) * p_norm.clamp_min(eps))  # F.cosine_similarity's eps
    cos_layer = gp.sum().abs() / (g_layer.clamp_min(eps) * p_layer.clamp_min(eps))
    by_channel = cos_channel.max() < delta / math.sqrt(p[0].numel())
    by_layer = cos_layer < delta / math.sqrt(p.numel())
    coefficient = torch.where(by_channel, pq / (p_norm + eps).square(),
                              torch.where(by_layer, pq.sum() / (p_layer + eps).square(), 0.0))
    return perturb.addcmul(p, coefficient.view((-1,) + (1,) * len(dims)), value=-1), by_channel, by_layer


class AdamP(torch.optim.Optimizer):
    """AdamP whose step never waits on the host; the update equals `adamp.AdamP`'s (tests/test_optim.py)."""

    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, delta: float = 0.1, wd_ratio: float = 0.1,
                 nesterov: bool = False):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, delta=delta, wd_ratio=wd_ratio,
                        nesterov=nesterov)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            # weights that missed steps (no gradient) have other bias corrections: one foreach pass per count
            by_step: dict[int, list[torch.Tensor]] = defaultdict(list)
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = 0  # a Python int, as the package keeps it: no device read
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                by_step[state["step"]].append(p)
            for step, params in by_step.items():
                self._update(group, params, step)
        return loss

    def _update(self, group: dict[str, Any], params: list[torch.Tensor], step: int) -> None:
        """Adam moments and step with foreach kernels; the projection and decay per weight tensor."""
        beta1, beta2 = group["betas"]
        lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
        grads = [p.grad for p in params]
        exp_avgs = [self.state[p]["exp_avg"] for p in params]
        exp_avg_sqs = [self.state[p]["exp_avg_sq"] for p in params]
        torch._foreach_mul_(exp_avgs, beta1)
        torch._foreach_add_(exp_avgs, grads, alpha=1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
        denoms = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denoms, math.sqrt(1 - beta2 ** step))
        torch._foreach_add_(denoms, eps)
        if group["nesterov"]:
            perturbs = torch._foreach_mul(exp_avgs, beta1)
            torch._foreach_add_(perturbs, torch._foreach_mul(grads, 1 - beta1))
            torch._foreach_div_(perturbs, denoms)
        else:
            perturbs = torch._foreach_div(exp_avgs, denoms)
        perturbs = list(perturbs)
        decay = 1 - lr * weight_decay  # the package's factor with wd_ratio 1
        projected_decay = 1 - lr * weight_decay * group["wd_ratio"]
        flat = []
        for i, p in enumerate(params):
            if p.dim() <= 1:  # biases and BatchNorm: plain Adam
                flat.append(p)
                continue
            perturbs[i], by_channel, by_layer = projection(p, grads[i], perturbs[i], group["delta"], eps)
            if weight_decay > 0:  # before the step, on the weight the cosine was taken with
                p.mul_(torch.full((), decay, dtype=p.dtype, device=p.device).masked_fill_(
                    by_channel | by_layer, projected_decay))
        if weight_decay > 0 and flat:
            torch._foreach_mul_(flat, decay)
        torch._foreach_add_(params, perturbs, alpha=-lr / (1 - beta1 ** step))


OPTIMIZERS: dict[str, Callable[[list[dict[str, Any]], float], torch.optim.Optimizer]] = {
    "adamp": lambda groups, weight_decay: AdamP(groups, weight_decay=weight_decay),
    "adamw": lambda groups, weight_decay: torch.optim.AdamW(groups, weight_decay=weight_decay),
    "sgd": lambda groups, weight_decay: torch.optim.SGD(groups, momentum=0.9, weight_decay=weight_decay),
}
