"""The main job, in one command: prepare real ImageNet photographs, train the paper's net with
the paper's recipe, evaluate it as the paper did (centre patch and ten patches), draw conv1's
kernels per tower (Fig. 3) and write the report.

    python -m reproduction              # sized to end within 10 minutes on this machine
    python -m reproduction --minutes 20 # a longer budget: more epochs, where they fit
    python -m reproduction --new        # train again, into a new run folder
    python -m reproduction --evidence   # also file the run's text files and Fig. 3 under results/

The images are Tiny-ImageNet-200's (real ImageNet photographs at 64 px, upsampled to 256 and cut
into 224 patches as ILSVRC images would be): from ../shared/data/tiny-imagenet-200 beside this
checkout when it is there, otherwise the public tiny-imagenet-200.zip downloaded through
torchvision and checked by its MD5. On a CPU the run is scaled down so it ends in minutes, and
says so (CPU_RUN below); with a GPU it trains all 200 classes (GPU_RUN). The run folder goes to
runs/ (not in git); results/ changes only with --evidence.

Sized by the machine, before training starts: it times a few training steps of the net, keeps
as many of the recipe's epochs as end the whole job within --minutes (where not even one epoch
would, it trains on fewer images per class), prints that plan with its ETA and records it in
config.json ("plan"). Training stops at a deadline that keeps the budget: the epoch in progress
then ends early and is the last, and final.json says so. A rerun resumes an interrupted run
within what is left of its budget, and reports a finished one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Sequence

from reproduction.config import RunConfig, override
from reproduction.errors import UserError, run_cli
from reproduction.experiments import EXPERIMENTS

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
TINY_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINY_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"

# (classes, train images per class, val images per class, recipe changes): stated, not hidden.
# DEVIATION(§5): on a CPU the main job trains the first 10 Tiny-ImageNet classes (5,000 images,
# 64 px photographs upsampled to 256) with batches of 32 (not 128) for at most 6 epochs (not
# ~90), as many as the --minutes budget holds (Budget below; the last may end early, at the
# budget's deadline), so that a newcomer's run ends within it on any CPU; the speed flags are
# opt-in arithmetic (bf16 only where a timed step shows it faster) and are recorded in
# config.json. Every report row names these changes.
CPU_RUN = (10, 500, 50, {"batch_size": 32, "epochs": 6, "fused_lrn": True, "fused_sgd": True,
                         "channels_last": True})
# With a GPU: all 200 classes (100,000 / 10,000 images), the paper's batch of 128, 30 epochs.
GPU_RUN = (200, None, None, {"epochs": 30, "fused_lrn": True, "channels_last": True})
# The plan's time model (measured on a 2-core AMD EPYC, fp32 fast path, batch 32): evaluation
# runs at ~2.5x training's img/s (a forward pass against forward, backward and update); an
# epoch's checkpoint (and best.pt) writes take a few seconds; Fig. 3 and the report a few more.
EVAL_SPEEDUP = 2.5
SAVE_SECONDS = 4.0
FINISH_SECONDS = 10.0
TIMED_STEPS = 3        # synthetic steps timed (after one warm-up) to plan the job
MIN_PART = 0.1         # a last epoch is planned (to end at the deadline) only where this share of it fits
LEAST_PER_CLASS = (20, 10)  # train / val images per class below which the job does not shrink


@dataclasses.dataclass(frozen=True)
class Plan:
    """The main job's training, settled before it starts: the epochs, the deadline at which
    training stops (time.time()), the share of the images per class to train on (1: all), why."""
    epochs: int
    deadline: float
    fraction: float
    reason: str
    record: dict


@dataclasses.dataclass
class Budget:
    """As many of the recipe's epochs as end the whole job within `seconds` of `began`, at a
    measured training speed; a deadline for training that keeps the budget even when the
    machine runs slower than measured (the epoch in progress then ends early). Where the time
    left holds a tenth of one more epoch (MIN_PART), that epoch is planned too and the deadline
    ends it. Where not even one epoch fits, a share of the images per class that does."""
    seconds: float
    began: float              # time.time() at the job's start
    train_images: int
    val_images: int

    def epoch_end(self, img_per_s: float) -> float:
        """Seconds of an epoch's end: its validation (centre patch) and checkpoint."""
        return self.val_images / (img_per_s * EVAL_SPEEDUP) + SAVE_SECONDS

    def tail(self, img_per_s: float) -> float:
        """Seconds the job needs after training stops: the last epoch's end, the ten-patch
        evaluation, Fig. 3, the report."""
        return self.epoch_end(img_per_s) + 10 * self.val_images / (img_per_s * EVAL_SPEEDUP) + FINISH_SECONDS

    def plan(self, img_per_s: float, most: int) -> Plan:
        left = self.seconds - (time.time() - self.began) - self.tail(img_per_s)  # for training
        per_epoch = self.train_images / img_per_s + self.epoch_end(img_per_s)
        share = (left + self.epoch_end(img_per_s)) / per_epoch  # epochs that fit, fractional
        deadline = self.began + self.seconds - self.tail(img_per_s)
        fraction = 1.0 if share >= 1 else max(0.0, share)
        whole = min(most, max(1, math.floor(share)))
        epochs = whole + (whole < most and share - whole >= MIN_PART)
        eta = min(self.seconds, time.time() - self.began + epochs * per_epoch - self.epoch_end(img_per_s)
                  + self.tail(img_per_s))
        last = (f", the last ending at the deadline after about {math.floor((share - whole) * self.train_images):,} "
                f"of its {self.train_images:,} images" if epochs > whole else "")
        reason = (f"{epochs} of the recipe's {most} epochs{last}: {TIMED_STEPS} timed steps ran at "
                  f"{img_per_s:.1f} img/s, so the job ends in about {eta / 60:.1f} min (budget "
                  f"{self.seconds / 60:g} min; training stops by {(deadline - self.began) / 60:.1f} min "
                  "whatever the speed)")
        record = {"budget_minutes": self.seconds / 60, "measured_img_per_s": img_per_s, "epochs": epochs,
                  "recipe_epochs": most, "eta_minutes": eta / 60, "reason": reason,
                  "training_seconds": max(0.0, deadline - time.time()),
                  "deadline_minutes": (deadline - self.began) / 60}
        return Plan(epochs, deadline, fraction, reason, record)


