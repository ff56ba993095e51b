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

Sized by the machine: the run times its own first training steps, then keeps as many of the
recipe's epochs as end the whole job within --minutes (and, where not even one epoch of the
subset would, trains on fewer images per class), prints that plan with its ETA before going on,
and records it in config.json ("plan") and the report. Training stops at a deadline that keeps
the budget (the epoch in progress then ends early and is the last), and where the time left
holds a tenth of one more epoch, that epoch is planned too and ended by the deadline. Every
choice made for this machine (precision, epochs, images) is printed with its reason.
"""

from __future__ import annotations

import argparse
import dataclasses
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
# runs at ~2.5x training's img/s (a forward pass against forward, backward and update: 58.5
# patches/s ten-patch against 23.3 img/s end-to-end training); an epoch's checkpoint (and
# best.pt) writes take a few seconds; Fig. 3 and the report a few more.
EVAL_SPEEDUP = 2.5
SAVE_SECONDS = 4.0
FINISH_SECONDS = 10.0
PROBE_STEPS = 6        # timed steps after the warm-up step; they are the run's first steps
MIN_PART = 0.1         # a last epoch is planned (to end at the deadline) only where this share of it fits
LEAST_PER_CLASS = (20, 10)  # train / val images per class below which the job does not shrink


class TooSlow(Exception):
    """Not even one epoch of the subset fits the budget: the job restarts on fewer images."""

    def __init__(self, fraction: float, message: str) -> None:
        super().__init__(message)
        self.fraction = fraction


@dataclasses.dataclass
class Budget:
    """The main job's plan (train.Plan): as many of the recipe's epochs as end the whole job
    within `seconds` of `began`, from the run's own measured training speed, and a deadline
    for training that keeps the budget when the machine turns out slower than measured. Where
    the budget leaves time for a tenth of one more epoch (MIN_PART), that epoch is planned too,
    and the deadline ends it early: the budget is spent training, not left over."""
    seconds: float
    began: float              # time.time() at the job's start
    train_images: int
    val_images: int
    choices: dict             # what was already chosen for this machine, with its reason
    may_shrink: bool = True   # False once the job has restarted on fewer images
    steps: int = PROBE_STEPS
    deadline: float | None = None  # set by choose: training stops there (train.Plan)
    most: int = 0                  # the recipe's epochs, set by choose

    def epoch_end(self, img_per_s: float) -> float:
        """Seconds of an epoch's end: its validation (centre patch) and checkpoint."""
        return self.val_images / (img_per_s * EVAL_SPEEDUP) + SAVE_SECONDS

    def tail(self, img_per_s: float) -> float:
        """Seconds the job needs after its training stops: the last epoch's end, the ten-patch
        evaluation (the centre is the last epoch's), Fig. 3, the report."""
        return self.epoch_end(img_per_s) + 10 * self.val_images / (img_per_s * EVAL_SPEEDUP) + FINISH_SECONDS

    def estimate(self, epochs: int, img_per_s: float, images_done: int) -> float:
        """Seconds from the job's start to its end with `epochs` whole epochs."""
        return (time.time() - self.began + (epochs * self.train_images - images_done) / img_per_s
                + (epochs - 1) * self.epoch_end(img_per_s) + self.tail(img_per_s))

    def choose(self, img_per_s: float, images_done: int, config: RunConfig) -> tuple[RunConfig, dict]:
        most = self.most = config.train.epochs
        fits = [e for e in range(most, 0, -1) if self.estimate(e, img_per_s, images_done) <= self.seconds]
        one = self.estimate(1, img_per_s, images_done)
        if not fits and self.may_shrink:
            spent = time.time() - self.began
            fraction = max(0.0, (self.seconds - spent - FINISH_SECONDS) / (one - spent - FINISH_SECONDS))
            raise TooSlow(fraction, f"    at {img_per_s:.1f} img/s one epoch of {self.train_images:,} images would end "
                                    f"the job after {one / 60:.1f} min (budget {self.seconds / 60:g})")
        epochs = fits[0] if fits else 1
        eta = self.estimate(epochs, img_per_s, images_done)
        # The share of one more epoch's images that the time left over would train (after the
        # validation and checkpoint of what is now the last epoch).
        left = self.seconds - eta - self.epoch_end(img_per_s)
        part = left * img_per_s / self.train_images if fits and epochs < most else 0.0
        last = ""
        if part >= MIN_PART:
            epochs, eta, last = epochs + 1, self.seconds, (
                f", the last ending at the deadline after about {math.floor(part * self.train_images):,} of "
                f"its {self.train_images:,} images")
        # Without even one epoch in the budget (a restarted job) one epoch is the least it trains.
        self.deadline = self.began + self.seconds - self.tail(img_per_s) if fits else None
        reason = (f"{epochs} of the recipe's {most} epochs{last}: the first {images_done} training images ran "
                  f"at {img_per_s:.1f} img/s, so the job ends in about {eta / 60:.1f} min "
                  + (f"(budget {self.seconds / 60:g} min; training stops by "
                     f"{(self.deadline - self.began) / 60:.1f} min whatever the speed)" if fits else
                     f"(over the {self.seconds / 60:g} min budget: one epoch is the least it trains)"))
        print(f"    plan: {reason}", flush=True)
        record = {"budget_minutes": self.seconds / 60, "measured_img_per_s": img_per_s,
                  "timed_images": images_done, "epochs": epochs, "recipe_epochs": most,
                  "eta_minutes": eta / 60, "choices": {**self.choices, "epochs": reason}}
        if self.deadline is not None:
            record["deadline_minutes"] = (self.deadline - self.began) / 60
        return override(config, {"epochs": epochs}), record

    def extend(self, epoch_seconds: float, config: RunConfig) -> tuple[RunConfig, dict] | None:
        """One more epoch when the last planned one ended with a tenth of an epoch's training
        time (its own, measured: `epoch_seconds`) still left before the deadline: the first
        steps ran slower than the epochs did. None where the recipe's epochs are all planned."""
        if self.deadline is None or config.train.epochs >= self.most:
            return None
        left = self.deadline - time.time()
        if left < MIN_PART * epoch_seconds:
            return None
        epochs = config.train.epochs + 1
        why = (f"epoch {epochs} added: epoch {epochs - 1} trained in {epoch_seconds / 60:.1f} min and ended "
               f"{left / 60:.1f} min before the deadline, time for "
               + ("all of another" if left >= epoch_seconds else f"about {left / epoch_seconds:.0%} of another"))
        print(f"    plan: {why}", flush=True)
        return override(config, {"epochs": epochs}), {"epochs": epochs, f"extended to {epochs}": why}


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


