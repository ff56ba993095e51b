"""Train the paper's net with the paper's recipe (§5), evaluating it as the paper did (§4.1, §6).

    python -m reproduction.train --experiment paper --data DIR [--out DIR] [--set key=value ...]
    python -m reproduction.train --resume --out DIR
    python -m reproduction.train --init-from CHECKPOINT --data DIR [--set freeze=conv1,conv2 ...]  # fine-tune
    torchrun --nproc_per_node=P -m reproduction.train ...   # P data-parallel replicas (README)

SGD with ε inside the velocity (reproduction/optim.py), batch 128, ε = 0.01 divided by 10 on
a stated plateau rule or at fixed epochs. Each epoch appends a line to metrics.jsonl and
rewrites checkpoint.pt atomically, and best.pt when its centre-patch val top-1 error is the
lowest so far (`_save_best`); Ctrl-C checkpoints at the next step boundary. A resumed
run sees the same batches, draws the same dropout masks and ends bit-identical (CPU,
deterministic) to one that was never interrupted: every random stream is a function of
(seed, epoch, step), never of how often the process was started.

Under torchrun the same loop runs as P data-parallel replicas (`Distributed`): the global batch
stays `batch_size` (§5), each replica takes a slice of it, DDP averages the gradients, and the
update is the one-process update (exactly so with dropout off: each replica draws its own masks).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import signal
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Callable, Iterator, Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.io import ImageReadMode, decode_jpeg

from reproduction import kernels, runs
from reproduction.config import RunConfig, TrainConfig, override
from reproduction.data import PackedSet, Stats, default_workers, epoch_order, num_batches, train_batches
from reproduction.distributed import Distributed, parse_devices, replica_devices, scale_batch, torchrun_replica
from reproduction.errors import UserError, debugging, reading
from reproduction.evaluate import evaluate, final_metrics
from reproduction.precision import autocast
from reproduction.experiments import EXPERIMENTS
from reproduction.model import AlexNet
from reproduction.optim import PaperSGD, fixed_schedule_lr, paper_param_groups, plateau_lr
from reproduction.weights import BEST, SELECTED_BY_VAL

_DROPOUT = 2  # key that keeps the dropout stream apart from the data's streams (data.py uses 0, 1)
# Steps between reads of the loss and error counts (one process): a read waits for the device,
# so reading every step would drain a GPU's queue once a step.
READ_EVERY = 20


class TrainingStopped(UserError, RuntimeError):
    """The guard stopped the run; the message says why and what to try. A run that produced a
    non-finite value ends here, never as a normal result (exit status 1)."""
    exit_code = 1


class Plan(Protocol):
    """A fresh run's length chosen from its own speed (the main job's time budget). After the
    first step (warm-up: kernel builds, first allocations) `steps` more steps of epoch 1 are
    timed; `choose(img_per_s, images_done, config)` then returns the config the run goes on with
    (only `epochs` may differ) and a record that config.json keeps under "plan". The timed steps
    are training steps of the run. It may raise to stop the run before its first checkpoint.

    `deadline` (a time.time(), set by choose; None: none): training stops there. The epoch in
    progress then ends early, with the images it has trained on, and is the run's last (an
    epoch not yet begun is not started); config.json's epochs and plan say where it stopped.
    After the last planned epoch, if it ended before the deadline, `extend(epoch_seconds,
    config)` may return a config with more epochs and the changes to the plan's record (or
    None): the first steps' speed is a forecast, the epochs are a measurement. A resumed run
    has no deadline: it trains the epochs its config.json holds."""
    steps: int
    deadline: float | None

    def choose(self, img_per_s: float, images_done: int, config: RunConfig) -> tuple[RunConfig, dict]: ...

    def extend(self, epoch_seconds: float, config: RunConfig) -> tuple[RunConfig, dict] | None: ...


def learning_rate(config: RunConfig, val_errors: Sequence[float]) -> float:
    """ε for the next epoch, from the centre-patch validation errors of the epochs so far."""
    t = config.train
    if t.schedule == "fixed":
        return fixed_schedule_lr(len(val_errors), t.lr, t.drop_epochs)
    return plateau_lr(val_errors, t.lr, patience=t.patience, min_improvement=t.min_improvement,
                      max_drops=t.max_drops)


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """Seed of torch's generators (dropout) for global step `step` on replica `rank`. Rank 0
    draws what a single process draws; every other replica draws masks of its own."""
    keys = [seed, _DROPOUT, step] + ([rank] if rank else [])
    return int(np.random.SeedSequence(keys).generate_state(1, np.uint64)[0] >> 1)


class Guard:
    """Stops a run that cannot learn. A NaN/inf loss stops the run. A loss still at chance,
    ln(C), after `stuck_steps` steps stops too (a warning comes at a fifth of that): the paper's
    bias-1 initialisation sits at chance for a while before it learns (~400-600 steps on a
    50-class subset, PAPER-SPEC §10) and in several frameworks never leaves it.

    The loop hands it every step's loss, in order, but only when it reads the losses back from
    the device (every READ_EVERY steps, at an epoch's end, on Ctrl-C; every step under torchrun):
    a run stops up to READ_EVERY − 1 steps after the step its message names."""

    def __init__(self, num_classes: int, stuck_steps: int, log: Callable[[str], None]) -> None:
        self.chance, self.stuck_steps, self.log = math.log(num_classes), stuck_steps, log
        self.recent: deque[float] = deque(maxlen=100)
        self.warned = False
        # What the run folder's checkpoint is worth, said in every stop message (train updates it).
        self.checkpoint_note = "no checkpoint was written by this run"

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
    """First Ctrl-C or SIGTERM (what schedulers and `timeout` send): finish the step,
    checkpoint, stop. Second: stop at once."""

    def __init__(self) -> None:
        self.requested = False

    def __enter__(self):
        # Signal handlers can only be set from the main thread; elsewhere Ctrl-C is not ours.
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
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


def automatic_choices(*, devices_given: bool, workers: int | None, devices: Sequence[torch.device],
                      config: RunConfig) -> list[str]:
    """What this run chose by itself for this machine, each with its reason (printed, and kept in
    config.json): the devices, the loader's threads, the step's threads, the CPU kernels."""
    home, cores = devices[0], os.cpu_count() or 1
    said = []
    if not devices_given:
        gpus = torch.cuda.device_count()
        why = ("no CUDA device visible" if not gpus else "two GPUs visible, one per tower" if len(devices) == 2
               else "one tower" if config.model.towers == 1 else f"{gpus} GPU visible: both towers on it")
        said.append(f"devices {','.join(map(str, devices))} ({why}; --devices chooses)")
    if workers is None:
        rule = ("one per 4 cores, at least 1: the step's own threads need the rest" if home.type == "cpu"
                else "one per core, at most 8")
        said.append(f"{default_workers(home)} loader thread(s) of {cores} cores ({rule}; --workers chooses)")
    if home.type == "cpu":
        said.append(f"{torch.get_num_threads()} compute threads (torch's default, one per core)")
        t = config.train
        if t.fused_lrn or t.fused_sgd:
            said.append("the C kernels for the LRN and the update " + (
                "built with -march=native" if kernels.library() else
                "could not be built: plain PyTorch, the same formulas (see the warning above)"))
    return said


def train(config: RunConfig, data_dir: Path, out: Path, *, experiment: str = "custom",
          resume: bool = False, devices: Sequence[torch.device] | None = None,
          workers: int | None = None, max_epochs: int | None = None,
          command: Sequence[str] | None = None, log: Callable[[str], None] = print,
          replicas: Distributed | None = None, batch_scaling: dict | None = None,
          init_from: Path | None = None, plan: Plan | None = None) -> dict:
    """Run (or resume) training into the run folder `out`; returns the final metrics.

    max_epochs stops after that many epochs in this process (staged runs); the run folder then
    resumes with --resume. command: what config.json records as the command (default: sys.argv).
    replicas: this process's place among data-parallel replicas (default: the only one); every
    replica calls train with the same arguments but its own devices. batch_scaling: the record
    of `scale_batch`, kept in config.json. init_from: a checkpoint (trained or imported) whose
    weights the run starts from, fc8 re-initialised when the class count differs (fine-tuning).
    plan: choose a fresh run's epochs from its measured speed (`Plan`; one process only).
    """
    replicas = replicas or Distributed()
    with runs.RunFolder(out, writer=replicas.is_main) as folder:  # locked while this process writes it
        return _train(config, Path(data_dir), folder, experiment=experiment, resume=resume, devices=devices,
                      workers=workers, max_epochs=max_epochs, command=command, log=log, replicas=replicas,
                      batch_scaling=batch_scaling, init_from=init_from, plan=plan)


def _train(config: RunConfig, data_dir: Path, folder: runs.RunFolder, *, experiment: str, resume: bool,
           devices: Sequence[torch.device] | None, workers: int | None, max_epochs: int | None,
           command: Sequence[str] | None, log: Callable[[str], None], replicas: Distributed,
           batch_scaling: dict | None, init_from: Path | None, plan: Plan | None) -> dict:
    run = _setup(config, data_dir, folder, experiment=experiment, resume=resume, devices=devices,
                 workers=workers, max_epochs=max_epochs, command=command, log=log, replicas=replicas,
                 batch_scaling=batch_scaling, init_from=init_from, plan=plan)
    with Interrupt() as interrupt:
        while run.position["epoch"] < run.last_epoch:
            if run.deadline is not None and time.time() >= run.deadline:
                _stop_at_deadline(run, None)  # not one step of this epoch before the deadline
                break
            _epoch(run, interrupt)
            if run.extend is not None and run.position["epoch"] == run.last_epoch == run.config.train.epochs:
                _extend(run)
    if run.position["epoch"] < run.config.train.epochs:
        return {"stopped_at_epoch": run.position["epoch"]}
    return _finish(run)


@dataclasses.dataclass
class _Run:
    """A run's state between `_setup`, its `_epoch`s and `_finish`."""
    config: RunConfig
    folder: runs.RunFolder
    data_dir: Path
    experiment: str
    train_set: PackedSet
    val_set: PackedSet
    stats: Stats
    model: AlexNet  # the bare net: its state_dict and evaluation
    step_fn: nn.Module  # what a training step calls (compiled, or under DDP)
    optimizer: PaperSGD
    replicas: Distributed
    guard: Guard
    position: dict  # epoch, batch and step reached, and the epoch's running sums
    history: list[dict]  # metrics.jsonl's rows
    last_epoch: int  # where this process stops (max_epochs: a staged run)
    max_epochs: int | None
    plan: Plan | None  # until the plan has chosen the epochs
    deadline: float | None  # the plan's: training stops there (Plan)
    extend: Callable[[float, RunConfig], tuple[RunConfig, dict] | None] | None  # the plan's, once it has chosen
    eval_kw: dict
    workers: int | None
    log: Callable[[str], None]
    lr: float = 0.0
    last_val: dict | None = None  # the last validation in this process: the final centre result
    pending: list[tuple[Tensor, Tensor, int]] = dataclasses.field(default_factory=list)  # not yet read back

    @property
    def batches_per_epoch(self) -> int:
        return num_batches(len(self.train_set), self.config.train.batch_size)

    def save(self, position: dict) -> None:
        """checkpoint.pt at `position`, written only when its weights are finite, so that the last
        one is always usable."""
        bad = next((name for name, p in self.model.named_parameters() if not torch.isfinite(p).all()), None)
        if bad is not None:
            raise TrainingStopped(f"the weights ({bad}) became non-finite by {position_text(position)} (ε = {self.lr:g}); "
                                  f"nothing was checkpointed. Try a smaller learning rate (--set lr={self.lr / 10:g}). "
                                  f"{self.guard.checkpoint_note}.")
        self.folder.save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                          "position": position, "config": runs.config_dict(self.config), "epoch": position["epoch"],
                          "classes": self.class_ids()})  # so an ensemble can check its members agree
        self.guard.checkpoint_note = (f"The last checkpoint ({self.folder.path / runs.CHECKPOINT}, "
                                      f"{position_text(position)}) held finite weights when it was written")

    def keep_progress(self) -> str:
        """The loader failed: checkpoint the steps taken so far (one process; under torchrun the
        other ranks are mid-collective, so the last checkpoint stands)."""
        if self.replicas.started:
            return f"the last checkpoint stands ({self.guard.checkpoint_note})"
        if self.pending:
            _read_back(self.pending, self.position["sums"], self.guard, self.replicas, self.position["step"],
                       self.lr, False)
        self.save(self.position)
        return f"the progress is checkpointed at {position_text(self.position)}"

    def class_ids(self) -> list[str]:
        return [c["id"] for c in self.train_set.classes]