def measure_speed(config: RunConfig, device) -> float:
    """Training img/s of `config`'s step on this machine: the median of TIMED_STEPS synthetic
    steps after one warm-up (a throwaway net; the run's own weights come from its seed)."""
    import statistics

    import torch

    from reproduction.bench import synthetic_step
    step = synthetic_step(config, device)[0]
    seconds = []
    for _ in range(TIMED_STEPS + 1):
        start = time.perf_counter()
        step()[0].item()
        seconds.append(time.perf_counter() - start)
    del step
    torch.manual_seed(config.train.seed)  # leave the process as it found it
    return config.train.batch_size / statistics.median(seconds[1:])


DATASETS = ("tiny-imagenet", "cifar10")


def find_tiny_imagenet(work: Path) -> Path:
    """../shared/data/tiny-imagenet-200 if present, else the official zip (237 MB) in work/."""
    shared = SHARED / "tiny-imagenet-200"
    if (shared / "wnids.txt").is_file():
        return shared
    from torchvision.datasets.utils import check_integrity, download_url
    zip_path = work / "downloads" / "tiny-imagenet-200.zip"
    if not check_integrity(str(zip_path), TINY_MD5):
        print(f"{shared} not found: downloading {TINY_URL} into {zip_path.parent}", flush=True)
        try:
            download_url(TINY_URL, str(zip_path.parent), zip_path.name, md5=TINY_MD5)
        except (OSError, RuntimeError) as e:
            raise UserError(f"could not download {TINY_URL} ({e}); put tiny-imagenet-200.zip (MD5 "
                            f"{TINY_MD5}) in {zip_path.parent}, or the shared data beside the checkout") from None
    return zip_path


def find_cifar10(work: Path) -> Path:
    """../shared/data/cifar10 if present, else torchvision's download (170 MB) into work/downloads;
    the one finder, shared with reproduction.experiments, lives in reproduction/cifar.py."""
    from reproduction.cifar import find_cifar10 as find  # torchvision loads only for --dataset cifar10
    return find(work)


# Images per class in each source's train and val splits (what "all" means when shrinking).
FULL = {"tiny-imagenet": (500, 50), "cifar10": (5000, 1000)}


