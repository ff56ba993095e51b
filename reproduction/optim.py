"""The paper's optimiser and learning-rate rule (§5).

§5: "We trained our models using stochastic gradient descent with a batch size of 128
examples, momentum of 0.9, and weight decay of 0.0005. [...] The update rule for weight w was

    v_{i+1} := 0.9·v_i − 0.0005·ε·w_i − ε·⟨∂L/∂w|_{w_i}⟩_{D_i}
    w_{i+1} := w_i + v_{i+1}"

The learning rate ε sits inside the velocity. torch.optim.SGD keeps it outside (v ← μv + g;
w ← w − ε·v): the two agree while ε is constant, but at a drop torch rescales the whole
accumulated velocity at once, while here the old velocity, which carries the old ε, decays
over ~1/(1 − 0.9) = 10 steps. Weight decay applies to weights only, not biases: the text is
silent; Krizhevsky's cuda-convnet2 (no `wc` for biases) and Caffe (`decay_mult: 0`) both exempt them.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import nn


class PaperSGD(torch.optim.Optimizer):
    """§5's momentum SGD with ε inside the velocity. `weight_decay` per parameter group, so
    `paper_param_groups` can exempt biases. Changing `group["lr"]` is a learning-rate drop.

    fused=True (TrainConfig.fused_sgd, a performance switch): fp32 CPU parameters are updated
    by one C pass each (kernels.c's paper_sgd: read v, w, g, write v, w) instead of the four
    foreach passes; the same formula in the same order, without fused multiply-adds. Other
    parameters (CUDA, other dtypes, or no C compiler) take the foreach form."""

    def __init__(self, params, lr: float = 0.01, momentum: float = 0.9, weight_decay: float = 5e-4,
                 fused: bool = False):
        for name, value in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay)):
            if not value >= 0:
                raise ValueError(f"PaperSGD {name} must be >= 0, got {value}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))
        self.fused = fused

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
            velocity = []
            for p in params:
                state = self.state[p]
                if "velocity" not in state:
                    state["velocity"] = torch.zeros_like(p)
                elif state["velocity"].stride() != p.stride():
                    # loaded before the net went channels_last: match the parameter's layout once,
                    # else every foreach op below takes its slow mixed-layout path
                    state["velocity"] = torch.empty_like(p).copy_(state["velocity"])
                velocity.append(state["velocity"])
            grads = [p.grad for p in params]
            if self.fused:
                params, velocity, grads = _fused_update(params, velocity, grads, lr, mu, wd)
                if not params:
                    continue
            # v ← μ·v − wd·ε·w − ε·g ; w ← w + v, as foreach ops (one kernel per op and device).
            torch._foreach_mul_(velocity, mu)
            if wd:
                torch._foreach_add_(velocity, params, alpha=-wd * lr)
            torch._foreach_add_(velocity, grads, alpha=-lr)
            torch._foreach_add_(params, velocity)
        return loss


def _fused_update(params, velocity, grads, lr, mu, wd):
    """Update the fp32 CPU parameters (dense, like their velocity and gradient) with the C
    kernel; return the others, for the foreach form."""
    from reproduction.ops import kernels
    lib = kernels.library()
    rest = ([], [], [])
    for p, v, g in zip(params, velocity, grads):
        ok = (lib is not None and p.device.type == "cpu" and p.dtype == v.dtype == g.dtype == torch.float32
              and p.stride() == v.stride() == g.stride()
              and (p.is_contiguous() or (p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last))))
        if not ok:
            for out, t in zip(rest, (p, v, g)):
                out.append(t)
            continue
        lib.paper_sgd(p.data_ptr(), v.data_ptr(), g.data_ptr(), p.numel(), mu, -wd * lr, -lr,
                      torch.get_num_threads())
    return rest


def paper_param_groups(model: nn.Module, weight_decay: float = 5e-4) -> list[dict]:
    """Two groups: the weights (decayed) and the biases (not decayed; see the module docstring)."""
    weights, biases = [], []
    for p in model.parameters():
        if p.requires_grad:
            (biases if p.ndim == 1 else weights).append(p)
    return [{"params": weights, "weight_decay": weight_decay},
            {"params": biases, "weight_decay": 0.0}]


def fixed_schedule_lr(epoch: int, base_lr: float, drop_epochs: Sequence[int], factor: float = 0.1) -> float:
    """ε for `epoch` (0-based) when it is divided by 1/factor at each listed epoch: a schedule
    repeatable to the step (e.g. drops at 30, 60, 80 of 90 epochs)."""
    return base_lr * factor ** sum(1 for e in drop_epochs if epoch >= e)


def plateau_lr(val_errors: Iterable[float], base_lr: float, *, patience: int, min_improvement: float,
               max_drops: int = 3, factor: float = 0.1) -> float:
    """ε for the next epoch under the stated plateau rule, from the centre-patch validation
    errors of the epochs so far (a pure function of the history, so a resumed run agrees).

    §5: "The heuristic which we followed was to divide the learning rate by 10 when the
    validation error rate stopped improving with the current learning rate", three times in
    all. Stated here as: ε is divided by 1/factor once `patience` consecutive epochs at the
    current ε have failed to beat the best error seen at that ε by more than `min_improvement`
    (absolute), at most `max_drops` times. The count restarts after each drop.
    """
    # DEVIATION(§5): the paper's authors decided the drops by hand; this is one stated,
    # repeatable rule for the same heuristic (and `fixed_schedule_lr` fixes them in advance).
    lr, drops, best, stale = base_lr, 0, float("inf"), 0
    for err in val_errors:
        if err < best - min_improvement:
            best, stale = err, 0
        else:
            stale += 1
        if stale >= patience and drops < max_drops:
            lr, drops, best, stale = lr * factor, drops + 1, float("inf"), 0
    return lr