def _setup(config: RunConfig, data_dir: Path, folder: runs.RunFolder, *, experiment: str, resume: bool,
           devices: Sequence[torch.device] | None, workers: int | None, max_epochs: int | None,
           command: Sequence[str] | None, log: Callable[[str], None], replicas: Distributed,
           batch_scaling: dict | None, init_from: Path | None, plan: Plan | None) -> _Run:
    """Read and check everything (the folder, the data, a resumed checkpoint) before writing
    anything; then build the net and its optimiser, and start or resume the run folder."""
    command = list(sys.argv if command is None else command)
    if not replicas.is_main:
        log = _quiet  # rank 0 alone prints
    t = config.train
    if plan is not None and (resume or replicas.started):
        raise ValueError("a plan sizes a fresh run of one process (a resumed run keeps its planned epochs)")
    if t.batch_size < replicas.world:
        raise UserError(f"a global batch of {t.batch_size} cannot be split between {replicas.world} "
                        f"replicas; use --global-batch or fewer processes")
    out = folder.path
    if resume:
        state, meta, _ = folder.open_for_resume()
    else:
        folder.check_fresh()
    train_set, val_set, stats = runs.open_data(data_dir)
    classes = len(train_set.classes)
    if init_from is None and not resume and config.model.num_classes not in (classes, 1000):
        raise UserError(f"num_classes={config.model.num_classes} but {data_dir} has {classes} classes")
    config = override(config, {"num_classes": classes})  # fc8's width follows the data
    identity = runs.data_identity(data_dir, train_set, val_set)
    devices_arg, devices = devices, tuple(devices or parse_devices(None, config.model.towers))
    home = devices[0]  # batches arrive on tower A's device; conv1 hands them to each tower
    lrn_operator = t.fused_lrn
    if t.deterministic:  # process-wide; before the first cuBLAS call (the model's fc6 on CUDA)
        if deterministic_setup(devices) and not lrn_operator:
            lrn_operator = True
            log("deterministic on CUDA: §3.3's LRN runs as the reproduction::lrn operator (its Triton "
                "backward is deterministic; F.local_response_norm's avg_pool3d backward has no "
                "deterministic CUDA kernel); the same formula")
    if home.type == "cuda":  # cuDNN times its kernels per shape and keeps the fastest (not bit-repeatable)
        torch.backends.cudnn.benchmark = not t.deterministic

    torch.manual_seed(t.seed)  # the initial weights (§5)
    model = AlexNet(config.model, devices=devices)
    model.set_fused_lrn(lrn_operator)
    if init_from is not None and not resume:
        log(load_pretrained(model, Path(init_from)))
    for name in t.freeze:  # fine-tuning: these layers keep their loaded weights
        getattr(model, name).requires_grad_(False)
    optimizer = PaperSGD(paper_param_groups(model, t.weight_decay), lr=t.lr, momentum=t.momentum,
                         fused=t.fused_sgd)
    position = {"epoch": 0, "batch": 0, "step": 0, "sums": _zero_sums()}
    replicas.barrier()  # every rank has read and checked the folder before rank 0 writes it
    if resume:
        saved = runs.config_of(state, folder.checkpoint)
        folder.check_resume(meta, saved, config, state["position"], identity)
        with reading(folder.checkpoint, "checkpoint whose weights fit the resumed config",
                     "resume without --set changes to the architecture"):
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        position = state["position"]
        changed = _differences(saved, config)
        if changed:
            log(f"resuming with a changed config ({changed}): the run is no longer one run of one config")
        entry = {"at": position_text(position), "changed": changed, "git": runs.git_state(),
                 "command": command, "world_size": replicas.world, "data": str(data_dir)}
        history = folder.resumed(meta, config, position["epoch"], entry)
    else:
        folder.create()
        history = []
        folder.start(runs.run_record(experiment, config, command=command, devices=devices, data=identity,
                                     distributed=replicas.describe() | {"global_batch": t.batch_size},
                                     batch_scaling=batch_scaling, init_from=init_from))
    for note in folder.notes:
        log(note)
    automatic = automatic_choices(devices_given=bool(devices_arg), workers=workers, devices=devices, config=config)
    if automatic:
        log("chosen for this machine: " + "; ".join(automatic))
        if not resume:
            folder.amend({"automatic": automatic})
    if resume:
        log(f"resumed {out} at {position_text(position)}")
    if replicas.started:
        least, most = t.batch_size // replicas.world, -(-t.batch_size // replicas.world)
        log(f"{replicas.world} replicas ({replicas.describe()['backend']}): global batch {t.batch_size}, "
            f"{least if least == most else f'{least}-{most}'} images per replica; rank 0 on "
            f"{', '.join(map(str, devices))}")
    # stuck_steps=0: scaled with the epoch (half an ILSVRC epoch is too soon for the paper's init).
    guard = Guard(classes, t.stuck_steps or max(5000, 3 * num_batches(len(train_set), t.batch_size)), log)
    if resume:
        guard.checkpoint_note = f"The checkpoint this run resumed from ({position_text(position)}) is kept"
    return _Run(config=config, folder=folder, data_dir=data_dir, experiment=experiment, train_set=train_set,
                val_set=val_set, stats=stats, model=model, step_fn=step_module(model, t, replicas),
                optimizer=optimizer, replicas=replicas, guard=guard, position=position, history=history,
                last_epoch=t.epochs if max_epochs is None else min(t.epochs, position["epoch"] + max_epochs),
                max_epochs=max_epochs, plan=plan, deadline=None, extend=None, workers=workers, log=log,
                eval_kw=dict(batch_size=t.batch_size, device=home, precision=t.precision,
                             channels_last=t.channels_last, workers=workers, replicas=replicas))


