"""Throughput benchmarks, one subcommand per part of the system (each a `bench_<name>` function
with its `add_<name>_arguments`). results/benchmarks.md holds the commands and measured tables.

    python -m reproduction.bench data  --data DIR [--device cpu|cuda] [--batch-size 128] [--batches 20]
    python -m reproduction.bench model [--device cuda|cpu] [--batch-sizes 128 512] [--precisions fp32 bf16]
                                       [--rounds 10] [--steps 10] [--warmup 5] [--variants ...] [--profile]
    python -m reproduction.bench train --data DIR [--device cuda|cpu] [--batch-size 128] [--batches 30] [--set k=v ...] [--json FILE]
    python -m reproduction.bench eval  --data DIR [--device cuda|cpu] [--batch-size 128] [--ten-patch] [--set k=v ...] [--json FILE]

`data`: delivered training batches (read + decode + §4.1 augmentation, ready on the device) and
centre-patch and ten-patch eval throughput, from a packed set written by data_prep/.
`model`: one training step (forward, backward, update) on a synthetic batch: ours beside
torchvision's alexnet in both memory layouts, at the same batch and precision, in interleaved
rounds; img/s from the median round, ratios against torchvision's better layout, with ranges.
`train`: the real loader feeding the real step (`build.train_step`), beside the step alone on one
resident batch and the loader alone (the decode ceiling).
`eval`: `evaluate.evaluate`'s img/s, and the time that projects for ImageNet's 50,000 val images.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import itertools
import json
import statistics
import sys
import time
import traceback
from typing import Callable, Iterator, Sequence

import torch
import torchvision
from torch import nn

from reproduction.config import DataConfig, RunConfig, TrainConfig, override
from reproduction.data import PackedSet, Stats, decoder, default_workers, eval_batches, load_stats, train_batches
from reproduction.errors import UserError, run_cli
from reproduction.ops import lrn as lrn_op
from reproduction.evaluate import evaluate
from reproduction.precision import autocast, native_bf16
from reproduction.training.build import build, train_step
from reproduction.training.loop import READ_EVERY, step_seed
from reproduction.model import AlexNet
from reproduction.optim import PaperSGD
from reproduction.training.runfolder import device_name


def synthetic_batch(batch: int, classes: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean-centred-looking pixels (0–255 scale, §2) and random labels; speed does not depend on them."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 224, 224, generator=g) * 60
    return x.to(device), torch.randint(0, classes, (batch,), generator=g).to(device)


def synthetic_step(config: RunConfig, device: torch.device | str) -> tuple[Callable[[], tuple], AlexNet, PaperSGD]:
    """`train_step` of `config`'s net, recipe and speed flags (the one builder's) on one fixed
    synthetic batch of its batch size: what `bench model` and the main job's plan time.
    Returns the step, the net and its optimiser."""
    t = config.train
    built = build(config, (torch.device(device),), log=lambda s: None)
    x, y = synthetic_batch(t.batch_size, config.model.num_classes, device)
    if t.channels_last:  # as the loader delivers it
        x = x.contiguous(memory_format=torch.channels_last)

    def step():
        return train_step(built.step_fn, built.optimizer, x, y, n=len(y), precision=t.precision,
                          channels_last=t.channels_last)
    return step, built.model, built.optimizer


def time_batches(batches: Iterator[tuple[torch.Tensor, torch.Tensor]], count: int,
                 device: torch.device) -> dict:
    """Time `count` batches after one warm-up batch (thread start, cuDNN/nvJPEG set-up).
    A batch counts as delivered when its images are ready on the device."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    next(batches)
    sync()
    images = patches = 0
    start = time.perf_counter()
    for x, y in itertools.islice(batches, count):
        images += len(y)
        patches += x.numel() // (3 * x.shape[-1] ** 2)  # ten per image for ten-patch batches
    sync()
    return {"batches": count, "images": images, "patches": patches, "seconds": time.perf_counter() - start}


