"""The paper's qualitative figures (§6.1) from a checkpoint.

    python -m reproduction.visualize filters --checkpoint RUN/checkpoint.pt --out conv1.png
    python -m reproduction.visualize neighbours --checkpoint RUN/checkpoint.pt --data DIR --out nn.png

filters (Fig. 3): conv1's kernels as RGB images, tower A's (GPU 1) above tower B's (GPU 2), and
a colour-specificity score per kernel (`colour_specificity`), printed and written to FILE.json
beside FILE.png. The paper reports that GPU 1's kernels are "largely color-agnostic" and GPU 2's
"largely color-specific" (§6.1); the per-tower mean ± sd puts a number on that.

neighbours (Fig. 4, left): for a few images of the eval split, the k training images whose fc7
vectors (4096-d, after the ReLU, centre patch, model in eval mode) are nearest in Euclidean
distance. Written to FILE.png (one row per query: the query, a wider gap, its neighbours nearest
first) and FILE.json (indices, labels, distances).

Each command's own --help lists its options.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torchvision.io import ImageReadMode, decode_jpeg

from reproduction.config import DataConfig, RunConfig
from reproduction.data import (
    SIDE,
    PackedSet,
    Stats,
    eval_batches,
    upsample,
    view_batch,
)
from reproduction.training.distributed import parse_devices
from reproduction.errors import UserError, run_cli, writable_file
from reproduction.precision import autocast
from reproduction.training.checkpoints import CHECKPOINT_ADVICE, config_of, load_checkpoint, model_from_checkpoint
from reproduction.files import write_json
from reproduction.training.runfolder import open_data, refuse_run_file
COLUMNS = 16  # Fig. 3 draws each GPU's 48 kernels as 3 rows of 16


# ------------------------------------------------------------------------------------ filters

def colour_specificity(weights: Tensor) -> Tensor:
    """N×3×h×w kernels → N scores in [0, 1]: the share of a kernel's energy that is not grey.

    Each pixel's RGB vector v splits into its projection on the grey axis (1,1,1)/√3, i.e.
    mean(v)·(1,1,1), and the remainder (the chroma). score = Σ|w − grey(w)|² / Σ|w|². A grey
    (colour-agnostic) kernel scores 0; one whose pixels each sum to zero over R, G, B (pure
    chroma) scores 1. I.i.d. random weights score 2/3 on average (2 of the 3 colour
    dimensions are chroma), so an untrained net sits near 2/3. An all-zero kernel scores 0.

    The kernel's per-channel mean (DC) is not subtracted: a constant colour cast is what a
    low-frequency colour-blob detector (Fig. 3, the lower half) responds to, and the input is
    already mean-centred (§2), so the DC is not an artefact of an input offset.
    """
    if weights.dim() != 4 or weights.shape[1] != 3:
        raise ValueError(f"weights must be N×3×h×w (RGB kernels), got {tuple(weights.shape)}")
    w = weights.detach().double()
    chroma = w - w.mean(dim=1, keepdim=True)
    total = w.square().sum(dim=(1, 2, 3))
    # chroma energy <= total energy, so an all-zero kernel gives 0 / tiny = 0
    return (chroma.square().sum(dim=(1, 2, 3)) / total.clamp_min(torch.finfo(torch.float64).tiny)).float()


def filter_grid(weights: Tensor, towers: int, *, scale: int = 4, gap: int = 2,
                tower_gap: int = 10, background: int = 255) -> np.ndarray:
    """N×3×h×w kernels → an RGB image (uint8 H×W×3), as Fig. 3 draws conv1.

    Layout: one block per tower, tower A's (kernels 0 … N/T − 1) on top, then tower B's; in a
    block, kernel i of the tower sits at row i // 16, column i mod 16 (3 rows × 16 for the
    paper's 48 kernels per tower). Each kernel is contrast-stretched on its own (its min over all
    three channels → 0, its max → 255; a constant kernel → 128), then upscaled `scale`× by
    nearest neighbour. `gap` pixels separate kernels and surround the image; `tower_gap` pixels
    separate the towers. Size: H = 2·gap + T·(R·c + (R − 1)·gap) + (T − 1)·tower_gap and
    W = 2·gap + C·c + (C − 1)·gap, with c = h·scale, C = min(16, N/T) columns, R = ⌈N/T / C⌉ rows.
    """
    if weights.dim() != 4 or weights.shape[1] != 3:
        raise ValueError(f"weights must be N×3×h×w (RGB kernels), got {tuple(weights.shape)}")
    n = weights.shape[0]
    if towers < 1 or n % towers:
        raise ValueError(f"{n} kernels do not divide between {towers} towers")
    per = n // towers
    cols = min(COLUMNS, per)
    rows = math.ceil(per / cols)
    w = weights.detach().double().cpu()
    lo = w.amin(dim=(1, 2, 3), keepdim=True)
    span = w.amax(dim=(1, 2, 3), keepdim=True) - lo
    unit = torch.where(span > 0, (w - lo) / span.clamp_min(1e-300), torch.full_like(w, 0.5))
    tiles = (unit * 255).round().to(torch.uint8)
    tiles = tiles.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)  # nearest neighbour
    tiles = tiles.permute(0, 2, 3, 1).numpy()  # N×ch×cw×3
    ch, cw = tiles.shape[1:3]
    block = rows * ch + (rows - 1) * gap
    image = np.full((2 * gap + towers * block + (towers - 1) * tower_gap,
                     2 * gap + cols * cw + (cols - 1) * gap, 3), background, np.uint8)
    for i, tile in enumerate(tiles):
        t, j = divmod(i, per)
        top = gap + t * (block + tower_gap) + (j // cols) * (ch + gap)
        left = gap + (j % cols) * (cw + gap)
        image[top:top + ch, left:left + cw] = tile
    return image


def filters_summary(scores: Tensor, towers: int) -> list[dict]:
    """Mean and sample sd (n − 1) of the scores of each tower's kernels, tower A first."""
    out = []
    for t, part in enumerate(scores.chunk(towers)):
        first = t * len(part)
        out.append({"tower": "AB"[t], "kernels": [first, first + len(part) - 1], "n": len(part),
                    "mean": part.mean().item(), "sd": part.std().item() if len(part) > 1 else 0.0})
    return out