def _epoch(run: _Run, interrupt: Interrupt) -> None:
    """One epoch (or the rest of one, resumed): its steps, its validation (centre patch), its
    line in metrics.jsonl and its checkpoint. A plan chooses the run's epochs during the first."""
    config, t, log, replicas = run.config, run.config.train, run.log, run.replicas
    train_set, home = run.train_set, run.eval_kw["device"]
    epoch = run.position["epoch"]
    run.lr = lr = learning_rate(config, [r["val_top1_error"] for r in run.history])
    for group in run.optimizer.param_groups:
        group["lr"] = lr  # a drop leaves the velocity at its old scale (§5's form)
    run.model.train()
    sums, start, last_print = run.position["sums"], time.time(), time.time()
    probe = (time.perf_counter(), 0)  # a plan's clock; restarted after the warm-up step
    images_this_run = 0
    batches = train_batches(train_set, run.stats, config.data, batch_size=t.batch_size, seed=t.seed,
                            epoch=epoch, device=home, start_batch=run.position["batch"], workers=run.workers,
                            shard=(replicas.rank, replicas.world),  # this replica's slice
                            channels_last=t.channels_last)
    batches = _naming_bad_images(batches, train_set, epoch_order(len(train_set), seed=t.seed, epoch=epoch),
                                 t.batch_size, run.position["batch"], run.keep_progress)
    # Under torchrun every step: the read is also the reduction in which all ranks learn of a
    # Ctrl-C that reached one of them, and they must stop at the same step.
    read_every = 1 if replicas.started else READ_EVERY
    per_epoch = run.batches_per_epoch
    run.pending = pending = []
    cut = False  # the plan's deadline came before the epoch's last batch
    for k, (x, y) in enumerate(batches, start=run.position["batch"]):
        n = min(t.batch_size, len(train_set) - k * t.batch_size)  # images in the global batch
        torch.manual_seed(step_seed(t.seed, run.position["step"], replicas.rank))  # dropout masks
        loss, errors = train_step(run.step_fn, run.optimizer, x, y, n=n, precision=t.precision,
                                  channels_last=t.channels_last, world=replicas.world)
        pending.append((loss, errors, n))
        run.position = {"epoch": epoch, "batch": k + 1, "step": run.position["step"] + 1, "sums": sums}
        images_this_run += n
        if run.plan is not None and (run.position["step"] in (1, 1 + run.plan.steps) or k + 1 == per_epoch):
            loss.item()  # the step is done (a GPU's queue drained) before the clock is read
            if run.position["step"] == 1 and k + 1 < per_epoch:
                probe = (time.perf_counter(), images_this_run)  # after the warm-up step
            else:
                began, before = probe  # (an epoch of one batch: timed from the epoch's start)
                rate = (images_this_run - before) / (time.perf_counter() - began)
                config, record = run.plan.choose(rate, images_this_run, config)
                run.config, t, run.deadline, run.extend = config, config.train, run.plan.deadline, run.plan.extend
                run.plan = None
                run.last_epoch = t.epochs if run.max_epochs is None else min(t.epochs, run.max_epochs)
                run.folder.amend({"plan": record, "config": runs.config_dict(config)})
        cut = run.deadline is not None and k + 1 < per_epoch and time.time() >= run.deadline
        end = k + 1 == per_epoch or cut
        if not (run.position["step"] % read_every == 0 or end or interrupt.requested):
            continue
        stop = _read_back(pending, sums, run.guard, replicas, run.position["step"], lr, interrupt.requested)
        now = time.time()
        if now - last_print >= 10 or end:
            rate = images_this_run / (now - start)
            left = (per_epoch - k - 1) * t.batch_size / rate
            left += (run.last_epoch - epoch - 1) * per_epoch * t.batch_size / rate
            if run.deadline is not None:  # training stops there whatever the speed
                left = max(0.0, min(left, run.deadline - now))
            log(f"epoch {epoch + 1}/{t.epochs} step {k + 1}/{per_epoch} "
                f"loss {sums['loss'] / sums['images']:.4f} ε {lr:g} {rate:.0f} img/s "
                f"ETA {_duration(left)}")
            last_print = now
        if stop:
            sums["seconds"] += time.time() - start
            run.save(run.position)
            replicas.barrier()  # torchrun stops the job when one rank exits: not before the save
            launcher = "torchrun [its options] -m" if replicas.started else "python -m"
            log(f"interrupted: checkpoint at epoch {epoch + 1}, batch {k + 1}; continue with "
                f"{launcher} reproduction.train --resume --out {run.folder.path}")
            raise KeyboardInterrupt
        if cut:
            batches.close()  # the loader's threads stop with it
            _stop_at_deadline(run, sums["images"])
            config, t = run.config, run.config.train
            break
    seconds = sums["seconds"] + time.time() - start
    val = run.last_val = evaluate(run.model, run.val_set, run.stats, config.data, ten_patch=False, **run.eval_kw)
    if not (math.isfinite(val["loss"]) and math.isfinite(sums["loss"])):
        raise TrainingStopped(f"epoch {epoch + 1} (ε = {lr:g}) produced a non-finite "
                              f"{'validation loss' if math.isfinite(sums['loss']) else 'training loss'}: "
                              f"the net's outputs overflowed; nothing of this epoch is recorded. Try a "
                              f"smaller learning rate (--set lr={lr / 10:g}). {run.guard.checkpoint_note}.")
    row = {"epoch": epoch, "step": run.position["step"], "lr": lr,
           "train_loss": sums["loss"] / sums["images"], "train_error": sums["errors"] / sums["images"],
           "val_top1_error": val["top1_error"], "val_top5_error": val["top5_error"],
           "val_loss": val["loss"], "img_per_s": sums["images"] / seconds, "seconds": seconds,
           **({"images": sums["images"]} if cut else {})}  # an epoch the deadline ended early
    run.folder.append(row)
    run.history.append(row)
    log(f"epoch {epoch + 1}/{t.epochs}: train loss {row['train_loss']:.4f} error "
        f"{row['train_error']:.4f} | val top-1 {val['top1_error']:.4f} top-5 "
        f"{val['top5_error']:.4f} (centre patch) | ε {lr:g} | {_duration(seconds)}")
    run.position = {"epoch": epoch + 1, "batch": 0, "step": run.position["step"], "sums": _zero_sums()}
    run.save(run.position)
    if run.folder.writer and row["val_top1_error"] < min([r["val_top1_error"] for r in run.history[:-1]] or [math.inf]):
        _save_best(run.folder, row, {"model": run.model.state_dict(), "config": runs.config_dict(config),
                                     "classes": run.class_ids()})


