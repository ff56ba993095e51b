"""Throughput benchmarks, one subcommand per part of the system (each a `bench_<name>` function
with its `add_<name>_arguments`; later ones, e.g. model / train / eval, go beside `data`).

    python -m reproduction.bench data --data DIR [--device cpu|cuda] [--batch-size 128] [--batches 20]

`data`: delivered training batches (read + decode + §4.1 augmentation, ready on the device) and
centre-patch and ten-patch eval throughput, from a packed set written by data_prep/.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from typing import Callable, Iterator, Sequence

import torch
import torchvision

from reproduction.config import DataConfig, override
from reproduction.data import PackedSet, default_workers, eval_batches, load_stats, train_batches
from reproduction.runs import device_name


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
        raise SystemExit("--device cuda: no CUDA device is visible")
    config = override(DataConfig(), args.set)
    train = PackedSet(args.data, "train")
    stats = load_stats(args.data)
    evaluation = PackedSet(args.data, args.eval_split or ("val" if "val" in train.manifest["splits"] else "train"))
    workers = default_workers() if args.workers is None else args.workers
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
    p.add_argument("--workers", type=int, default=None, help="loader threads (default: one per core, at most 8)")
    p.add_argument("--eval-split", default=None, help="split for the eval views (default val, else train)")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="DataConfig overrides, e.g. --set lighting=paper mean=offset")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reproduction.bench", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    data = sub.add_parser("data", help="loader throughput: delivered train batches, eval views",
                          description=bench_data.__doc__ or "Loader throughput on one device.")
    add_data_arguments(data)
    data.set_defaults(run=bench_data)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))


if __name__ == "__main__":
    sys.exit(main())