# --------------------------------------------------------------------------------- neighbours

def nearest(queries: Tensor, bank: Tensor, k: int, *, chunk: int = 8192) -> tuple[Tensor, Tensor]:
    """The k rows of `bank` (M×D) nearest each of `queries` (Q×D) in Euclidean distance.

    Returns (distances Q×k float32, indices Q×k int64), nearest first; ties go to the lower
    index. The bank is read `chunk` rows at a time (it may be float16), so memory is
    O(Q·(chunk + k)), not O(Q·M).
    """
    if queries.dim() != 2 or bank.dim() != 2 or queries.shape[1] != bank.shape[1]:
        raise ValueError(f"queries Q×D and bank M×D needed, got {tuple(queries.shape)} and {tuple(bank.shape)}")
    if not 1 <= k <= len(bank):
        raise ValueError(f"k must be in [1, {len(bank)}] (the bank's size), got {k}")
    best = None
    for start in range(0, len(bank), chunk):
        best = merge_nearest(best, queries, bank[start:start + chunk], start, k)
    return best


def merge_nearest(best: tuple[Tensor, Tensor] | None, queries: Tensor, block: Tensor, offset: int,
                  k: int) -> tuple[Tensor, Tensor]:
    """Fold the bank rows `block` (indices offset, offset + 1, …) into the running k nearest
    `best` (None before the first block). A stable sort keeps the lower index first on ties."""
    q = queries.float()
    d = torch.cdist(q, block.to(q.device, torch.float32), compute_mode="donot_use_mm_for_euclid_dist")
    i = torch.arange(offset, offset + block.shape[0], device=q.device).expand_as(d)
    if best is not None:
        d, i = torch.cat([best[0], d], dim=1), torch.cat([best[1], i], dim=1)
    d, order = d.sort(dim=1, stable=True)
    return d[:, :k], i.gather(1, order)[:, :k]


def fc7_features(model: nn.Module, x: Tensor) -> Tensor:
    """Patches B×3×crop×crop → B×4096: fc7's output after its ReLU (§6.1, Fig. 4; the net's own
    activation, so tanh for that ablation) in eval mode (AlexNet.features)."""
    return model.features(x, "fc7").float()