def _extend(run: _Run) -> None:
    """The last planned epoch ended before the plan's deadline: the plan may add epochs."""
    more = run.extend(run.history[-1]["seconds"], run.config)
    if more is None:
        return
    run.config, changes = more
    run.last_epoch = run.config.train.epochs
    run.save(run.position)  # a resume goes on with the added epochs too
    _amend_plan(run, changes)


def _amend_plan(run: _Run, changes: dict) -> None:
    """config.json's plan with `changes`, and its config as the run now goes on."""
    plan = runs.read_json(run.folder.path / "config.json").get("plan", {}) if run.folder.writer else {}
    run.folder.amend({"plan": plan | changes, "config": runs.config_dict(run.config)})


def _stop_at_deadline(run: _Run, images: int | None) -> None:
    """The plan's deadline has come: the epoch in progress (`images` trained so far in it) is the
    run's last, or, with images=None, the epoch about to begin is not started. config.json's
    epochs and plan say so, and so do the checkpoints written from now on."""
    epoch = run.position["epoch"] + (images is not None)
    planned = run.config.train.epochs
    run.config = override(run.config, {"epochs": epoch})
    run.last_epoch = epoch
    where = (f"epoch {epoch} ended after {images:,} of its {len(run.train_set):,} images" if images is not None
             else f"after epoch {epoch}, before epoch {epoch + 1} began")
    stopped = f"at the budget's deadline: {where}" + (f" ({epoch} of the {planned} planned epochs)"
                                                       if epoch < planned else "")
    run.log(f"stopped {stopped}")
    if images is None:
        run.save(run.position)  # the last checkpoint's config: what a resume goes on with
    _amend_plan(run, {"stopped": stopped, "epochs": epoch})