def run(config: RunConfig, data: Path, out: Path, devices, argv: list[str], budget: float,
        began: float, shrunk: str | None) -> bool:
    """Train the main job's run into `out`: report a finished one, resume an unfinished one
    (with the epochs it planned), or start one whose precision is measured and whose epochs
    the budget chooses. Returns whether it trained a fresh run."""
    from reproduction import checkpoints
    from reproduction.data import PackedSet
    from reproduction.precision import choose_precision
    from reproduction.train import synthetic_step, train
    changes = {k: v for k, v in checkpoints.config_dict(config)["train"].items() if v != getattr(EXPERIMENTS["paper"].train, k)}
    print(f"2/4 training the paper's net on {', '.join(map(str, devices))} -> {out}\n"
          f"    recipe: the paper's, except {changes} (a scaled-down run, at most {config.train.epochs} "
          "epochs: the plan below keeps those that fit the budget; see README)", flush=True)
    command = ["python", "-m", "reproduction", *argv]
    if (out / "final.json").exists():
        print(f"    {out} already holds a finished run: reporting it (--new trains again into a new folder)")
        return False
    if (out / "checkpoint.pt").exists():
        print(f"    {out} holds an unfinished run: resuming it with its planned epochs (--new starts another)")
        saved = checkpoints.config_of(checkpoints.load_checkpoint(out / "checkpoint.pt"), out / "checkpoint.pt")
        train(saved, data, out, experiment="paper", resume=True, devices=devices, command=command)
        return False
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} holds files of a run that stopped before its first checkpoint: delete "
                        "that folder, or pass --new to train into another")
    sized = override(config, {"num_classes": len(PackedSet(data, "train").classes)})
    precision, why = choose_precision(devices[0], lambda p: synthetic_step(override(sized, {"precision": p}),
                                                                             devices[0])[0])
    print(f"    precision {why}", flush=True)
    counts = {split: len(PackedSet(data, split)) for split in ("train", "val")}
    choices = {"precision": why} | ({"images": shrunk + "; images per class reduced"} if shrunk else {})
    plan = Budget(budget, began, counts["train"], counts["val"], choices, may_shrink=shrunk is None)
    train(override(config, {"precision": precision}), data, out, experiment="paper", devices=devices,
          command=command, plan=plan)
    return True


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
                        help="the whole job's time budget (default 10): the run times its first steps and keeps "
                             "as many epochs of the recipe (at most 6 on a CPU, 30 with a GPU) as end within it; "
                             "training stops at a deadline that keeps it, ending the last epoch early if need be")
    parser.add_argument("--new", action="store_true",
                        help="train again into a new run folder (default: resume or reuse this seed's run)")
    parser.add_argument("--evidence", action="store_true",
                        help="also copy the finished run's text files and Fig. 3 under results/runs/ and "
                             "rewrite results/README.md (what the committed evidence was made with)")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if not args.minutes > 0:
        parser.error(f"--minutes {args.minutes:g}: give a positive number of minutes")

    # torch (2-4 s, more from a cold disk) loads only now, after the arguments are read: --help
    # and a bad argument answer at once. These modules import no module of the main job.
    import torch

    from data_prep.__main__ import main as prep  # the same CLI a user would call
    from reproduction.distributed import parse_devices
    from reproduction.report import write_report
    from reproduction.visualize import main as visualize

    begin = time.time()
    gpu = torch.cuda.is_available()
    fraction, shrunk = 1.0, None
    while True:  # a second pass only when not even one epoch of the subset fits the budget
        options, name, changes = recipe(gpu, args.dataset, fraction)
        source = find_tiny_imagenet(args.work) if args.dataset == "tiny-imagenet" else find_cifar10(args.work)
        data = shown(args.work / name)
        print(f"1/4 preparing {args.dataset} -> {data}", flush=True)
        if prep([args.dataset, str(source), "--out", str(data), *options]) != 0:
            return 1
        config = override(EXPERIMENTS["paper"], {**changes, "seed": args.seed})
        base = shown(args.runs) / name / f"paper-{'gpu' if gpu else 'cpu'}" / f"seed{args.seed}"
        out = new_folder(base) if args.new else base
        devices = parse_devices(None, config.model.towers)
        start = time.time()
        try:
            fresh = run(config, data, out, devices, argv, args.minutes * 60, begin, shrunk)
            break
        except TooSlow as e:
            shutil.rmtree(out)  # it holds only the config.json of the run the plan stopped
            fraction, shrunk = max(e.fraction, 0.0), str(e)
            print(f"{e}: preparing fewer images per class instead (the {PROBE_STEPS + 1} steps "
                  "just timed are not kept)", flush=True)
    trained = time.time() - start

    figure = out / "fig3-conv1.png"
    print(f"3/4 Fig. 3: conv1's kernels per tower -> {figure}", flush=True)
    if visualize(["filters", "--checkpoint", str(out / "checkpoint.pt"), "--out", str(figure)]) != 0:
        return 1
    report = write_report(args.runs)
    if args.evidence:
        evidence = REPO / "results" / "runs" / out.relative_to(shown(args.runs))
        evidence.mkdir(parents=True, exist_ok=True)
        for f in ("config.json", "metrics.jsonl", "final.json", figure.name, figure.with_suffix(".json").name):
            shutil.copy2(out / f, evidence / f)
        print(f"    evidence -> {evidence}; results report -> {write_report(REPO / 'results')}")
    print(f"4/4 report -> {report}\n")
    summary(out, trained, time.time() - begin, fresh)
    return 0


def summary(out: Path, trained: float, total: float, fresh: bool) -> None:
    """The run's numbers beside chance, the towers' colour scores, and where everything is."""
    import json
    final = json.loads((out / "final.json").read_text())
    filters = json.loads((out / "fig3-conv1.json").read_text())
    meta = json.loads((out / "config.json").read_text())
    classes = meta["data"]["classes"]
    chance1, chance5 = 100 * (1 - 1 / classes), 100 * max(0.0, 1 - 5 / classes)
    print(f"{meta['data']['dataset']}, {classes} classes, {meta['data']['train_images']:,} training / "
          f"{meta['data']['val_images']:,} val images; {final['epochs']} epochs, {final['steps']} steps")
    if "stopped" in meta.get("plan", {}):
        print(f"training stopped {meta['plan']['stopped']}")
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
