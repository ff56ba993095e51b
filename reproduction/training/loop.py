"""The one training loop (§5): epochs of SGD steps over a task's batches, a validation after
each epoch, one line per epoch in metrics.jsonl and an atomic checkpoint.pt.

Every run trains here: the ImageNet net (reproduction.train) and CIFAR-10's four-layer nets
(reproduction.experiments). What differs between them is a `Task`. The loop knows the epochs
and, at most, a wall-clock deadline; how long to train is its caller's decision.

A resumed run sees the same batches, draws the same dropout masks and ends bit-identical (CPU,
deterministic) to one never interrupted: every random stream is a function of (seed, epoch,
step). Ctrl-C or SIGTERM checkpoints at the next step boundary; a second one stops at once.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import sys
import threading
import time
from collections import deque
from typing import Callable, Iterator

import numpy as np
import torch
from torch import Tensor, nn

from reproduction.training.build import train_step
from reproduction.data import UnreadableImages, num_batches
from reproduction.training.distributed import Distributed
from reproduction.errors import UserError
from reproduction.training.runfolder import BEST, SELECTED_BY_VAL, RunFolder

_DROPOUT = 2  # keeps the dropout stream apart from the data's streams (data.py uses 0, 1)
# Steps between reads of the loss and error counts: a read waits for the device, so reading
# every step would drain a GPU's queue once a step.
READ_EVERY = 20


class TrainingStopped(UserError, RuntimeError):
    """The guard stopped the run; the message says why and what to try (exit status 1)."""
    exit_code = 1


@dataclasses.dataclass
class Task:
    """What the loop trains: the parts that differ between the ImageNet net and CIFAR-10's."""
    model: nn.Module                 # checkpointed and validated
    step_fn: Callable                # what a step calls: the model in its training form (DDP, compiled)
    optimizer: torch.optim.Optimizer
    images: int                      # training images per epoch
    classes: int                     # for the guard's chance level, ln(classes)
    batches: Callable[[int, int], Iterator[tuple[Tensor, Tensor]]]  # (epoch, first batch) -> batches
    validate: Callable[[], dict]     # after each epoch: the row's validation numbers
    lr: Callable[[list[dict]], float]  # ε for the next epoch, from the rows so far
    finish: Callable[[list[dict]], dict]  # final.json's numbers, from the rows
    state: dict = dataclasses.field(default_factory=dict)  # more checkpoint entries (config, classes)
    stop: Callable[[list[dict]], str | None] = lambda rows: None  # the task's own end (Fig. 1's target)
    error_parts: int = 0             # also record training error per 1/n of an epoch (Fig. 1)
    best_by: str | None = None       # a row key: best.pt keeps the weights of the epoch lowest in it
    describe: Callable[[dict], str] = lambda val: " ".join(f"{k} {v:.4f}" for k, v in val.items())
    resume_with: str | None = None   # how a user continues an interrupted run (None: train --resume)


@dataclasses.dataclass
class Options:
    """How the loop runs a task (from the run's config, and the caller's plan)."""
    batch_size: int
    epochs: int
    seed: int
    precision: str = "fp32"
    channels_last: bool = False
    stuck_steps: int = 0             # 0: three epochs' steps, at least 5,000
    deadline: float | None = None    # time.time() at which training stops (the epoch in progress ends)
    max_epochs: int | None = None    # epochs this process trains (staged runs resume later)


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """Seed of torch's generators (dropout) for global step `step` on replica `rank`. Rank 0
    draws what a single process draws; every other replica draws masks of its own."""
    keys = [seed, _DROPOUT, step] + ([rank] if rank else [])
    return int(np.random.SeedSequence(keys).generate_state(1, np.uint64)[0] >> 1)


