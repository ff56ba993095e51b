"""Train the paper's net with the paper's recipe (§5), evaluating it as the paper did (§4.1, §6).

    python -m reproduction.train --experiment paper --data DIR [--out DIR] [--set key=value ...]
    python -m reproduction.train --resume --out DIR
    python -m reproduction.train --init-from CHECKPOINT --data DIR [--set freeze=conv1,conv2 ...]  # fine-tune
    torchrun --nproc_per_node=P -m reproduction.train ...   # P data-parallel replicas (docs/scaling.md)

SGD with ε inside the velocity (optim.py), batch 128, ε = 0.01 divided by 10 on a stated
plateau rule or at fixed epochs, trained by the one loop (loop.py): each epoch appends a line
to metrics.jsonl and rewrites checkpoint.pt atomically; a resumed run ends bit-identical to one
never interrupted. Under torchrun the global batch stays `batch_size` (§5), each replica takes
a slice of it and DDP averages the gradients.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor

from reproduction.ops import kernels
from reproduction.training.build import build, deterministic_setup
from reproduction.training.checkpoints import CHECKPOINT, config_dict, config_of, load_checkpoint
from reproduction.config import RunConfig, override
from reproduction.data import PackedSet, default_workers, epoch_order, name_undecodable, train_batches
from reproduction.training.distributed import Distributed, parse_devices, replica_devices, scale_batch, torchrun_replica
from reproduction.errors import UserError, debugging, reading
from reproduction.evaluate import evaluate, final_metrics
from reproduction.experiments import EXPERIMENTS
from reproduction.files import read_json_file
from reproduction.training.loop import Loop, Options, Task, TrainingStopped, position_text
from reproduction.optim import fixed_schedule_lr, plateau_lr
from reproduction.training.runfolder import RunFolder, data_identity, git_state, locate_data, open_data, run_record


def learning_rate(config: RunConfig, val_errors: Sequence[float]) -> float:
    """ε for the next epoch, from the centre-patch validation errors of the epochs so far."""
    t = config.train
    if t.schedule == "fixed":
        return fixed_schedule_lr(len(val_errors), t.lr, t.drop_epochs)
    return plateau_lr(val_errors, t.lr, patience=t.patience, min_improvement=t.min_improvement,
                      max_drops=t.max_drops)


@dataclasses.dataclass(frozen=True)
class Launch:
    """How one process runs a training: everything besides the config, data and run folder."""
    experiment: str = "custom"
    resume: bool = False
    devices: Sequence[torch.device] | None = None  # None: both visible GPUs, else one, else the CPU
    workers: int | None = None                     # loader threads (None: default_workers)
    max_epochs: int | None = None                  # epochs this process trains (staged runs)
    deadline: float | None = None                  # time.time() at which training stops (a budget)
    command: Sequence[str] | None = None           # what config.json records (default sys.argv)
    record: dict | None = None                     # more of config.json (e.g. the main job's plan)
    replicas: Distributed | None = None            # this process's place among torchrun's replicas
    batch_scaling: dict | None = None              # scale_batch's record
    init_from: Path | None = None                  # fine-tune from this checkpoint's weights
    restart: bool = False                          # a folder stopped before its first checkpoint starts again
    log: Callable[[str], None] = print


def train(config: RunConfig, data_dir: Path, out: Path, **launch) -> dict:
    """Run (or resume) training into the run folder `out`; returns final.json's numbers (or
    where a staged run stopped). `launch`: the fields of `Launch`."""
    how = Launch(**launch)
    replicas = how.replicas or Distributed()
    how = dataclasses.replace(how, replicas=replicas, log=how.log if replicas.is_main else _quiet)
    with RunFolder(out, writer=replicas.is_main) as folder:  # locked while this process writes it
        final = _start(config, Path(data_dir), folder, how).run()
    if "centre" in final:
        how.log(f"final: centre patch top-1 {final['centre']['top1_error']:.4f} top-5 "
                f"{final['centre']['top5_error']:.4f} | ten patches top-1 {final['ten_patch']['top1_error']:.4f} "
                f"top-5 {final['ten_patch']['top5_error']:.4f} -> {Path(out) / 'final.json'}")
    return final


def _start(config: RunConfig, data_dir: Path, folder: RunFolder, how: Launch) -> Loop:
    """Read and check everything (the folder, the data, a resumed checkpoint) before writing
    anything; then build the net and start or resume the run folder."""
    replicas, t, log = how.replicas, config.train, how.log
    if t.batch_size < replicas.world:
        raise UserError(f"a global batch of {t.batch_size} cannot be split between {replicas.world} "
                        f"replicas; use --global-batch or fewer processes")
    resumed = folder.open_for_resume() if how.resume else folder.check_fresh(restart=how.restart)
    train_set, val_set, stats = open_data(data_dir)
    classes = len(train_set.classes)
    if how.init_from is None and not how.resume and config.model.num_classes not in (classes, 1000):
        raise UserError(f"num_classes={config.model.num_classes} but {data_dir} has {classes} classes")
    config = override(config, {"num_classes": classes})  # fc8's width follows the data
    identity = data_identity(data_dir, train_set, val_set)
    devices = tuple(how.devices or parse_devices(None, config.model.towers))
    lrn_operator = t.fused_lrn
    if t.deterministic and deterministic_setup(devices) and not lrn_operator:  # before the first cuBLAS call
        lrn_operator = True
        log("deterministic on CUDA: §3.3's LRN runs as the reproduction::lrn operator (its Triton backward "
            "is deterministic; F.local_response_norm's avg_pool3d backward has none); the same formula")
    if devices[0].type == "cuda":  # cuDNN times its kernels per shape (not bit-repeatable)
        torch.backends.cudnn.benchmark = not t.deterministic
    torch.manual_seed(t.seed)  # the initial weights (§5)
    built = build(config, devices, replicas=replicas, lrn_operator=lrn_operator,
                  init_from=None if how.resume else how.init_from, log=log)
    replicas.barrier()  # every rank has read and checked the folder before rank 0 writes it
    automatic = automatic_choices(devices_given=bool(how.devices), workers=how.workers, devices=devices, config=config)
    if resumed:
        config, position, history = _resume(folder, resumed, config, identity, built, how, data_dir)
    else:
        position, history = None, []
        folder.create(restart=how.restart)
        folder.start(run_record(how.experiment, config, command=list(sys.argv if how.command is None else how.command),
                                devices=devices, data=identity, distributed=replicas.describe() | {"global_batch": t.batch_size},
                                batch_scaling=how.batch_scaling, init_from=how.init_from)
                     | {"automatic": automatic} | (how.record or {}))
    _say_start(folder, automatic, position, replicas, devices, config, log)
    task = _task(config, data_dir, train_set, val_set, stats, built, devices[0], how)
    options = Options(batch_size=t.batch_size, epochs=config.train.epochs, seed=t.seed, precision=t.precision,
                      channels_last=t.channels_last, stuck_steps=t.stuck_steps, deadline=how.deadline,
                      max_epochs=how.max_epochs)
    return Loop(task, options, folder, position=position, history=history, replicas=replicas, log=log)


def _resume(folder: RunFolder, resumed: tuple, config: RunConfig, identity: dict, built, how: Launch,
            data_dir: Path) -> tuple[RunConfig, dict, list[dict]]:
    """Check the checkpoint against this run, load it, and note the resume in config.json."""
    state, meta, _ = resumed
    saved = config_of(state, folder.checkpoint)
    folder.check_resume(meta, saved.train.batch_size, config.train.batch_size, state["position"], identity)
    with reading(folder.checkpoint, "checkpoint whose weights fit the resumed config",
                 "resume without --set changes to the architecture"):
        built.model.load_state_dict(state["model"])
        built.optimizer.load_state_dict(state["optimizer"])
    position = state["position"]
    changed = _differences(saved, config)
    if changed:
        how.log(f"resuming with a changed config ({changed}): the run is no longer one run of one config")
    entry = {"at": position_text(position), "changed": changed, "git": git_state(),
             "command": list(sys.argv if how.command is None else how.command),
             "world_size": how.replicas.world, "data": str(data_dir)}
    return config, position, folder.resumed(meta, config_dict(config), position["epoch"], entry)


def _say_start(folder: RunFolder, automatic: list[str], position: dict | None, replicas: Distributed,
               devices: Sequence[torch.device], config: RunConfig, log: Callable[[str], None]) -> None:
    for note in folder.notes:
        log(note)
    if automatic:
        log("chosen for this machine: " + "; ".join(automatic))
    if position is not None:
        log(f"resumed {folder.path} at {position_text(position)}")
    if replicas.started:
        b = config.train.batch_size
        least, most = b // replicas.world, -(-b // replicas.world)
        log(f"{replicas.world} replicas ({replicas.describe()['backend']}): global batch {b}, "
            f"{least if least == most else f'{least}-{most}'} images per replica; rank 0 on "
            f"{', '.join(map(str, devices))}")


def _task(config: RunConfig, data_dir: Path, train_set: PackedSet, val_set: PackedSet, stats, built,
          home: torch.device, how: Launch) -> Task:
    """The ImageNet net as the loop's task: the packed set's batches, centre-patch validation
    after each epoch, and both of §4.1's test protocols at the end."""
    t, replicas = config.train, how.replicas
    eval_kw = dict(batch_size=t.batch_size, device=home, precision=t.precision, channels_last=t.channels_last,
                   workers=how.workers, replicas=replicas)
    last: dict = {}  # the last validation in this process: the final centre-patch result

    def batches(epoch: int, start: int) -> Iterator[tuple[Tensor, Tensor]]:
        loader = train_batches(train_set, stats, config.data, batch_size=t.batch_size, seed=t.seed, epoch=epoch,
                               device=home, start_batch=start, workers=how.workers,
                               shard=(replicas.rank, replicas.world), channels_last=t.channels_last)
        return _naming_bad_images(loader, train_set, epoch_order(len(train_set), seed=t.seed, epoch=epoch),
                                  t.batch_size, start)

    def validate() -> dict:
        try:
            last["centre"] = v = evaluate(built.model, val_set, stats, config.data, ten_patch=False, **eval_kw)
        except RuntimeError as e:  # a damaged image: named, and the loop keeps the epoch's steps
            name_undecodable(val_set, range(len(val_set)), e)
            raise
        return {"val_top1_error": v["top1_error"], "val_top5_error": v["top5_error"], "val_loss": v["loss"]}

    def finish(rows: list[dict]) -> dict:
        final = final_metrics(built.model, val_set, stats, config.data, centre=last.get("centre"), **eval_kw)
        if not all(math.isfinite(final[p]["loss"]) for p in final):
            raise TrainingStopped("the final evaluation produced a non-finite loss; no final.json is written")
        return final | {"experiment": how.experiment, "seed": t.seed, "data": str(data_dir)}

    return Task(model=built.model, step_fn=built.step_fn, optimizer=built.optimizer, images=len(train_set),
                classes=len(train_set.classes), batches=batches, validate=validate,
                lr=lambda rows: learning_rate(config, [r["val_top1_error"] for r in rows]), finish=finish,
                state={"config": config_dict(config), "classes": [c["id"] for c in train_set.classes]},
                best_by="val_top1_error",
                describe=lambda v: (f"val top-1 {v['val_top1_error']:.4f} top-5 {v['val_top5_error']:.4f} "
                                    "(centre patch)"))


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