def recipe(gpu: bool, dataset: str, fraction: float = 1.0) -> tuple[list[str], str, dict]:
    """data_prep's subset options, the subset's name, and the recipe changes for this machine;
    fraction < 1: that share of the images per class (the budget's shrink), never below
    LEAST_PER_CLASS."""
    classes, per_class, val_per_class, changes = GPU_RUN if gpu else CPU_RUN
    if dataset == "cifar10":  # the earlier quickstart: 400 / 50 images per class, 3 epochs
        classes, per_class, val_per_class = (None, None, None) if gpu else (None, 400, 50)
        changes = changes if gpu else {**changes, "epochs": 3}
    if fraction < 1:
        full = FULL[dataset]
        per_class, val_per_class = (max(least, min(n or all_, math.floor((n or all_) * fraction)))
                                    for n, all_, least in zip((per_class, val_per_class), full, LEAST_PER_CLASS))
    options, name = [], dataset
    if classes:
        options += ["--classes", str(classes)]
        name += f"-{classes}"
    if per_class:
        options += ["--limit-per-class", str(per_class), "--val-limit-per-class", str(val_per_class)]
        name += f"x{per_class}"
    return options, name, changes


def plan_job(config: RunConfig, data: Path, devices, budget: float, began: float) -> tuple[RunConfig, Plan]:
    """Everything the run needs settled before it starts: fc8's width, the precision (measured
    where bf16 is native) and the plan from the step's measured speed."""
    from reproduction.data import PackedSet
    from reproduction.precision import choose_precision
    from reproduction.bench import synthetic_step
    sized = override(config, {"num_classes": len(PackedSet(data, "train").classes)})
    precision, why = choose_precision(devices[0], lambda p: synthetic_step(override(sized, {"precision": p}),
                                                                           devices[0])[0])
    print(f"    precision {why}", flush=True)
    sized = override(sized, {"precision": precision})
    rate = measure_speed(sized, devices[0])
    counts = [len(PackedSet(data, split)) for split in ("train", "val")]
    plan = Budget(budget, began, *counts).plan(rate, config.train.epochs)
    plan.record["choices"] = {"precision": why, "epochs": plan.reason}
    return override(sized, {"epochs": plan.epochs}), plan


def find_run(runs: Path, prefix: str, seed: int, gpu: bool) -> Path | None:
    """This seed's main-job run already on disk (whatever images per class the budget chose for
    it): the finished one if there is one, else the unfinished one, else one stopped before its
    first checkpoint, else None. One that another process is training now is an error."""
    from reproduction.training.runfolder import RunFolder
    found = sorted(runs.glob(f"{prefix}*/paper-{'gpu' if gpu else 'cpu'}/seed{seed}"))
    for folder in found:
        if RunFolder(folder).busy():
            raise UserError(f"{folder} is being trained by another process now (it holds the folder's lock): "
                            "wait for it to end and run this again, or pass --new to train another run beside it")
    for wanted in ("final.json", "checkpoint.pt", "config.json"):
        for folder in found:
            if (folder / wanted).is_file():
                return folder
    return None


def remaining_seconds(out: Path) -> float | None:
    """Training time left of an unfinished main-job run's budget (its plan's training seconds
    less those its epochs and checkpoint record), or None where it has no plan."""
    from reproduction.training.checkpoints import load_checkpoint
    from reproduction.training.runfolder import read_metrics
    plan = json.loads((out / "config.json").read_text()).get("plan") if (out / "config.json").is_file() else None
    if not plan or "training_seconds" not in plan:
        return None
    spent = sum(r.get("seconds", 0.0) for r in read_metrics(out, torn=[]))
    spent += load_checkpoint(out / "checkpoint.pt")["position"]["sums"].get("seconds", 0.0)
    return max(0.0, plan["training_seconds"] - spent)