class Guard:
    """Stops a run that cannot learn. A NaN/inf loss stops it. A loss still at chance, ln(C),
    after `stuck_steps` steps stops it too (a warning comes at a fifth of that): the paper's
    bias-1 initialisation sits at chance for a while before it learns (PAPER-SPEC §10).
    Losses arrive in order, when the loop reads them back (every READ_EVERY steps)."""

    def __init__(self, num_classes: int, stuck_steps: int, log: Callable[[str], None]) -> None:
        self.chance, self.stuck_steps, self.log = math.log(num_classes), stuck_steps, log
        self.recent: deque[float] = deque(maxlen=100)
        self.warned = False
        self.checkpoint_note = "no checkpoint was written by this run"  # said in every stop message

    def check(self, loss: float, step: int, lr: float) -> None:
        if not math.isfinite(loss):
            raise TrainingStopped(
                f"loss became {loss} at step {step} (ε = {lr:g}). Try a smaller learning rate "
                f"(--set lr={lr / 10:g}), precision=fp32 if you used bf16, and check that the data's "
                f"mean was subtracted (inputs of thousands overflow). {self.checkpoint_note}.")
        self.recent.append(loss)
        at_chance = (len(self.recent) == self.recent.maxlen
                     and abs(sum(self.recent) / len(self.recent) - self.chance) < 0.01 * self.chance)
        if not at_chance:
            return
        advice = ("the paper's biases of 1 can hold the loss there for a while; try --set init_bias=0.1 "
                  "(Caffe's bvlc_alexnet choice), a smaller lr, or a larger stuck_steps to wait longer")
        if step >= self.stuck_steps:
            raise TrainingStopped(f"the loss is still at chance, ln({round(math.exp(self.chance))}) = "
                                  f"{self.chance:.3f}, after {step} steps: {advice}.")
        if step >= self.stuck_steps // 5 and not self.warned:
            self.warned = True
            self.log(f"warning: the loss is at chance ({self.chance:.3f}) after {step} steps; the run "
                     f"stops at {self.stuck_steps} if it stays there ({advice})")


class Interrupt:
    """First Ctrl-C or SIGTERM: finish the step, checkpoint, stop. Second: stop at once."""

    def __init__(self) -> None:
        self.requested = False
        self.previous: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # handlers live in the main thread
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.getsignal(sig)
                signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\ninterrupt ({signal.Signals(signum).name}): checkpointing after this step "
              "(again to stop at once)", file=sys.stderr)

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def zero_sums() -> dict:
    return {"loss": 0.0, "errors": 0, "images": 0, "seconds": 0.0}


def position_text(position: dict) -> str:
    return f"epoch {position['epoch'] + 1}, batch {position['batch']} (step {position['step']})"