def _naming_bad_images(batches: Iterator[tuple[Tensor, Tensor]], dataset: PackedSet, order: Tensor,
                       batch_size: int, start: int) -> Iterator[tuple[Tensor, Tensor]]:
    """The loader's batches; one that cannot be decoded (a damaged JPEG inside <split>.jpg.bin)
    names its image(s) instead of a decoder traceback."""
    k, batches = start, iter(batches)
    while True:
        try:
            item = next(batches)
        except StopIteration:
            return
        except RuntimeError as e:
            name_undecodable(dataset, order[k * batch_size:(k + 1) * batch_size].tolist(), e)
            raise
        try:
            yield item
        except GeneratorExit:  # closed early (a deadline, an error): the loader's threads stop now
            getattr(batches, "close", lambda: None)()
            raise
        k += 1


def _quiet(message: str) -> None:
    pass


def _differences(a: RunConfig, b: RunConfig) -> str:
    da, db = config_dict(a), config_dict(b)
    return ", ".join(f"{part}.{k}: {da[part][k]!r} -> {db[part][k]!r}"
                     for part in da for k in da[part] if da[part][k] != db[part][k])


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    replica = torchrun_replica()
    if replica is not None and args.devices not in (None, "cpu"):
        parser.error("under torchrun each process places its towers itself (docs/scaling.md); --devices can "
                     "only be cpu")
    if args.resume and args.out is None:
        parser.error("--resume needs --out, the run folder to continue")
    if args.resume and args.global_batch is not None:
        parser.error("--global-batch is chosen when a run starts; its checkpoint holds the batch and ε")
    if not args.resume and args.data is None:
        parser.error("--data is required (a folder prepared by python -m data_prep)")
    if args.workers is not None and args.workers < 0:
        parser.error(f"--workers {args.workers}: give 0 (no loader threads) or more")
    if args.global_batch is not None and args.global_batch < 1:
        parser.error(f"--global-batch {args.global_batch}: give a batch of at least 1 image")
    if args.init_from is not None and args.experiment is not None:
        parser.error("--init-from takes its architecture and recipe from the checkpoint; give --set changes "
                     "instead of --experiment")
    replicas = Distributed()
    try:
        config, experiment, data, scaling = _resumed_config(args) if args.resume else _fresh_config(args)
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