def train_job(args: argparse.Namespace, gpu: bool, argv: list[str], began: float) -> tuple[Path, bool]:
    """The main job's run: report a finished one, resume an unfinished one within what is left
    of its budget, or prepare, plan and train a new one. Returns its folder and whether it trained."""
    from reproduction.training.distributed import parse_devices
    from reproduction.training.runfolder import locate_data
    from reproduction.train import train
    options, name, changes = recipe(gpu, args.dataset)
    prefix = name.split("x")[0] + ("x" if "x" in name else "")
    config = override(EXPERIMENTS["paper"], {**changes, "seed": args.seed})
    devices = parse_devices(None, config.model.towers)
    command = ["python", "-m", "reproduction", *argv]
    found = None if args.new else find_run(shown(args.runs), prefix, args.seed, gpu)
    if found is not None and (found / "final.json").is_file():
        from reproduction.files import read_json_file
        read_json_file(found / "final.json", "run's final numbers (final.json)", "the run folder is damaged: --new "
                       f"trains another run beside it, or delete {found} to train it again")
        print(f"1/4 {found} already holds a finished run: reporting it (--new trains again into a new folder)")
        return found, False
    if found is not None and (found / "checkpoint.pt").is_file():
        left = remaining_seconds(found)
        print(f"1/4 {found} holds an unfinished run: resuming it"
              + (f" with the {left / 60:.1f} min of training its budget has left" if left is not None else ""))
        from reproduction.training.checkpoints import config_of, load_checkpoint
        saved = config_of(load_checkpoint(found / "checkpoint.pt"), found / "checkpoint.pt")
        data = locate_data(json.loads((found / "config.json").read_text())["data"]["path"], found)
        train(saved, data, found, experiment="paper", resume=True, devices=devices, command=command,
              deadline=None if left is None else time.time() + left)
        return found, False
    data = prepare(args, options, name)
    print(f"2/4 planning and training the paper's net on {', '.join(map(str, devices))}\n    recipe: the paper's, "
          f"except {changes} (a scaled-down run: see README)", flush=True)
    config, plan = plan_job(config, data, devices, args.minutes * 60, began)
    if plan.fraction < 1:
        options, name, _ = recipe(gpu, args.dataset, plan.fraction)
        print(f"    not one epoch of {data} fits the budget: {plan.fraction:.0%} of its images per class instead",
              flush=True)
        data = prepare(args, options, name)
        config, plan = plan_job(config, data, devices, args.minutes * 60, began)
        plan.record["choices"]["images"] = f"images per class reduced to {plan.fraction:.0%}: one epoch did not fit"
    print(f"    plan: {plan.reason}", flush=True)
    base = shown(args.runs) / name / f"paper-{'gpu' if gpu else 'cpu'}" / f"seed{args.seed}"
    out = new_folder(base) if args.new else base
    restart = out == found  # its run stopped before its first checkpoint: nothing in it to keep
    print(f"    run folder {out}" + (" (stopped before its first checkpoint: starting it again)" if restart else ""),
          flush=True)
    train(config, data, out, experiment="paper", devices=devices, command=command, deadline=plan.deadline,
          record={"plan": plan.record}, restart=restart)
    return out, True


def prepare(args: argparse.Namespace, options: list[str], name: str) -> Path:
    from data_prep.__main__ import main as prep  # the same CLI a user would call
    source = find_tiny_imagenet(args.work) if args.dataset == "tiny-imagenet" else find_cifar10(args.work)
    data = shown(args.work / name)
    print(f"1/4 preparing {args.dataset} -> {data}", flush=True)
    if prep([args.dataset, str(source), "--out", str(data), *options]) != 0:
        raise UserError(f"preparing {data} failed (the message above says why)")
    return data


def shown(path: Path) -> Path:
    """path relative to the working directory when it lies below it (so that config.json and
    Fig. 3's record name runs/... and data/..., not this machine's absolute paths)."""
    try:
        return path.resolve().relative_to(Path.cwd().resolve())
    except ValueError:
        return path


def new_folder(base: Path) -> Path:
    """base, or base-2, base-3, ... : the first that holds no run."""
    k = 1
    while True:
        path = base if k == 1 else base.with_name(f"{base.name}-{k}")
        if not path.exists() or not any(path.iterdir()):
            return path
        k += 1


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, argv)


def _main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reproduction", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=DATASETS, default="tiny-imagenet",
                        help="tiny-imagenet (default: real ImageNet photographs) or cifar10 (the earlier "
                             "quickstart: 32 px images upsampled to 256)")
    parser.add_argument("--work", type=Path, default=REPO / "data",
                        help="where prepared data (and a download) go (default: data/, not in git)")
    parser.add_argument("--runs", type=Path, default=REPO / "runs",
                        help="where the run folder and its report go (default: runs/, not in git)")
    parser.add_argument("--seed", type=int, default=0, help="the run's seed (default 0)")
    parser.add_argument("--minutes", type=float, default=10.0,
                        help="the whole job's time budget (default 10): the job times a few training steps and keeps "
                             "as many epochs of the recipe (at most 6 on a CPU, 30 with a GPU) as end within it; "
                             "training stops at a deadline that keeps it, ending the last epoch early if need be")
    parser.add_argument("--new", action="store_true",
                        help="train again into a new run folder (default: resume or reuse this seed's run)")
    parser.add_argument("--evidence", action="store_true",
                        help="also copy the finished run's text files and Fig. 3 under results/runs/ and "
                             "rewrite results/README.md (what the committed evidence was made with)")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if not 0 < args.minutes <= 7 * 24 * 60:
        parser.error(f"--minutes {args.minutes:g}: give a number of minutes above 0 and at most a week (10080)")
    if args.seed < 0:
        parser.error(f"--seed {args.seed}: give an integer >= 0")

    # torch (2-4 s, more from a cold disk) loads only now, after the arguments are read: --help
    # and a bad argument answer at once.
    import torch

    from reproduction.report import write_report
    from reproduction.visualize import main as visualize

    if args.evidence:
        check_evidence()
    begin = time.time()
    out, fresh = train_job(args, torch.cuda.is_available(), argv, begin)
    trained = time.time() - begin
    figure = out / "fig3-conv1.png"
    print(f"3/4 Fig. 3: conv1's kernels per tower -> {figure}", flush=True)
    status = visualize(["filters", "--checkpoint", str(out / "checkpoint.pt"), "--out", str(figure)])
    if status != 0:
        return status  # 130 after a Ctrl-C
    report = write_report(args.runs)
    if args.evidence:
        evidence = file_evidence(out, shown(args.runs), figure)
        print(f"    evidence -> {evidence}; results report -> {write_report(REPO / 'results')}")
    print(f"4/4 report -> {report}\n")
    summary(out, trained, time.time() - begin, fresh)
    return 0