def _finish(run: _Run) -> dict:
    """The trained net on the val set by both protocols (§4.1: centre patch, ten patches) into
    final.json; the last epoch's validation in this process is the centre result."""
    final = final_metrics(run.model, run.val_set, run.stats, run.config.data, centre=run.last_val, **run.eval_kw)
    if not all(math.isfinite(final[p]["loss"]) for p in ("centre", "ten_patch")):
        raise TrainingStopped(f"the final evaluation produced a non-finite loss; no final.json is written. "
                              f"{run.guard.checkpoint_note}.")
    final |= {"experiment": run.experiment, "epochs": run.position["epoch"], "steps": run.position["step"],
              "seed": run.config.train.seed, "data": str(run.data_dir)}
    if run.history and "images" in run.history[-1]:  # the plan's deadline ended the last epoch early
        final["last_epoch_images"] = run.history[-1]["images"]
    run.folder.finish(final)
    run.log(f"final: centre patch top-1 {final['centre']['top1_error']:.4f} top-5 "
            f"{final['centre']['top5_error']:.4f} | ten patches top-1 {final['ten_patch']['top1_error']:.4f} "
            f"top-5 {final['ten_patch']['top5_error']:.4f} -> {run.folder.path / 'final.json'}")
    return final


def deterministic_setup(devices: Sequence[torch.device]) -> bool:
    """TrainConfig.deterministic: torch.use_deterministic_algorithms(True) for the process and,
    when a tower is on CUDA, CUBLAS_WORKSPACE_CONFIG=:4096:8 unless the environment sets it
    (cuBLAS raises without it; it must be set before the process's first cuBLAS call, which
    `train` makes after this). Returns whether a tower is on CUDA, where the LRN must run as
    the reproduction::lrn operator: F.local_response_norm's avg_pool3d backward has no
    deterministic CUDA kernel, the operator's Triton backward (no atomics) is deterministic."""
    torch.use_deterministic_algorithms(True)
    cuda = any(torch.device(d).type == "cuda" for d in devices)
    if cuda:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    return cuda