def duration(seconds: float) -> str:
    seconds = int(seconds)
    h, m, s = seconds // 3600, seconds // 60 % 60, seconds % 60
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Loop:
    """One run of the loop: `Loop(task, options, folder, ...).run()` trains the epochs left,
    then returns final.json's contents (or where a staged or interrupted run stopped)."""

    def __init__(self, task: Task, options: Options, folder: RunFolder, *, position: dict | None = None,
                 history: list[dict] | None = None, replicas: Distributed | None = None,
                 log: Callable[[str], None] = print) -> None:
        self.task, self.options, self.folder, self.log = task, options, folder, log
        self.replicas = replicas or Distributed()
        self.position = position or {"epoch": 0, "batch": 0, "step": 0, "sums": zero_sums()}
        self.history = list(history or [])
        self.per_epoch = num_batches(task.images, options.batch_size)
        stuck = options.stuck_steps or max(5000, 3 * self.per_epoch)
        self.guard = Guard(task.classes, stuck, log)
        if position is not None:
            self.guard.checkpoint_note = f"The checkpoint this run resumed from ({position_text(position)}) is kept"
        last = options.epochs if options.max_epochs is None else self.position["epoch"] + options.max_epochs
        self.last_epoch = min(options.epochs, last)
        self.pending: list[tuple[Tensor, Tensor, int, int]] = []  # (loss, errors, images, batch) not yet read
        self.lr = 0.0
        self.stopped: str | None = None  # why training ended before options.epochs (deadline, the task's end)

    def run(self) -> dict:
        with Interrupt() as interrupt:
            while self.position["epoch"] < self.last_epoch and self.stopped is None:
                if self._past_deadline():
                    self.stopped = f"at the deadline, before epoch {self.position['epoch'] + 1} began"
                    break
                self._epoch(interrupt)
                if interrupt.requested:  # it came during the validation or the checkpoint, both now done
                    self._say_interrupted()
                    raise KeyboardInterrupt
        if self.stopped is None and self.position["epoch"] < self.options.epochs:
            return {"stopped_at_epoch": self.position["epoch"]}
        if self.stopped:
            self.log(f"training stopped {self.stopped}")
        final = self.task.finish(self.history) | {"epochs": self.position["epoch"], "steps": self.position["step"]}
        if self.history and "images" in self.history[-1]:  # the deadline ended the last epoch early
            final["last_epoch_images"] = self.history[-1]["images"]
        if self.stopped:
            final["stopped"] = self.stopped
        if self.task.best_by and self.history:
            final["best_checkpoint"] = self._best_record(min(self.history, key=lambda r: r[self.task.best_by]))
        self.folder.finish(final)
        return final

    def _past_deadline(self) -> bool:
        return self.options.deadline is not None and time.time() >= self.options.deadline

    def _epoch(self, interrupt: Interrupt) -> None:
        """One epoch (or the rest of one, resumed): its steps, validation, row and checkpoint."""
        epoch = self.position["epoch"]
        self.lr = self.task.lr(self.history)
        for group in self.task.optimizer.param_groups:
            group["lr"] = self.lr * group.get("lr_scale", 1.0)  # a drop leaves the velocity as it was (§5)
        self.task.model.train()
        start = time.time()
        images = self._steps(epoch, interrupt, start)
        sums = self.position["sums"]
        seconds = sums["seconds"] + time.time() - start
        try:
            val = self.task.validate()
        except UnreadableImages as e:  # the epoch's steps are kept: a resume validates again
            raise UnreadableImages(f"{e}; {self._keep_progress()}, then --resume") from None
        if not (all(math.isfinite(v) for v in val.values() if isinstance(v, float)) and math.isfinite(sums["loss"])):
            raise TrainingStopped(f"epoch {epoch + 1} (ε = {self.lr:g}) produced a non-finite loss: the net's "
                                  f"outputs overflowed; nothing of this epoch is recorded. Try a smaller learning "
                                  f"rate (--set lr={self.lr / 10:g}). {self.guard.checkpoint_note}.")
        row = {"epoch": epoch, "step": self.position["step"], "lr": self.lr,
               "train_loss": sums["loss"] / sums["images"], "train_error": sums["errors"] / sums["images"],
               **val, "img_per_s": sums["images"] / seconds, "seconds": seconds}
        if self.task.error_parts:
            row["train_error_parts"] = sums["parts"]
        if images is not None:
            row["images"] = images  # the deadline ended this epoch early
        self.folder.append(row)
        self.history.append(row)
        self.log(f"epoch {epoch + 1}/{self.options.epochs}: train loss {row['train_loss']:.4f} error "
                 f"{row['train_error']:.4f} | {self.task.describe(val)} | ε {self.lr:g} | {duration(seconds)}")
        self.position = {"epoch": epoch + 1, "batch": 0, "step": self.position["step"], "sums": self._fresh_sums()}
        self.save()
        self._keep_best(row)
        self.stopped = self.stopped or self.task.stop(self.history)

    def _fresh_sums(self) -> dict:
        return zero_sums() | ({"parts": [], "part": [0, 0]} if self.task.error_parts else {})

    def _steps(self, epoch: int, interrupt: Interrupt, start: float) -> int | None:
        """The epoch's steps from the position's batch. Returns the images trained in this epoch
        when the deadline ended it early, else None."""
        o, replicas = self.options, self.replicas
        if "parts" not in self.position["sums"] and self.task.error_parts:
            self.position["sums"] |= {"parts": [], "part": [0, 0]}
        sums, last_print, done = self.position["sums"], time.time(), 0
        # Under torchrun, every step: the read is also how all ranks learn of a Ctrl-C and stop together.
        read_every = 1 if replicas.started else READ_EVERY
        batches = self.task.batches(epoch, self.position["batch"])
        try:
            for k, (x, y) in enumerate(batches, start=self.position["batch"]):
                n = min(o.batch_size, self.task.images - k * o.batch_size)  # images in the global batch
                torch.manual_seed(step_seed(o.seed, self.position["step"], replicas.rank))  # dropout masks
                self.pending.append((*train_step(self.task.step_fn, self.task.optimizer, x, y, n=n,
                                                 precision=o.precision, channels_last=o.channels_last,
                                                 world=replicas.world), n, k))
                self.position = {"epoch": epoch, "batch": k + 1, "step": self.position["step"] + 1, "sums": sums}
                done += n
                cut = k + 1 < self.per_epoch and self._past_deadline()
                end = k + 1 == self.per_epoch or cut
                if not (self.position["step"] % read_every == 0 or end or interrupt.requested):
                    continue
                stop = self._read_back(interrupt.requested)
                if time.time() - last_print >= 10 or end:
                    self._progress(epoch, k, done, start)
                    last_print = time.time()
                if stop:
                    self._interrupted(start)
                if cut:
                    self.stopped = (f"at the deadline: epoch {epoch + 1} ended after {sums['images']:,} "
                                    f"of its {self.task.images:,} images")
                    return sums["images"]
        except UnreadableImages as e:  # the steps taken are kept
            raise UnreadableImages(f"{e}; {self._keep_progress()}, then --resume") from None
        finally:
            getattr(batches, "close", lambda: None)()  # the loader's threads stop with it
        return None

    def _read_back(self, interrupted: bool) -> bool:
        """Read the pending steps' losses and error counts (one wait for the device), sum them over
        the replicas with the interrupt flags (one reduction), check each step's mean loss in
        order and add it to the epoch's sums step by step. Returns whether any rank was interrupted."""
        pending, sums = self.pending, self.position["sums"]
        losses = torch.stack([p[0] for p in pending]).tolist()
        errors = torch.stack([p[1] for p in pending]).tolist()
        *totals, stop = self.replicas.sum([*losses, *errors, interrupted])
        first = self.position["step"] - len(pending) + 1
        for i, (_, _, n, k) in enumerate(pending):
            loss = totals[i] / self.replicas.world  # the batch's mean loss, alike on every rank
            self.guard.check(loss, first + i, self.lr)
            wrong = int(totals[len(pending) + i])
            sums["loss"] += loss * n
            sums["errors"] += wrong
            sums["images"] += n
            if self.task.error_parts:
                self._add_to_part(sums, wrong, n, k)
        pending.clear()
        return bool(stop)

    def _add_to_part(self, sums: dict, wrong: int, n: int, k: int) -> None:
        """Training error per 1/error_parts of the epoch (Fig. 1 resolves its crossing with it)."""
        sums["part"] = [sums["part"][0] + wrong, sums["part"][1] + n]
        parts = self.task.error_parts
        if k + 1 in {round(self.per_epoch * (i + 1) / parts) for i in range(parts)}:
            sums["parts"] = [*sums["parts"], sums["part"][0] / sums["part"][1]]
            sums["part"] = [0, 0]

    def _progress(self, epoch: int, k: int, done: int, start: float) -> None:
        sums, o = self.position["sums"], self.options
        now = time.time()
        rate = done / max(now - start, 1e-9)
        left = ((self.per_epoch - k - 1) + (self.last_epoch - epoch - 1) * self.per_epoch) * o.batch_size / rate
        if o.deadline is not None:  # training stops there whatever the speed
            left = max(0.0, min(left, o.deadline - now))
        self.log(f"epoch {epoch + 1}/{o.epochs} step {k + 1}/{self.per_epoch} "
                 f"loss {sums['loss'] / sums['images']:.4f} ε {self.lr:g} {rate:.0f} img/s ETA {duration(left)}")

    def _interrupted(self, start: float) -> None:
        """Ctrl-C or SIGTERM on some rank: every rank checkpoints where it is and stops."""
        self.position["sums"]["seconds"] += time.time() - start
        self.save()
        self.replicas.barrier()  # torchrun stops the job when one rank exits: not before the save
        self._say_interrupted()
        raise KeyboardInterrupt

    def _say_interrupted(self) -> None:
        launcher = "torchrun [its options] -m" if self.replicas.started else "python -m"
        how = self.task.resume_with or f"{launcher} reproduction.train --resume --out {self.folder.path}"
        self.log(f"interrupted: checkpoint at {position_text(self.position)}; continue with {how}")

    def _keep_progress(self) -> str:
        """The loader failed: checkpoint the steps taken so far (one process; under torchrun the
        other ranks are mid-collective, so the last checkpoint stands)."""
        if self.replicas.started:
            return f"the last checkpoint stands ({self.guard.checkpoint_note})"
        if self.pending:
            self._read_back(False)
        self.save()
        return f"the progress is checkpointed at {position_text(self.position)}"

    def _keep_best(self, row: dict) -> None:
        """best.pt beside checkpoint.pt: the weights of the epoch lowest in task.best_by so far
        (for use, not --resume: it holds no optimiser or position)."""
        key = self.task.best_by
        if key is None or not self.folder.writer or row[key] >= min([r[key] for r in self.history[:-1]] or [math.inf]):
            return
        self.folder.save_as(BEST, {"model": self.task.model.state_dict(), **self.task.state, "optimizer": None,
                                   "position": None, "epoch": row["epoch"] + 1, "best": self._best_record(row)})

    def _best_record(self, row: dict) -> dict:
        key = self.task.best_by
        return {"path": BEST, "epochs_trained": row["epoch"] + 1, key: row[key], "note": SELECTED_BY_VAL} | {
            k: row[k] for k in ("val_top1_error", "val_top5_error") if k in row}

    def save(self) -> None:
        """checkpoint.pt at the position, written only when the weights are finite, so that the
        last checkpoint is always usable."""
        bad = next((name for name, p in self.task.model.named_parameters() if not torch.isfinite(p).all()), None)
        if bad is not None:
            raise TrainingStopped(f"the weights ({bad}) became non-finite by {position_text(self.position)} "
                                  f"(ε = {self.lr:g}); nothing was checkpointed. Try a smaller learning rate "
                                  f"(--set lr={self.lr / 10:g}). {self.guard.checkpoint_note}.")
        self.folder.save({"model": self.task.model.state_dict(), "optimizer": self.task.optimizer.state_dict(),
                          "position": self.position, "epoch": self.position["epoch"], **self.task.state})
        self.guard.checkpoint_note = (f"The last checkpoint ({self.folder.checkpoint}, "
                                      f"{position_text(self.position)}) held finite weights when it was written")