def _decoded(dataset: PackedSet, indices: Sequence[int]) -> Tensor:
    """Images `indices` as uint8 N×3×S×S (S = the stored size), decoded on the CPU."""
    images = decode_jpeg(dataset.encoded(list(indices)), mode=ImageReadMode.RGB)
    return torch.stack(images)


def centre_views(dataset: PackedSet, indices: Sequence[int], stats: Stats, config: DataConfig) -> Tensor:
    """The centre patches of images `indices`, exactly as `eval_batches` makes them (float32
    N×3×crop×crop, mean-centred), for a few images without a pass over the whole split."""
    m = (SIDE - config.crop) // 2
    full = lambda v: torch.full((len(indices),), v)
    return view_batch(upsample(_decoded(dataset, indices)), stats.mean, config, full(m), full(m), full(False))


def thumbnails(dataset: PackedSet, indices: Sequence[int], crop: int, size: int) -> Tensor:
    """The centre crop×crop patch of each image (what its fc7 vector describes, before the
    mean is subtracted), resized to size×size: uint8 N×3×size×size."""
    m = (SIDE - crop) // 2
    x = upsample(_decoded(dataset, indices)).float()[:, :, m:m + crop, m:m + crop]
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8)


def neighbour_grid(images: Tensor, *, gap: int = 2, query_gap: int = 10, background: int = 255) -> np.ndarray:
    """uint8 Q×(1 + k)×3×s×s (per row: the query, then its neighbours) → uint8 H×W×3.

    `gap` pixels between images, between rows and around the image; `query_gap` pixels between
    the query and its first neighbour. H = 2·gap + Q·s + (Q − 1)·gap and
    W = 2·gap + (1 + k)·s + (k − 1)·gap + query_gap."""
    q, cols, _, s, _ = images.shape
    k = cols - 1
    if k < 1:
        raise ValueError(f"each row needs the query and at least one neighbour, got {cols} image(s)")
    out = np.full((2 * gap + q * s + (q - 1) * gap, 2 * gap + cols * s + (k - 1) * gap + query_gap, 3),
                  background, np.uint8)
    pixels = images.permute(0, 1, 3, 4, 2).numpy()
    for r in range(q):
        top = gap + r * (s + gap)
        for c in range(cols):
            left = gap + c * s + (query_gap + (c - 1) * gap if c else 0)
            out[top:top + s, left:left + s] = pixels[r, c]
    return out


def query_indices(n: int, count: int) -> list[int]:
    """`count` images spread evenly over a split of n (first and last included): deterministic."""
    if not 1 <= count <= n:
        raise ValueError(f"--queries must be in [1, {n}] for a split of {n} images, got {count}")
    return torch.linspace(0, n - 1, count).round().long().tolist()


# ------------------------------------------------------------------------------------ commands

def _save_png(image: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)


def run_filters(args: argparse.Namespace) -> int:
    state = load_checkpoint(args.checkpoint)
    config = config_of(state, args.checkpoint)  # the run's config says how many towers
    weights = state["model"].get("conv1.weight")
    if weights is None:
        raise UserError(f"{args.checkpoint} holds no conv1.weight; {CHECKPOINT_ADVICE}")
    towers = config.model.towers
    scores = colour_specificity(weights)
    image = filter_grid(weights, towers, scale=args.scale)
    _save_png(image, args.out)
    summary = filters_summary(scores, towers)
    per = len(scores) // towers
    for t in summary:
        print(f"tower {t['tower']} (kernels {t['kernels'][0]}-{t['kernels'][1]}), colour specificity:")
        part = scores[t["kernels"][0]:t["kernels"][1] + 1].tolist()
        for row in range(0, per, COLUMNS):
            print("  " + " ".join(f"{s:.2f}" for s in part[row:row + COLUMNS]))
    for t in summary:
        print(f"tower {t['tower']}: {t['mean']:.3f} ± {t['sd']:.3f} (mean ± sd, n={t['n']})")
    write_json(args.out.with_suffix(".json"), {
        "checkpoint": str(args.checkpoint), "epochs_trained": state.get("epoch"), "towers": towers,
        "kernel_shape": list(weights.shape[1:]), "image": str(args.out), "image_size_hw": list(image.shape[:2]),
        "score": "colour specificity: Σ|w − grey(w)|² / Σ|w|² per kernel, grey(w) = each pixel's "
                 "projection on (1,1,1)/√3; 0 grey, 1 pure chroma, ≈2/3 for random weights",
        "per_tower": summary, "scores": [round(s, 6) for s in scores.tolist()]})
    print(f"wrote {args.out} ({image.shape[1]}×{image.shape[0]}) and {args.out.with_suffix('.json')}")
    return 0