def bench_data(args: argparse.Namespace) -> int:
    """Loader throughput on one device: training batches delivered (read, decode, random patch,
    reflection, mean, PCA lighting; ready on the device) and the centre / ten-patch eval views."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible; give --device cpu")
    config = override(DataConfig(), args.set)
    train = PackedSet(args.data, "train")
    stats = load_stats(args.data)
    evaluation = PackedSet(args.data, args.eval_split or ("val" if "val" in train.manifest["splits"] else "train"))
    workers = default_workers(device) if args.workers is None else args.workers
    common = dict(device=device, workers=workers)

    def forever(make: Callable[[int], Iterator]) -> Iterator:  # loop over passes of a small set
        return itertools.chain.from_iterable(make(e) for e in itertools.count())

    runs = {
        "train (random patch, flip, lighting)": forever(lambda e: train_batches(
            train, stats, config, batch_size=args.batch_size, seed=0, epoch=e, **common)),
        "eval, centre patch": forever(lambda e: eval_batches(
            evaluation, stats, config, batch_size=args.batch_size, **common)),
        "eval, ten patches": forever(lambda e: eval_batches(
            evaluation, stats, config, batch_size=args.batch_size, ten_patch=True, **common)),
    }
    print(f"device: {device_name(device)}; torch {torch.__version__}, torchvision {torchvision.__version__}")
    print(f"data: {train} / {evaluation.split} {len(evaluation)} images; batch {args.batch_size}, "
          f"{workers} loader threads, {config}")
    print(f"{'view':<38} {'batches/s':>10} {'images/s':>10} {'patches/s':>10}")
    for name, batches in runs.items():
        r = time_batches(batches, args.batches, device)
        print(f"{name:<38} {r['batches'] / r['seconds']:>10.2f} {r['images'] / r['seconds']:>10.0f} "
              f"{r['patches'] / r['seconds']:>10.0f}")
    return 0


def add_data_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="a packed set (the folder with manifest.json)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i] (default cpu)")
    p.add_argument("--batch-size", type=int, default=128, help="images per batch (default 128, §5)")
    p.add_argument("--batches", type=int, default=20, help="batches timed per view, after one warm-up (default 20)")
    p.add_argument("--workers", type=int, default=None, help="loader threads (default: one per core, at most 8, for a GPU; one per 4 cores beside a CPU step)")
    p.add_argument("--eval-split", default=None, help="split for the eval views (default val, else train)")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="DataConfig overrides, e.g. --set lighting=paper mean=offset")


# ------------------------------------------------------------------------------------ helpers

def open_device(text: str | None) -> torch.device:
    """--device: cuda when one is visible, else the CPU, unless named."""
    device = torch.device(text or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible; give --device cpu")
    return device


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine_lines(device: torch.device) -> list[str]:
    """Which machine and software a table comes from, and when."""
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return [f"device: {device_name(device)}", f"torch {torch.__version__}, torchvision {torchvision.__version__}",
            f"date: {now}"]


def markdown(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def rate_text(rate: float) -> str:
    """img/s for a table: whole numbers, three digits where they are small (CPU runs)."""
    return f"{rate:,.0f}" if rate >= 100 else f"{rate:.3g}"


def step_times(step: Callable[[], object], *, steps: int, warmup: int, device: torch.device) -> list[float]:
    """Seconds per step for `steps` steps after `warmup`, run back to back as training runs them:
    on CUDA from events recorded on the stream between steps, with no wait for the device."""
    for _ in range(warmup):
        step()
    sync(device)
    if device.type != "cuda":
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        return times
    with torch.cuda.device(device):
        marks = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
        marks[0].record()
        for mark in marks[1:]:
            step()
            mark.record()
        torch.cuda.synchronize(device)
    return [a.elapsed_time(b) / 1000 for a, b in itertools.pairwise(marks)]


# ------------------------------------------------------------------------ model: the step alone

class Unavailable(Exception):
    """A variant that cannot run on this device; the message says why."""


# variant: (net, variant) as the table names them. Each row is one net in one memory layout:
# torchvision's in both (users run either), ours as train.py runs it.
VARIANTS = {
    "torchvision": ("torchvision alexnet", "eager, torch.optim.SGD, NCHW"),
    "torchvision-cl": ("torchvision alexnet", "eager, torch.optim.SGD, channels_last"),
    "reference": ("ours", "reference LRN (F.local_response_norm), eager, NCHW"),
    "fast": ("ours", "fast: LRN operator, one-pass update, channels_last, eager"),
    "fast-compiled": ("ours", "fast + torch.compile"),
}
TORCHVISION = ("torchvision", "torchvision-cl")
# The rows `bench model --device cpu` measures unless told otherwise: each precision where it
# means something on a CPU (bf16 only pays where the CPU has native bf16: the header says).
CPU_ROWS = [("torchvision", "fp32"), ("torchvision-cl", "fp32"), ("reference", "fp32"), ("fast", "fp32"),
            ("torchvision", "bf16"), ("torchvision-cl", "bf16"), ("fast", "bf16")]


def torchvision_step(batch: int, precision: str, device: torch.device, channels_last: bool) -> Callable[[], None]:
    """torchvision.models.alexnet trained as its users train it: eager, nn.CrossEntropyLoss,
    torch.optim.SGD (momentum 0.9, weight decay 5e-4), in the given memory layout."""
    model = torchvision.models.alexnet().to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    x, y = synthetic_batch(batch, 1000, device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, precision):
            loss = criterion(model(x), y)
        loss.backward()
        optimizer.step()
    return step


def ours_step(variant: str, batch: int, precision: str,
              device: torch.device) -> tuple[Callable[[], object], AlexNet, PaperSGD]:
    """The paper's net (1000 classes) and PaperSGD through `build.train_step`, with the flags of
    `variant`: reference (eager, F.local_response_norm, NCHW), fast (the LRN operator, the
    one-pass update, channels_last: what fused_lrn=True fused_sgd=True channels_last=True give
    train.py), fast-compiled (the same under torch.compile). The batch arrives in the layout the
    step wants, as the loader delivers it."""
    fast = variant in ("fast", "fast-compiled")
    if fast and device.type == "cuda":
        try:
            import triton  # noqa: F401  (the CUDA side of the LRN operator)
        except ImportError:
            raise Unavailable("the CUDA LRN operator needs triton") from None
    config = override(RunConfig(), {"precision": precision, "fused_lrn": fast, "fused_sgd": fast,
                                    "channels_last": fast, "compile": variant == "fast-compiled",
                                    "batch_size": batch})
    return synthetic_step(config, device)


def spread(values: Sequence[float]) -> str:
    return f"{min(values):.2f}–{max(values):.2f}" if len(values) > 1 else "—"


def model_table(results: Sequence[dict]) -> str:
    """Markdown, one row per result ({variant, batch, precision, rounds: seconds per step in each
    round, or None, note}). A row of ours is set against torchvision's better layout at the same
    batch and precision: the median over rounds of (torchvision's step time ÷ ours) in the same
    round, and its range; img/s is the median round's, with the rounds' range."""
    rows = []
    for r in results:
        net, variant = VARIANTS[r["variant"]]
        ok = bool(r["rounds"])
        base = _torchvision_base(results, r) if ok else None
        ratios = [t / o for t, o in zip(base["rounds"], r["rounds"])] if base else []
        img_s = [r["batch"] / t for t in r["rounds"]] if ok else []
        rows.append([net, variant, r["batch"], r["precision"],
                     rate_text(statistics.median(img_s)) if ok else f"n/a: {r['note']}",
                     f"{rate_text(min(img_s))}–{rate_text(max(img_s))}" if len(img_s) > 1 else "—",
                     f"{statistics.median(ratios):.2f}× ({spread(ratios)})" if ratios else "—",
                     VARIANTS[base["variant"]][1].split(", ")[-1] if base else "—"])
    return markdown(["net", "variant", "batch", "precision", "img/s", "range", "vs torchvision", "its layout"], rows)


def _torchvision_base(results: Sequence[dict], row: dict) -> dict | None:
    """torchvision's faster layout (lower median step) at the row's batch and precision."""
    same = [r for r in results if r["variant"] in TORCHVISION and r["rounds"]
            and (r["batch"], r["precision"]) == (row["batch"], row["precision"])]
    return min(same, key=lambda r: statistics.median(r["rounds"]), default=None)


PROFILE_ROWS = ("conv1", "lrn1", "pool1", "conv2", "lrn2", "pool2", "conv3", "conv4", "conv5", "pool5",
                "fc6", "fc7", "fc8", "relu", "dropout", "loss", "optimiser", "other")


class LayerClock:
    """Where one training step of our (eager) net spends its time, layer by layer, forward and
    backward, and in the optimiser. Hooks drain the device and take a timestamp at every layer
    boundary; each interval goes to the layer that starts it. In the backward pass a hook on a
    layer's output runs just before autograd differentiates that layer, so the time to the next
    such hook is the layer's backward. The drains cost time of their own: the shares are the
    result, not the total. relu and dropout sum over the layers that use them."""

    def __init__(self, model: AlexNet, optimizer: torch.optim.Optimizer, device: torch.device) -> None:
        self.device, self.marks, self.handles = device, [], []
        layers = [(name, getattr(model, name)) for name in PROFILE_ROWS[:13]]
        layers += [("relu", model.act), ("dropout", model.drop6), ("dropout", model.drop7)]
        for label, module in layers:
            after = "loss" if label == "fc8" else "other"  # what runs from a layer's end to the next layer
            self.handles += [module.register_forward_pre_hook(self._forward_start(label)),
                             module.register_forward_hook(self._forward_end(label, after))]
        self.handles += [optimizer.register_step_pre_hook(lambda *a: self.mark("optimiser", "fwd")),
                         optimizer.register_step_post_hook(lambda *a: self.mark("other", "fwd"))]

    def mark(self, label: str, phase: str) -> None:
        sync(self.device)
        self.marks.append((time.perf_counter(), label, phase))

    def _forward_start(self, label):
        return lambda module, inputs: self.mark(label, "fwd")

    def _forward_end(self, label, after):
        def hook(module, inputs, output):
            self.mark(after, "fwd")
            for out in output if isinstance(output, list) else [output]:
                if out.requires_grad:
                    out.register_hook(lambda grad: self.mark(label, "bwd"))
        return hook

    def run(self, step: Callable[[], object], steps: int) -> dict[str, dict[str, float]]:
        """Time `steps` steps; returns {row: {"fwd": share, "bwd": share}} (shares of the total)."""
        totals: dict[str, dict[str, float]] = {}
        for _ in range(steps):
            self.marks = []
            self.mark("other", "fwd")
            step()
            self.mark("end", "fwd")
            for (t0, label, phase), (t1, _, _) in itertools.pairwise(self.marks):
                totals.setdefault(label, {"fwd": 0.0, "bwd": 0.0})[phase] += t1 - t0
        for h in self.handles:
            h.remove()
        whole = sum(v for row in totals.values() for v in row.values())
        return {label: {k: v / whole for k, v in row.items()} for label, row in totals.items()}


def profile_table(profiles: dict[str, dict[str, dict[str, float]]]) -> str:
    """Markdown: one row per layer, one column per profiled setting, cells "total (fwd / bwd)" in %."""
    def cell(name, row):
        if row is None:
            return "—"
        total = f"{100 * (row['fwd'] + row['bwd']):.1f}"
        if name in ("loss", "optimiser", "other"):  # not a layer: no forward / backward split
            return total
        return f"{total} ({100 * row['fwd']:.1f} / {100 * row['bwd']:.1f})"
    rows = [[name] + [cell(name, p.get(name)) for p in profiles.values()] for name in PROFILE_ROWS]
    return markdown(["layer", *profiles], rows)


def bench_model(args: argparse.Namespace) -> int:
    """Training-step throughput on one device, like for like: torchvision's alexnet in both
    memory layouts and ours (reference LRN; the fast path) at the same batch and precision,
    timed in interleaved rounds (A B C A B C ...) so that the host's drift falls on every row.
    One step = forward + backward + update on a synthetic batch; each row's img/s is its median
    round's, and ours is set against torchvision's better layout round by round."""
    device = open_device(args.device)
    cpu = device.type == "cpu"
    rounds, per_round = args.rounds or (5 if cpu else 10), args.steps or (2 if cpu else 10)
    warmup = args.warmup if args.warmup is not None else (2 if cpu else 5)
    notes = model_settings(device)
    print("\n".join(machine_lines(device) + notes), flush=True)
    results, profiles = [], {} if args.profile else None
    for _, group in itertools.groupby(model_rows(args, cpu), key=lambda r: r[:2]):  # one batch and precision
        rows = [build_model_row(v, b, p, device, warmup) for b, p, v in group]
        for k in range(rounds):
            for row in rows if k % 2 == 0 else reversed(rows):  # A B C, C B A: no row always first
                time_round(row, per_round, device)
        results += [row["result"] for row in rows]
        if profiles is not None:
            profiles |= profile_rows(rows, per_round, device)
        del rows  # the group's nets and optimisers: freed before the next group is built
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if profiles is not None:
        print("\nShare of a training step by layer, ours, eager, % as total (forward / backward); the "
              "device is drained at every layer boundary, so these steps run slower than the table's:\n")
        print(profile_table(profiles) if profiles else "(no eager variant of ours was measured)")
    print(f"\n{rounds} interleaved rounds of {per_round} timed steps per row (the round's median), after "
          f"{warmup} warm-up steps; synthetic batch, 1000 classes, 224×224 input\n")
    print(model_table(results))
    return 1 if any(r["note"].startswith("failed") for r in results) else 0


def build_model_row(variant: str, batch: int, precision: str, device: torch.device, warmup: int) -> dict:
    """One row: its step built and warmed up. A variant this device cannot run, or one that
    fails (out of memory, a failed compile), is reported in its row; the others still run."""
    result = {"variant": variant, "batch": batch, "precision": precision, "rounds": [], "note": ""}
    row = {"result": result, "step": None, "model": None, "optimizer": None,
           "what": f"{' / '.join(VARIANTS[variant])}, batch {batch}, {precision}"}
    try:
        if variant == "fast-compiled":
            torch.compiler.reset()  # a fresh compile per row: no shapes or guards carried over
        if variant in TORCHVISION:
            row["step"] = torchvision_step(batch, precision, device, channels_last=variant == "torchvision-cl")
        else:
            row["step"], row["model"], row["optimizer"] = ours_step(variant, batch, precision, device)
        step_times(row["step"], steps=0, warmup=warmup, device=device)
    except Unavailable as e:
        result["note"], row["step"] = str(e), None
        print(f"{row['what']}: n/a ({e})", flush=True)
    except Exception as e:  # Triton's errors are no RuntimeError: report any, measure the other rows
        result["note"], row["step"] = f"failed: {type(e).__name__}", None
        print(f"{row['what']}: failed\n{traceback.format_exc()}", file=sys.stderr, flush=True)
    return row


def time_round(row: dict, steps: int, device: torch.device) -> None:
    """One round of a row: `steps` steps back to back; their median joins the row's rounds."""
    if row["step"] is None:
        return
    try:
        seconds = statistics.median(step_times(row["step"], steps=steps, warmup=0, device=device))
    except Exception as e:
        row["result"]["note"], row["step"], row["result"]["rounds"] = f"failed: {type(e).__name__}", None, []
        print(f"{row['what']}: failed\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        return
    row["result"]["rounds"].append(seconds)
    print(f"{row['what']}: {1000 * seconds:.1f} ms/step, {row['result']['batch'] / seconds:,.0f} img/s", flush=True)


def profile_rows(rows: list[dict], steps: int, device: torch.device) -> dict:
    """--profile: each eager variant of ours, layer by layer (after the timed rounds)."""
    profiles = {}
    for row in rows:
        r = row["result"]
        if row["step"] is not None and r["variant"] in ("reference", "fast"):
            clock = LayerClock(row["model"], row["optimizer"], device)
            profiles[f"{VARIANTS[r['variant']][1].split(':')[0]}, b{r['batch']} {r['precision']}"] = clock.run(row["step"], steps)
    return profiles


def model_rows(args: argparse.Namespace, cpu: bool) -> list[tuple[int, str, str]]:
    """(batch, precision, variant) of each row to measure: CPU_ROWS on a CPU unless told otherwise."""
    batch_sizes = args.batch_sizes or ([32] if cpu else [128, 512])
    if cpu and args.variants is None and args.precisions is None:
        return [(b, p, v) for b in batch_sizes for v, p in CPU_ROWS]
    return [(b, p, v) for b, p, v in itertools.product(
        batch_sizes, args.precisions or ["fp32", "bf16"], args.variants or list(VARIANTS))]


def model_settings(device: torch.device) -> list[str]:
    """Set the process-wide settings every row runs under; returns the lines that state them."""
    if device.type == "cpu":
        return [cpu_line(), f"native bf16: {'yes' if native_bf16(device) else 'no (bf16 is emulated: expect it slower than fp32)'}; "
                f"LRN operator: {'C kernel' if lrn_op.kernel_available() else 'plain PyTorch fallback (no C compiler)'}; "
                f"{torch.get_num_threads()} threads"]
    if device.type != "cuda":
        return []
    # fp32 matmuls and convolutions may use TF32 (the "fp32/tf32" rows), and cuDNN picks its
    # kernels by timing them (as torchvision's reference recipe and our train.py do).
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    return ["fp32 rows: TF32 allowed for matmuls and convolutions in every row (train.py itself "
            "leaves torch's defaults: TF32 convolutions, fp32 matmuls); cudnn.benchmark on"]


def cpu_line() -> str:
    """The CPU's model, the flags that decide these numbers, and ISA limits set in the environment."""
    import os
    model, flags = "unknown CPU", set()
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8", errors="replace"):
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    have = [f for f in ("amx_bf16", "avx512_bf16", "avx512f", "avx512_vnni", "avx2") if f in flags]
    limits = [f"{k}={os.environ[k]}" for k in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY") if k in os.environ]
    return (f"cpu: {model}; flags: {' '.join(have) or 'none of amx_bf16 avx512_bf16 avx512f avx2'}; "
            f"torch's kernels: {torch.backends.cpu.get_cpu_capability()}" + (f"; limited by {' '.join(limits)}" if limits else ""))


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if visible)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=None,
                   help="default 128 512 on CUDA, 32 on the CPU (there a row takes ~10-30 s on 2 cores, "
                        "the compiled one ~2 min)")
    p.add_argument("--precisions", nargs="+", default=None, choices=["fp32", "bf16"],
                   help="default fp32 and bf16 (on the CPU, with no --variants: the rows of CPU_ROWS)")
    p.add_argument("--rounds", type=int, default=None,
                   help="interleaved rounds over the rows (default 10 on CUDA, 5 on the CPU)")
    p.add_argument("--steps", type=int, default=None,
                   help="timed steps per row and round (default 10 on CUDA, 2 on the CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per row first (default 5 on CUDA, 2 on the CPU)")
    p.add_argument("--variants", nargs="+", default=None, choices=list(VARIANTS),
                   help="rows to measure (default all; on the CPU: torchvision NCHW and channels_last at "
                        "fp32 and bf16, ours reference fp32, fast fp32 and bf16)")
    p.add_argument("--profile", action="store_true",
                   help="also print each layer's share of our eager net's step (conv1 ... fc8, optimiser)")


# -------------------------------------------------------------------- train: loader and step

def record(path: str | None, row: dict) -> None:
    """Append one measured row as a JSON line to `path` (--json), at once: a run stopped at its
    deadline keeps every row it had measured (reproduction/gpu.py's check collects them)."""
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


def bench_train(args: argparse.Namespace) -> int:
    """End-to-end training throughput on real packed JPEGs: the loader (data.train_batches)
    feeding the training step (build.train_step), beside the step alone on one resident batch
    (model-only) and the loader alone (the decode ceiling), at the same settings. Each row is
    printed (and written to --json) as soon as it is measured."""
    device = open_device(args.device)
    train_set, stats = PackedSet(args.data, "train"), load_stats(args.data)
    config = override(RunConfig(), args.set)
    config = override(config, {"num_classes": len(train_set.classes),
                               "batch_size": args.batch_size or config.train.batch_size})
    t = config.train
    if device.type == "cuda":  # as train() does
        torch.backends.cudnn.benchmark = not t.deterministic
    torch.manual_seed(t.seed)
    _, optimizer, module = build(config, (device,), log=lambda s: None)
    workers = default_workers(device) if args.workers is None else args.workers
    loader = lambda: train_stream(train_set, stats, config, device, workers)
    steps = lambda batches: time_steps(batches, module, optimizer, t, device, warmup=args.warmup, count=args.batches)
    settings = {"precision": t.precision, "channels_last": t.channels_last, "compile": t.compile,
                "fused_lrn": t.fused_lrn, "batch": t.batch_size, "workers": workers}
    print("\n".join(machine_lines(device)))
    print(f"data: {train_set}; batch {t.batch_size}, {workers} loader threads; {args.batches} timed batches "
          f"after {args.warmup} warm-up")
    print(f"train: precision={t.precision} channels_last={t.channels_last} compile={t.compile} "
          f"fused_lrn={t.fused_lrn}; {config.data}")
    print()
    # Each measurement is printed (and recorded) when it ends, the table with the ratios last.
    # The loader alone first: it also warms the page cache for the end-to-end run.
    measurements = [
        (LOADER_ONLY, lambda: time_batches(loader(), args.batches, device)),
        (MODEL_ONLY, lambda: steps(itertools.repeat(next(loader())))),
        (END_TO_END, lambda: steps(loader()))]
    rates = {}
    for name, measure in measurements:
        r = measure()
        rates[name] = r["images"] / r["seconds"]
        print(f"{name}: {rate_text(rates[name])} img/s ({r['images']} images in {r['seconds']:.2f} s)", flush=True)
        record(args.json, {"bench": "train", "measurement": name, "img_s": round(rates[name], 1),
                           "images": r["images"], "seconds": round(r["seconds"], 3), "device": device_name(device),
                           "torch": torch.__version__, "decoder": decoder(device), **settings})
    print_train_table(rates, device, args.json, settings)
    return 0


LOADER_ONLY = "loader only (read, decode, augment: the ceiling)"
MODEL_ONLY = "model only (train_step on one resident batch)"
END_TO_END = "end to end (loader → train_step)"


def train_stream(train_set: PackedSet, stats: Stats, config: RunConfig, device: torch.device,
                 workers: int) -> Iterator:
    """Training batches over as many passes of the set as it takes, laid out as train() asks."""
    t = config.train
    return itertools.chain.from_iterable(train_batches(
        train_set, stats, config.data, batch_size=t.batch_size, seed=t.seed, epoch=e, device=device,
        workers=workers, channels_last=t.channels_last) for e in itertools.count())


def time_steps(batches: Iterator, module: nn.Module, optimizer: torch.optim.Optimizer, t: TrainConfig,
               device: torch.device, *, warmup: int, count: int) -> dict:
    """The loop's work per batch, timed after `warmup` batches: dropout seed, train_step, a
    read-back every READ_EVERY steps."""
    pending, images = [], 0
    for i, (x, y) in enumerate(itertools.islice(batches, warmup + count)):
        if i == warmup:
            sync(device)
            start, images = time.perf_counter(), 0
        torch.manual_seed(step_seed(t.seed, i))
        pending.append(train_step(module, optimizer, x, y, n=len(y), precision=t.precision,
                                  channels_last=t.channels_last)[0])
        images += len(y)
        if len(pending) == READ_EVERY:
            torch.stack(pending).tolist()
            pending.clear()
    sync(device)
    return {"images": images, "seconds": time.perf_counter() - start}


def print_train_table(rates: dict[str, float], device: torch.device, json_path: str | None, settings: dict) -> None:
    """The measurements beside the model-only rate, and the end-to-end ratio (also to --json)."""
    model_only = rates[MODEL_ONLY]
    ratio = rates[END_TO_END] / model_only
    record(json_path, {"bench": "train", "measurement": "end to end / model only", "ratio": round(ratio, 3), **settings})
    print()
    print(markdown(["measurement", "img/s", "vs model only"],
                   [[name, rate_text(rate), f"{rate / model_only:.2f}×"] for name, rate in rates.items()]))
    print(f"\nend to end / model only = {ratio:.2f}; decoder: {decoder(device)}")


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="a packed set (the folder with manifest.json)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if visible)")
    p.add_argument("--batch-size", type=int, default=None, help="images per batch (default: the config's, 128, §5)")
    p.add_argument("--batches", type=int, default=30, help="timed batches per measurement (default 30)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    p.add_argument("--workers", type=int, default=None, help="loader threads (default: one per core, at most 8, for a GPU; one per 4 cores beside a CPU step)")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="RunConfig overrides, e.g. --set precision=bf16 channels_last=True compile=True "
                        "fused_lrn=True")
    p.add_argument("--json", default=None, metavar="FILE",
                   help="also append each measured row to FILE as a JSON line, as soon as it is measured")