def _resumed_config(args: argparse.Namespace) -> tuple[RunConfig, str, Path, None]:
    """--resume: the run's config from its checkpoint (with --set changes), experiment and data."""
    if not (args.out / CHECKPOINT).is_file():
        held = RunFolder(args.out).held()
        raise UserError(f"--resume: {args.out} holds no {CHECKPOINT} ({', '.join(held) or 'no run files'}): "
                        "nothing to continue; start a fresh run in another --out")
    config = _override(config_of(load_checkpoint(args.out / CHECKPOINT), args.out / CHECKPOINT), args.set)
    meta = read_json_file(args.out / "config.json", "run record (config.json)",
                          "the run folder is damaged; start a fresh run in another --out")
    if not isinstance(meta, dict) or "experiment" not in meta or "path" not in meta.get("data", {}):
        raise UserError(f"{args.out / 'config.json'} is not this project's run record (no 'experiment' "
                        "or 'data'); start a fresh run in another --out")
    return config, meta["experiment"], args.data or locate_data(meta["data"]["path"], args.out), None


def _fresh_config(args: argparse.Namespace) -> tuple[RunConfig, str, Path, dict | None]:
    """A fresh run: the experiment's config (or a checkpoint's, to fine-tune) with --set changes."""
    if args.init_from is not None:
        experiment, base = "finetune", config_of(load_checkpoint(args.init_from), args.init_from)
    else:
        experiment = args.experiment or "paper"
        base = EXPERIMENTS[experiment]
    config, scaling = _override(base, args.set), None
    if args.global_batch is not None:
        config, scaling = scale_batch(config, args.global_batch)
    return config, experiment, args.data, scaling


def _parser() -> argparse.ArgumentParser:
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
    return parser


def _override(config: RunConfig, changes: Sequence[str]) -> RunConfig:
    try:
        return override(config, changes)
    except ValueError as e:
        raise UserError(f"--set: {e}") from None


def _where(replicas: Distributed) -> str:
    return f" (rank {replicas.rank} of {replicas.world})" if replicas.world > 1 else ""


if __name__ == "__main__":
    sys.exit(main())