def run_neighbours(args: argparse.Namespace) -> int:
    queries_set, bank_set, stats = open_data(args.data, [args.split, args.bank_split])
    chosen = args.indices if args.indices else query_indices(len(queries_set), args.queries)
    if not all(0 <= i < len(queries_set) for i in chosen):
        raise ValueError(f"--indices must lie in [0, {len(queries_set)}) for split {args.split!r}")
    if not 1 <= args.k <= len(bank_set):
        raise ValueError(f"--k must be in [1, {len(bank_set)}] (the {args.bank_split} split's size)")
    state = load_checkpoint(args.checkpoint)
    devices = parse_devices(args.device, towers=config_of(state, args.checkpoint).model.towers)
    model, config = model_from_checkpoint(state, devices=devices, path=args.checkpoint)
    model.eval()
    device, precision = devices[0], config.train.precision
    with autocast(device, precision):
        q = fc7_features(model, centre_views(queries_set, chosen, stats, config.data).to(device))
    start = time.time()
    distances, indices, seen = bank_nearest(model, q, bank_set, stats, config, device, args)
    thumbs = torch.stack([torch.cat([thumbnails(queries_set, [qi], config.data.crop, args.thumb),
                                     thumbnails(bank_set, row, config.data.crop, args.thumb)])
                          for qi, row in zip(chosen, indices.tolist())])
    image = neighbour_grid(thumbs)
    _save_png(image, args.out)
    write_json(args.out.with_suffix(".json"), {
        "checkpoint": str(args.checkpoint), "epochs_trained": state.get("epoch"), "data": str(args.data),
        "split": args.split, "bank_split": args.bank_split, "k": args.k,
        "features": "fc7 after its ReLU, 4096-d, centre patch, eval mode; Euclidean distance",
        "bank_images": seen, "seconds": round(time.time() - start, 1), "image": str(args.out),
        "image_size_hw": list(image.shape[:2]),
        "queries": neighbour_rows(queries_set, bank_set, chosen, distances, indices, args)})
    print(f"wrote {args.out} ({image.shape[1]}×{image.shape[0]}) and {args.out.with_suffix('.json')}")
    return 0


def bank_nearest(model: nn.Module, q: Tensor, bank_set: PackedSet, stats: Stats, config: RunConfig,
                 device: torch.device, args: argparse.Namespace) -> tuple[Tensor, Tensor, int]:
    """(distances, indices) on the CPU of each query's --k nearest in the bank split, and the
    images read. Streamed: only each query's k nearest so far are kept, never the M×4096 features."""
    best, seen, start = None, 0, time.time()
    last = start
    for x, _ in eval_batches(bank_set, stats, config.data, batch_size=args.batch_size, device=device):
        with autocast(device, config.train.precision):
            f = fc7_features(model, x)
        best = merge_nearest(best, q, f, seen, args.k)
        seen += len(f)
        now = time.time()
        if now - last >= args.progress_s or seen == len(bank_set):
            rate = seen / max(now - start, 1e-9)
            print(f"fc7 of {args.bank_split}: {seen:,}/{len(bank_set):,} images, {rate:,.0f} images/s, "
                  f"{(len(bank_set) - seen) / rate:,.0f} s left", flush=True)
            last = now
    distances, indices = (t.cpu() for t in best)
    return distances, indices, seen