def file_evidence(out: Path, runs: Path, figure: Path) -> Path:
    """Copy the run's text files and Fig. 3 under results/runs/, its data path relative to the
    checkout (no machine's absolute path in the committed record)."""
    from reproduction.files import read_json, write_json
    evidence = REPO / "results" / "runs" / out.relative_to(runs)
    evidence.mkdir(parents=True, exist_ok=True)
    for f in ("metrics.jsonl", "final.json", figure.name, figure.with_suffix(".json").name):
        shutil.copy2(out / f, evidence / f)
    meta = read_json(out / "config.json")
    data = Path(meta["data"]["path"]).resolve()
    if data.is_relative_to(REPO):
        meta["data"]["path"] = str(data.relative_to(REPO))
    write_json(evidence / "config.json", meta)
    return evidence


def check_evidence() -> None:
    """--evidence files a run as the project's committed record: only from a clean checkout, so
    that its config.json's git state names the code that made it."""
    from reproduction.training.runfolder import git_state
    state = git_state()
    if state["dirty"] is not False:
        why = "has uncommitted changes (git status)" if state["dirty"] else "is not a git checkout"
        raise UserError(f"--evidence: {REPO} {why}; the committed evidence must name the code that made it: "
                        "commit your changes first, or run without --evidence")


def summary(out: Path, trained: float, total: float, fresh: bool) -> None:
    """The run's numbers beside chance, the towers' colour scores, and where everything is."""
    from reproduction.files import read_json_file
    advice = f"the run folder is damaged: --new trains another run beside it, or delete {out} to train it again"
    final = read_json_file(out / "final.json", "run's final numbers (final.json)", advice)
    filters = read_json_file(out / "fig3-conv1.json", "Fig. 3 record", advice)
    meta = read_json_file(out / "config.json", "run record (config.json)", advice)
    classes = meta["data"]["classes"]
    chance1, chance5 = 100 * (1 - 1 / classes), 100 * max(0.0, 1 - 5 / classes)
    print(f"{meta['data']['dataset']}, {classes} classes, {meta['data']['train_images']:,} training / "
          f"{meta['data']['val_images']:,} val images; {final['epochs']} epochs, {final['steps']} steps")
    if "stopped" in final:
        print(f"training stopped {final['stopped']}")
    print(f"{'':14} {'top-1 error':>12} {'top-5 error':>12}")
    for key, label in (("centre", "centre patch"), ("ten_patch", "ten patches")):
        print(f"{label:14} {100 * final[key]['top1_error']:>11.1f}% {100 * final[key]['top5_error']:>11.1f}%")
    print(f"{'chance':14} {chance1:>11.1f}% {chance5:>11.1f}%")
    towers = filters["per_tower"]
    print("conv1 colour specificity (0 grey, 1 pure colour; random weights ≈ 0.67): "
          + ", ".join(f"tower {'AB'[i]} {t['mean']:.3f} ± {t['sd']:.3f}" for i, t in enumerate(towers)))
    print(f"run folder {out}; Fig. 3 {out / 'fig3-conv1.png'}; report {out.parents[2] / 'README.md'}")
    plan = meta.get("plan")
    planned = (f" (planned {plan['eta_minutes']:.1f} min for a {plan['budget_minutes']:g}-minute budget)"
               if plan and fresh else "")
    print(f"{trained / 60:.1f} min training and evaluation, {total / 60:.1f} min in all{planned}")


if __name__ == "__main__":
    sys.exit(main())