# --------------------------------------------------------------------------- eval: evaluation

def bench_eval(args: argparse.Namespace) -> int:
    """Evaluation throughput: `evaluate.evaluate` over a whole split (centre patch, or ten patches
    with their softmax averaged, §4.1) with the net as training's final evaluation uses it
    (untrained weights: speed does not depend on them), and the time for 50,000 images."""
    device = open_device(args.device)
    probe = PackedSet(args.data, "train")
    split = args.split or ("val" if "val" in probe.manifest["splits"] else "train")
    dataset, stats = PackedSet(args.data, split), load_stats(args.data)
    config = override(override(RunConfig(), args.set), {"num_classes": len(dataset.classes)})
    t = config.train
    if device.type == "cuda":  # as train() does
        torch.backends.cudnn.benchmark = not t.deterministic
    model = build(config, (device,), log=lambda s: None).model  # its step_module left it channels_last, as training does
    views = 10 if args.ten_patch else 1
    protocol = "ten patches, softmax averaged" if args.ten_patch else "centre patch"
    print("\n".join(machine_lines(device)))
    print(f"data: {split}, {len(dataset)} images; batch {args.batch_size} images; precision={t.precision} "
          f"channels_last={t.channels_last} fused_lrn={t.fused_lrn}"
          + ("; compile is not used by evaluation" if t.compile else ""))
    print()
    print(markdown(["protocol", "images", "seconds", "img/s", "patches/s", "50,000 images"], []), flush=True)
    # Warm-up in what evaluate feeds the net (its layout, the full and the partial batch's
    # shape), so cuDNN's per-shape autotuning and the LRN kernels' first build are not timed.
    memory = torch.channels_last if t.channels_last else torch.contiguous_format
    shapes = dict.fromkeys(b * views for b in (min(args.batch_size, len(dataset)), len(dataset) % args.batch_size) if b)
    with torch.no_grad(), autocast(device, t.precision):
        for n in shapes:
            model.eval()(torch.zeros(n, 3, config.data.crop, config.data.crop, device=device).contiguous(memory_format=memory))
    sync(device)
    start = time.perf_counter()
    result = evaluate(model, dataset, stats, config.data, ten_patch=args.ten_patch, batch_size=args.batch_size,
                      device=device, precision=t.precision, channels_last=t.channels_last, workers=args.workers)
    sync(device)
    seconds = time.perf_counter() - start
    rate = result["images"] / seconds
    print(f"| {protocol} | {result['images']} | {seconds:.2f} | {rate_text(rate)} | {rate_text(rate * views)} "
          f"| {50_000 / rate:,.0f} s |", flush=True)
    record(args.json, {"bench": "eval", "protocol": protocol, "images": result["images"],
                       "seconds": round(seconds, 3), "img_s": round(rate, 1), "patches_s": round(rate * views, 1),
                       "projected_50000_s": round(50_000 / rate, 1), "batch": args.batch_size,
                       "precision": t.precision, "channels_last": t.channels_last, "fused_lrn": t.fused_lrn,
                       "device": device_name(device), "torch": torch.__version__, "decoder": decoder(device)})
    print(f"\ndecoder: {decoder(device)}")
    return 0


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="a packed set (the folder with manifest.json)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if visible)")
    p.add_argument("--split", default=None, help="split to evaluate (default val, else train)")
    p.add_argument("--batch-size", type=int, default=128, help="images per batch (default 128)")
    p.add_argument("--ten-patch", action="store_true", help="ten patches per image (§4.1), else the centre patch")
    p.add_argument("--workers", type=int, default=None, help="loader threads (default: one per core, at most 8, for a GPU; one per 4 cores beside a CPU step)")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="RunConfig overrides, e.g. --set precision=bf16 channels_last=True fused_lrn=True")
    p.add_argument("--json", default=None, metavar="FILE",
                   help="also append each measured row to FILE as a JSON line, as soon as it is measured")


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, argv)


def _main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reproduction.bench", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, bench, add, summary in [
            ("data", bench_data, add_data_arguments, "loader throughput: delivered train batches, eval views"),
            ("model", bench_model, add_model_arguments, "training-step throughput: ours vs torchvision's alexnet"),
            ("train", bench_train, add_train_arguments, "end-to-end training throughput vs the step alone"),
            ("eval", bench_eval, add_eval_arguments, "evaluation throughput and the time for 50,000 images")]:
        p = sub.add_parser(name, help=summary, description=bench.__doc__)
        add(p)
        p.set_defaults(run=bench)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError) as e:
        raise UserError(str(e)) from None


if __name__ == "__main__":
    sys.exit(main())
