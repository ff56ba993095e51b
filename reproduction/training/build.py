"""The one builder of a run's net, its optimiser and its training step, from a RunConfig: what
training, evaluation and the benchmarks all use, so that they time and train the same thing."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reproduction.training.checkpoints import load_checkpoint
from reproduction.config import RunConfig, TrainConfig
from reproduction.training.distributed import Distributed
from reproduction.errors import UserError
from reproduction.model import AlexNet
from reproduction.optim import PaperSGD, paper_param_groups
from reproduction.precision import autocast


class Built(NamedTuple):
    model: AlexNet           # the bare net: its state_dict, its evaluation
    optimizer: PaperSGD
    step_fn: nn.Module       # what a training step calls: the net in its training form


def build(config: RunConfig, devices: Sequence[torch.device], *, replicas: Distributed | None = None,
          lrn_operator: bool | None = None, init_from: Path | None = None,
          log: Callable[[str], None] = print) -> Built:
    """§5's net (initialised from torch's current seed), its SGD and its step, with the config's
    opt-in speed flags. init_from: start from a checkpoint's weights (fine-tuning)."""
    t = config.train
    model = AlexNet(config.model, devices=devices)
    model.set_fused_lrn(t.fused_lrn if lrn_operator is None else lrn_operator)
    if init_from is not None:
        log(load_pretrained(model, Path(init_from)))
    for name in t.freeze:  # fine-tuning: these layers keep their loaded weights
        getattr(model, name).requires_grad_(False)
    optimizer = PaperSGD(paper_param_groups(model, t.weight_decay), lr=t.lr, momentum=t.momentum,
                         fused=t.fused_sgd)
    return Built(model, optimizer, step_module(model, t, replicas))


def step_module(model: nn.Module, t: TrainConfig, replicas: Distributed | None = None) -> nn.Module:
    """What `train_step` calls: the net in channels_last, wrapped by DDP and compiled, as `t`
    asks (`model` itself is changed only in its memory format).

    compile: dynamic=False. An epoch's last batch is partial, so the step sees two batch sizes;
    with dynamic=None the second would make Dynamo recompile one symbolic graph (slower,
    shape-generic kernels) that then serves every full batch too. Static shapes give two graphs."""
    if t.channels_last:
        model.to(memory_format=torch.channels_last)
    module = (replicas or Distributed()).wrap(model)
    return torch.compile(module, dynamic=False) if t.compile else module


def train_step(model: Callable[[Tensor], Tensor], optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor,
               *, n: int, precision: str = "fp32", channels_last: bool = False,
               world: int = 1) -> tuple[Tensor, Tensor]:
    """One step of §5's SGD on the batch (x, y): forward, backward, update. Returns the loss
    and the number of top-1 errors as device tensors, without waiting for the device.

    §5's gradient is that of the mean loss over the global batch's n images. Each of the
    `world` replicas sums its slice and DDP averages over the replicas: so ·world/n, and the
    returned loss is the batch's mean loss ·world."""
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast(x.device, precision):
        logits = model(x)
    y = y.to(logits.device)
    loss = F.cross_entropy(logits.float(), y, reduction="sum") * world / n
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), (logits.argmax(1) != y).sum()


def deterministic_setup(devices: Sequence[torch.device]) -> bool:
    """TrainConfig.deterministic: torch.use_deterministic_algorithms(True) for the process and,
    with a tower on CUDA, CUBLAS_WORKSPACE_CONFIG=:4096:8 unless set (cuBLAS raises without it;
    it must precede the process's first cuBLAS call). Returns whether a tower is on CUDA, where
    the LRN must be the reproduction::lrn operator: F.local_response_norm's avg_pool3d backward
    has no deterministic CUDA kernel, the operator's Triton backward (no atomics) is."""
    torch.use_deterministic_algorithms(True)
    cuda = any(torch.device(d).type == "cuda" for d in devices)
    if cuda:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    return cuda


def load_pretrained(model: AlexNet, path: Path) -> str:
    """Copy a checkpoint's weights into `model`. fc8 keeps its fresh §5 initialisation when the
    checkpoint has another number of classes; any other mismatch is an error. Returns what was
    done, for the log."""
    weights = load_checkpoint(path)["model"]
    own = model.state_dict()
    fresh = [k for k in ("fc8.weight", "fc8.bias") if k in weights and weights[k].shape != own[k].shape]
    for k in fresh:
        del weights[k]
    advice = "fine-tuning starts from a checkpoint of the same architecture"
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError as e:  # shapes that differ
        raise UserError(f"{path} does not fit this net ({advice}): {e}") from None
    if unexpected or set(missing) != set(fresh):
        raise UserError(f"{path} does not fit this net (missing {missing}, unexpected {unexpected}); {advice}")
    tail = (f"fc8 re-initialised for {own['fc8.bias'].shape[0]} classes (§5's initialisation)" if fresh
            else "fc8 kept")
    return f"started from the weights of {path}; {tail}"
