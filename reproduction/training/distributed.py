"""Where the towers go: `parse_devices` for one process (train, evaluate and visualize read
--devices with it), `replica_devices` for each of torchrun's data-parallel replicas; and the few
collectives the training loop needs (torch.distributed + DistributedDataParallel; NCCL on GPUs,
gloo on the CPU). A plain run uses `Distributed()`, whose methods do nothing.
"""

from __future__ import annotations

import gc
import os
import time
import traceback
from datetime import timedelta
from types import TracebackType
from typing import Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from reproduction.config import RunConfig, override
from reproduction.errors import UserError
from reproduction.model import default_devices


class Distributed:
    """This process's place among torchrun's data-parallel replicas, and the few collectives the
    loop needs. `Distributed()` is the plain run: rank 0 of 1, no process group, no-op methods."""

    def __init__(self, rank: int = 0, world: int = 1, device: str | torch.device = "cpu",
                 timeout: float | None = None, *, started: bool = False) -> None:
        self.rank, self.world, self.device, self.timeout = rank, world, torch.device(device), timeout
        self.started = started  # a process group exists (made by `start`)

    @classmethod
    def start(cls, devices: Sequence[torch.device], *, timeout: float) -> Distributed:
        """Join the job torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT): NCCL when
        this replica is on GPUs, gloo on the CPU. A collective that waits more than `timeout`
        seconds for another rank fails with an error instead of hanging."""
        home = torch.device(devices[0])
        if home.type == "cuda":
            torch.cuda.set_device(home)  # NCCL's communicator and barrier use the current device
        dist.init_process_group("nccl" if home.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout))
        return cls(dist.get_rank(), dist.get_world_size(), home, timeout, started=True)

    @property
    def is_main(self) -> bool:
        """Rank 0 alone prints and writes the run folder."""
        return self.rank == 0

    def sum(self, values: Sequence[float]) -> list:
        """Each value summed over the ranks (one all_reduce in float64, so counts stay exact);
        the values as given in a plain run."""
        if not self.started:
            return list(values)
        total = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        dist.all_reduce(total)
        return total.tolist()

    def wrap(self, model: nn.Module) -> nn.Module:
        """DDP: parameters broadcast from rank 0, gradients averaged over the replicas during
        backward. device_ids=None is DDP's form for CPU and for multi-device modules (two towers)."""
        return DistributedDataParallel(model, device_ids=None) if self.started else model

    def barrier(self) -> None:
        if self.started:
            dist.barrier(**({"device_ids": [self.device.index]} if self.device.type == "cuda" else {}))

    def describe(self) -> dict:
        return {"world_size": self.world, "backend": dist.get_backend() if self.started else None,
                "timeout_s": self.timeout}

    def __enter__(self) -> Distributed:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.started:
            return
        if exc_type is None:
            self.barrier()  # nobody leaves while rank 0 may still be writing final.json
        else:
            release_after_failure(tb)
        dist.destroy_process_group()


def release_after_failure(tb: TracebackType | None) -> None:
    """Before the process group goes, after a failure (a peer gone, an error): let gloo's worker
    threads finish the failed collectives, then free the DDP module the failing frames still hold.

    Otherwise the DDP reducer, freed later with the traceback, drops the group's last reference
    and its destructor, run with the GIL held, waits for a worker that is freeing a failed
    collective's tensors and waits for the GIL: the survivor of a failed rank hangs instead of
    exiting (seen with torch 2.11's gloo, pytorch/pytorch#56297's kind)."""
    for _ in range(10):
        time.sleep(0.05)  # the GIL released: a worker that needs it to free a finished work can take it
    traceback.clear_frames(tb)  # the locals of the failed frames: the DDP module, the loop, the task
    gc.collect()


def torchrun_replica() -> tuple[int, int] | None:
    """(local rank, processes on this node) when torchrun started this process, else None."""
    env = os.environ
    if not all(k in env for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")):
        return None
    return int(env["LOCAL_RANK"]), int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"]))


def parse_devices(text: str | None, towers: int) -> tuple[torch.device, ...]:
    """'cpu', 'cuda:0' or 'cuda:0,cuda:1' (one per tower); None: `default_devices`."""
    names = default_devices(towers) if not text else [d.strip() for d in text.split(",")]
    devices = []
    for name in names:
        try:
            device = torch.device(name)
        except RuntimeError:
            raise UserError(f"--devices {text}: {name!r} is not a device; give cpu, cuda, cuda:0 or "
                            "cuda:0,cuda:1 (one per tower)") from None
        if device.type == "cuda" and not (torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()):
            raise UserError(f"--devices {text}: {name} is not visible ({torch.cuda.device_count()} CUDA "
                            "device(s)); give cpu or a visible GPU")
        if device.type not in ("cpu", "cuda"):
            raise UserError(f"--devices {text}: {name!r} is neither cpu nor cuda; give cpu or cuda:N")
        devices.append(device)
    return tuple(devices)


def replica_devices(local_rank: int, local_world: int, towers: int, gpus: int) -> tuple[torch.device, ...]:
    """Where replica `local_rank` of the `local_world` on its node puts its towers, given the
    node's `gpus`: two GPUs each, cuda:2r and cuda:2r+1, when there are enough for every replica
    (the paper's two-GPU net, §3.2); else one GPU each, cuda:r, holding both towers; else the CPU."""
    if gpus == 0:
        return (torch.device("cpu"),)
    if towers == 2 and gpus >= 2 * local_world:
        return (torch.device(f"cuda:{2 * local_rank}"), torch.device(f"cuda:{2 * local_rank + 1}"))
    if gpus >= local_world:
        return (torch.device(f"cuda:{local_rank}"),)
    raise ValueError(f"{local_world} processes on this node but {gpus} GPU(s): give torchrun "
                     f"--nproc_per_node={gpus} (one-GPU replicas) or {gpus // 2} (two-GPU replicas)")


def scale_batch(config: RunConfig, global_batch: int) -> tuple[RunConfig, dict]:
    """`config` with a global batch of `global_batch` images and ε scaled linearly, ε·N/B (B the
    experiment's batch), and the record of it that config.json keeps."""
    # DEVIATION(§5): the paper's batch is 128. Linear scaling (Goyal et al. 2017, "Accurate, Large
    # Minibatch SGD") is a stated heuristic for larger batches, not the paper's recipe.
    if global_batch < 1:
        raise ValueError(f"--global-batch must be >= 1, got {global_batch}")
    t = config.train
    lr = t.lr * global_batch / t.batch_size
    record = {"global_batch": global_batch, "base_batch": t.batch_size, "base_lr": t.lr, "lr": lr,
              "rule": "linear: lr = base_lr * global_batch / base_batch"}
    return override(config, {"batch_size": global_batch, "lr": lr}), record