def step_module(model: AlexNet, t: TrainConfig, replicas: Distributed | None = None) -> nn.Module:
    """What `train_step` calls: the net in channels_last, wrapped by DDP and compiled, as `t`
    asks (opt-in speed flags; `model` itself is changed only in its memory format).

    compile: dynamic=False. An epoch's last batch is partial (exact epochs keep it), so the
    step sees two batch sizes. With dynamic=None the second size makes Dynamo recompile with a
    symbolic batch dimension, and that one dynamic graph (slower, shape-generic kernels) then
    serves every later full batch too. Static shapes give two graphs, each compiled once (the
    partial batch's size is the same every epoch) and the full batch keeps its own."""
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
    `world` replicas sums its slice (an empty slice adds 0) and DDP averages over the
    replicas: so ·world/n, and the returned loss is the batch's mean loss ·world."""
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


def synthetic_batch(batch: int, classes: int, device: torch.device | str) -> tuple[Tensor, Tensor]:
    """Mean-centred-looking pixels (0–255 scale, §2) and random labels; speed does not depend on them."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 224, 224, generator=g) * 60
    return x.to(device), torch.randint(0, classes, (batch,), generator=g).to(device)


def synthetic_step(config: RunConfig, device: torch.device | str) -> tuple[Callable[[], tuple], AlexNet, PaperSGD]:
    """`train_step` of `config`'s net, recipe and speed flags on one fixed synthetic batch of
    its batch size (a fresh net, not a run's): what `bench model` and the main job's choice of
    precision time. Returns the step, the net and its optimiser."""
    t = config.train
    model = AlexNet(config.model, devices=(device,))
    model.set_fused_lrn(t.fused_lrn)
    optimizer = PaperSGD(paper_param_groups(model, t.weight_decay), lr=t.lr, momentum=t.momentum,
                         fused=t.fused_sgd)
    module = step_module(model, t)
    x, y = synthetic_batch(t.batch_size, config.model.num_classes, device)
    if t.channels_last:  # as the loader delivers it
        x = x.contiguous(memory_format=torch.channels_last)

    def step():
        return train_step(module, optimizer, x, y, n=len(y), precision=t.precision, channels_last=t.channels_last)
    return step, model, optimizer


def _read_back(pending: list[tuple[Tensor, Tensor, int]], sums: dict, guard: Guard, replicas: Distributed,
               step: int, lr: float, interrupted: bool) -> bool:
    """Read the pending steps' losses and error counts back (one wait for the device), sum them
    over the replicas with the interrupt flags (one reduction), check each step's mean loss in
    order, and add them to `sums` step by step (so sums do not depend on when reads happen).
    Returns whether any rank was interrupted. `step` is the last pending step's number."""
    losses = torch.stack([loss for loss, _, _ in pending]).tolist()
    errors = torch.stack([e for _, e, _ in pending]).tolist()
    *totals, stop = replicas.sum([*losses, *errors, interrupted])
    first = step - len(pending) + 1
    for i, (_, _, n) in enumerate(pending):
        loss_value = totals[i] / replicas.world  # the batch's mean loss, alike on every rank
        guard.check(loss_value, first + i, lr)
        sums["loss"] += loss_value * n
        sums["errors"] += int(totals[len(pending) + i])
        sums["images"] += n
    pending.clear()
    return bool(stop)


def _naming_bad_images(batches: Iterator[tuple[Tensor, Tensor]], dataset, order: Tensor, batch_size: int,
                       start: int, keep_progress: Callable[[], str]) -> Iterator[tuple[Tensor, Tensor]]:
    """The loader's batches. One that cannot be decoded (a damaged JPEG inside <split>.jpg.bin)
    keeps the progress and names its image(s) instead of a decoder traceback."""
    k, batches = start, iter(batches)
    while True:
        try:
            item = next(batches)
        except StopIteration:
            return
        except RuntimeError as e:
            bad = _undecodable(dataset, order[k * batch_size:(k + 1) * batch_size].tolist())
            if not bad:
                raise
            kept = keep_progress()
            raise UserError(f"{dataset.root / (dataset.split + '.jpg.bin')}: {', '.join(bad[:5])} cannot be decoded "
                            f"({str(e).splitlines()[0][:80]}); {kept}. Re-prepare the set from its source "
                            "(python -m data_prep ... --force), then --resume") from None
        try:
            yield item
        except GeneratorExit:  # closed early (the plan's deadline): the loader's threads stop now
            getattr(batches, "close", lambda: None)()
            raise
        k += 1


def _undecodable(dataset, indices: list[int]) -> list[str]:
    names = (dataset.root / f"{dataset.split}.names.txt").read_text().splitlines()
    bad = []
    for i in indices:
        try:
            decode_jpeg(dataset.encoded([i])[0], mode=ImageReadMode.RGB)
        except RuntimeError:
            bad.append(f"image {i} ({names[i] if i < len(names) else '?'})")
    return bad


def load_pretrained(model: AlexNet, path: Path) -> str:
    """Copy a checkpoint's weights into `model`. fc8 is kept at its fresh §5 initialisation when
    the checkpoint has another number of classes; any other mismatch is an error. Returns what
    was done, for the log."""
    weights = runs.load_checkpoint(path)["model"]
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


def position_text(position: dict) -> str:
    return f"epoch {position['epoch'] + 1}, batch {position['batch']} (step {position['step']})"


def _quiet(message: str) -> None:
    pass


def _zero_sums() -> dict:
    return {"loss": 0.0, "errors": 0, "images": 0, "seconds": 0.0}


def _differences(a: RunConfig, b: RunConfig) -> str:
    da, db = runs.config_dict(a), runs.config_dict(b)
    return ", ".join(f"{part}.{k}: {da[part][k]!r} -> {db[part][k]!r}"
                     for part in da for k in da[part] if da[part][k] != db[part][k])


def _save_best(folder: runs.RunFolder, row: dict, state: dict) -> None:
    """best.pt beside checkpoint.pt: the weights of the epoch with the lowest centre-patch val
    top-1 error so far (for use, not --resume: no optimiser or position), noted in config.json."""
    best = {"path": BEST, "epochs_trained": row["epoch"] + 1, "val_top1_error": row["val_top1_error"],
            "val_top5_error": row["val_top5_error"], "note": SELECTED_BY_VAL}
    runs.save_checkpoint(folder.path / BEST, state | {"optimizer": None, "position": None,
                                                      "epoch": row["epoch"] + 1, "best": best})
    meta = runs.read_json(folder.path / "config.json")
    runs.write_json(folder.path / "config.json", meta | {"best_checkpoint": best})


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, m, s = seconds // 3600, seconds // 60 % 60, seconds % 60
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m reproduction.train",
        description="Train AlexNet with the paper's recipe (§5) on a folder prepared by "
                    "`python -m data_prep`, writing config.json, metrics.jsonl, checkpoint.pt and "
                    "final.json (centre-patch and ten-patch top-1/top-5 error) into the run folder.",
        epilog="Experiments: " + ", ".join(EXPERIMENTS) + ". Config keys: " + ", ".join(
            f.name for part in dataclasses.fields(RunConfig) for f in dataclasses.fields(
                getattr(RunConfig(), part.name))) + ".")
    parser.add_argument("--experiment", default=None, choices=sorted(EXPERIMENTS),
                        help="the paper's run (default) or one of its ablations (reproduction/experiments.py)")
    parser.add_argument("--data", type=Path, help="a folder prepared by python -m data_prep")
    parser.add_argument("--out", type=Path, help="the run folder (default: runs/<experiment>/seed<seed>)")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="config overrides, e.g. --set epochs=30 lr=0.005 schedule=fixed drop_epochs=10,20")
    parser.add_argument("--init-from", type=Path, default=None, metavar="CHECKPOINT",
                        help="fine-tune: start from this checkpoint (ours, or one made by reproduction.caffe); "
                             "its architecture and input pipeline are kept, fc8 is re-initialised for the "
                             "data's classes, --set freeze=conv1,conv2 keeps layers as loaded")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its checkpoint (its config.json decides the rest)")
    parser.add_argument("--devices", default=None,
                        help="cpu, cuda:0, or one device per tower such as cuda:0,cuda:1 "
                             "(default: both visible GPUs, else one GPU, else the CPU)")
    parser.add_argument("--workers", type=int, default=None, help="loader threads (default: one per core, at most 8, for a GPU; one per 4 cores beside a CPU step)")
    parser.add_argument("--global-batch", type=int, default=None, metavar="N",
                        help="a global batch of N images instead of the experiment's (128, §5), with ε "
                             "scaled linearly, ε·N/128 (not the paper's recipe; recorded in config.json)")
    parser.add_argument("--timeout", type=float, default=600.0, metavar="SECONDS",
                        help="under torchrun: how long a rank waits for the others in a collective before "
                             "the job fails instead of hanging (default 600)")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    replica = torchrun_replica()
    if replica is not None and args.devices not in (None, "cpu"):
        parser.error("under torchrun each process places its towers itself (see README); --devices can "
                     "only be cpu")
    replicas, scaling = Distributed(), None
    try:
        if args.resume:
            if args.out is None:
                parser.error("--resume needs --out, the run folder to continue")
            if args.global_batch is not None:
                parser.error("--global-batch is chosen when a run starts; its checkpoint holds the batch and ε")
            if not (args.out / runs.CHECKPOINT).is_file():
                held = runs.RunFolder(args.out).held()
                raise UserError(f"--resume: {args.out} holds no {runs.CHECKPOINT} ({', '.join(held) or 'no run files'}): "
                                "nothing to continue; start a fresh run in another --out")
            saved = runs.load_checkpoint(args.out / runs.CHECKPOINT)
            config = _override(runs.config_of(saved, args.out / runs.CHECKPOINT), args.set)
            meta = runs.read_json_file(args.out / "config.json", "run record (config.json)",
                                       "the run folder is damaged; start a fresh run in another --out")
            if not isinstance(meta, dict) or "experiment" not in meta or "path" not in meta.get("data", {}):
                raise UserError(f"{args.out / 'config.json'} is not this project's run record (no 'experiment' "
                                "or 'data'); start a fresh run in another --out")
            experiment = meta["experiment"]
            data = args.data or Path(meta["data"]["path"])
        else:
            if args.data is None:
                parser.error("--data is required (a folder prepared by python -m data_prep)")
            if args.init_from is not None:
                if args.experiment is not None:
                    parser.error("--init-from takes its architecture and recipe from the checkpoint; "
                                 "give --set changes instead of --experiment")
                base = runs.config_of(runs.load_checkpoint(args.init_from), args.init_from)
                args.experiment = "finetune"
            else:
                args.experiment = args.experiment or "paper"
                base = EXPERIMENTS[args.experiment]
            config = _override(base, args.set)
            if args.global_batch is not None:
                config, scaling = scale_batch(config, args.global_batch)
            experiment, data = args.experiment, args.data
        out = args.out or Path("runs") / experiment / f"seed{config.train.seed}"
        if replica is None:
            devices = parse_devices(args.devices, config.model.towers)
        else:
            devices = parse_devices("cpu", 1) if args.devices else replica_devices(
                *replica, config.model.towers, torch.cuda.device_count())
            replicas = Distributed.start(devices, timeout=args.timeout)
        with replicas:
            train(config, data, out, experiment=experiment, resume=args.resume, devices=devices,
                  workers=args.workers, command=["python", "-m", "reproduction.train", *argv],
                  replicas=replicas, batch_scaling=scaling, init_from=None if args.resume else args.init_from)
    except UserError as e:  # the errors.py convention, with the rank named under torchrun
        if debugging():
            raise
        print(f"error{_where(replicas)}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        if replicas.world > 1:  # name the rank; one waiting in a collective fails when a peer dies
            print(f"error{_where(replicas)}: {type(e).__name__}: {e}\n(if another rank stopped first, "
                  f"its own error says why; a silent peer fails this rank after --timeout "
                  f"{args.timeout:g} s)", file=sys.stderr)
        raise
    return 0


def _override(config: RunConfig, changes: Sequence[str]) -> RunConfig:
    try:
        return override(config, changes)
    except ValueError as e:
        raise UserError(f"--set: {e}") from None


def _where(replicas: Distributed) -> str:
    return f" (rank {replicas.rank} of {replicas.world})" if replicas.world > 1 else ""


if __name__ == "__main__":
    sys.exit(main())