def neighbour_rows(queries_set: PackedSet, bank_set: PackedSet, chosen: Sequence[int], distances: Tensor,
                   indices: Tensor, args: argparse.Namespace) -> list[dict]:
    """One record per query (its neighbours, their labels and distances), each also printed."""
    names = [c["name"] for c in queries_set.classes]
    rows = []
    for qi, d, row in zip(chosen, distances.tolist(), indices.tolist()):
        label = int(queries_set.labels[qi])
        labels = bank_set.labels[row].tolist()
        same = sum(lab == label for lab in labels)
        print(f"{args.split}[{qi}] {names[label]}: {same}/{len(row)} neighbours of its class; "
              + ", ".join(f"{args.bank_split}[{i}] {names[lab]} ({dist:.3g})" for i, lab, dist in zip(row, labels, d)))
        rows.append({"query": qi, "label": label, "neighbours": row, "labels": labels,
                     "distances": [round(x, 6) for x in d], "same_class": same})
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, argv)


def _main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    for name in ("scale", "thumb", "batch_size", "k", "queries"):
        if getattr(args, name, 1) is not None and getattr(args, name, 1) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    check_outputs(args)
    try:
        return args.run(args)
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise UserError(str(e)) from None


def check_outputs(args: argparse.Namespace) -> None:
    """Before any work: --out and the FILE.json derived from it must be writable, neither an
    input nor a file of a run folder that another command wrote (filters may replace the run's
    own Fig. 3 picture and record, which it makes)."""
    inputs = [args.checkpoint] + ([args.data] if args.command == "neighbours" else [])
    record = args.out.with_suffix(".json")
    for option, path in (("--out", args.out), (f"--out {args.out} writes", record)):
        writable_file(path, option, inputs=inputs)
        refuse_run_file(path, option, args.command)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m reproduction.visualize", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{filters,neighbours}")

    p = sub.add_parser("filters", help="conv1's kernels as in Fig. 3, with colour-specificity scores",
                       description="Draw conv1's kernels as in Fig. 3: tower A (GPU 1) in the top block, "
                                   "tower B (GPU 2) below, 16 per row, each contrast-stretched on its own. "
                                   "Prints each kernel's colour specificity (0 grey … 1 pure chroma, ≈2/3 "
                                   "for random weights) and each tower's mean ± sd, and writes them to "
                                   "FILE.json beside FILE.png.")
    p.add_argument("--checkpoint", type=Path, required=True, help="a run's checkpoint.pt")
    p.add_argument("--out", type=Path, required=True, help="the PNG to write (FILE.json is written beside it)")
    p.add_argument("--scale", type=int, default=4, help="pixels per kernel weight (default 4)")
    p.set_defaults(run=run_filters)

    p = sub.add_parser("neighbours", help="fc7 nearest training images, as in Fig. 4 (left)",
                       description="Fig. 4 (left): for a few images of --split, the --k images of "
                                   "--bank-split whose fc7 vectors (after the ReLU, centre patch, eval "
                                   "mode) are nearest in Euclidean distance. One pass over the bank split, "
                                   "keeping only each query's k nearest. Writes FILE.png (a row per query: "
                                   "query, gap, neighbours nearest first) and FILE.json.")
    p.add_argument("--checkpoint", type=Path, required=True, help="a run's checkpoint.pt")
    p.add_argument("--data", type=Path, required=True, help="a folder prepared by python -m data_prep")
    p.add_argument("--out", type=Path, required=True, help="the PNG to write (FILE.json is written beside it)")
    p.add_argument("--split", default="val", help="where the queries come from (default: val)")
    p.add_argument("--bank-split", default="train",
                   help="where the neighbours come from (default: train); with --split equal to it, "
                        "each query's nearest neighbour is itself")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--queries", type=int, default=5, help="queries, spread evenly over the split (default 5)")
    which.add_argument("--indices", type=int, nargs="+", help="query images by index in the split (instead of --queries)")
    p.add_argument("--k", type=int, default=5, help="neighbours per query (default 5)")
    p.add_argument("--thumb", type=int, default=112, help="side of each drawn image in pixels (default 112)")
    p.add_argument("--batch-size", type=int, default=128, help="images per batch (default 128)")
    p.add_argument("--device", default=None,
                   help="cpu, cuda, or 'cuda:0,cuda:1' for the towers (default: the GPU(s) if any)")
    p.add_argument("--progress-s", type=float, default=10.0, help="seconds between progress lines (default 10)")
    p.set_defaults(run=run_neighbours)
    return parser


if __name__ == "__main__":
    sys.exit(main())
