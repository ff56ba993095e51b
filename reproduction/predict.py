"""Classify images with a checkpoint: the top-5 classes of each, with names and probabilities.

    python -m reproduction.predict --checkpoint PATH IMAGE... [--stats FILE | --data DIR] [--centre]

Each image is prepared as §2 says (shorter side rescaled to 256, the central 256×256, with
data_prep's own functions; for a net trained on a set stored at its native size S < 256, e.g.
28 px Fashion-MNIST, S×S upsampled by the loader's `upsample`, as in training), then cut into
the checkpoint's test views (its DataConfig: crop 224, or 227 for an imported Caffe net; the
mean subtracted as the net was trained). The prediction is
the average of the softmax outputs of the ten patches (four corners, centre, and their
reflections, §4.1), or of the centre patch alone with --centre.

The mean image (stats.npz) comes from --stats, else --data, else stats.npz beside the checkpoint
(what reproduction.caffe writes), else the prepared set named in the run folder's config.json.
Class names come from the prepared set's manifest.json the same way; a 1000-class net without
one gets ImageNet's names (../shared/data/imagenet-sample/imagenet_class_index.json, else
torchvision's ImageNet metadata), in sorted-wnid order, which is Caffe's and data_prep's order.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from data_prep.image import BadImage, decode, resize_center_crop, to_rgb
from reproduction.config import DataConfig
from reproduction.data import SIDE, Stats, average_softmax, load_stats, ten_patch_offsets, view_batch
from reproduction.runs import load_checkpoint, model_from_checkpoint, read_json

IMAGENET_INDEX = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-sample" / "imagenet_class_index.json"


def load_image(path: str | Path, size: int = SIDE) -> Tensor:
    """§2: uint8 3×size×size RGB (shorter side to `size`, central crop). Raises BadImage.
    size < 256 is for nets trained on a set data_prep stored at its native size (e.g. 28 px
    Fashion-MNIST): the image is brought to that size, then upsampled by the loader's `upsample`,
    as in training."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise BadImage(f"cannot read: {e.strerror or e}") from None
    img = resize_center_crop(to_rgb(decode(data)), size)
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


@torch.no_grad()
def predict(model: nn.Module, images: Tensor, stats: Stats, config: DataConfig, *,
            ten_patch: bool = True, batch_size: int = 8) -> Tensor:
    """images N×3×S×S (uint8; S < 256 is upsampled as the loader does) → class probabilities N×C: the softmax averaged over the ten
    patches (§4.1), or the centre patch's softmax."""
    model.eval()
    offsets = ten_patch_offsets(config.crop)
    offsets = offsets if ten_patch else offsets[4:5]
    device = next(model.parameters()).device
    mean = stats.mean.to(device)
    out = []
    for batch in images.split(batch_size):
        batch = batch.to(device)
        full = lambda v: torch.full((len(batch),), v)
        views = torch.stack([view_batch(batch, mean, config, full(t), full(l), full(f))
                             for t, l, f in offsets], dim=1)  # N×V×3×crop×crop, no lighting (test)
        logits = model(views.flatten(0, 1)).float()
        out.append(average_softmax(logits.unflatten(0, views.shape[:2])).cpu())
    return torch.cat(out)


def find_stats(checkpoint: Path, stats: Path | None, data: Path | None) -> Path:
    """The folder whose stats.npz holds the net's mean image (see the module docstring)."""
    if stats is not None:
        folder = stats.parent if stats.is_file() else stats
        if not (folder / "stats.npz").is_file() or (stats.is_file() and stats.name != "stats.npz"):
            raise FileNotFoundError(f"--stats {stats}: give a stats.npz file or the folder holding one")
        return folder
    for folder in [data, checkpoint.parent, _run_data(checkpoint)]:
        if folder is not None and (Path(folder) / "stats.npz").is_file():
            return Path(folder)
    raise FileNotFoundError(f"no stats.npz for {checkpoint}: none beside it and no prepared set in its "
                            f"config.json; pass --stats FILE or --data DIR (the set it was trained on)")


def find_manifest(checkpoint: Path, data: Path | None) -> dict | None:
    """The manifest of the prepared set the net was trained on: --data, beside the checkpoint,
    or the set named in the run folder's config.json; None when there is none (an import)."""
    for folder in [data, checkpoint.parent, _run_data(checkpoint)]:
        if folder is not None and (Path(folder) / "manifest.json").is_file():
            return read_json(Path(folder) / "manifest.json")
        if folder is not None and folder == data:
            raise FileNotFoundError(f"--data {data}: no manifest.json (not a folder prepared by data_prep)")
    return None


def class_names(manifest: dict | None, num_classes: int) -> list[str]:
    """Names for fc8's outputs: the prepared set's manifest, else ImageNet's for 1000 classes."""
    if manifest is not None:
        classes = manifest["classes"]
        if len(classes) != num_classes:
            raise ValueError(f"the checkpoint has {num_classes} classes, its data set "
                             f"({manifest.get('dataset')}) lists {len(classes)}")
        return [c["name"] if c["name"] == c["id"] else f"{c['name']} ({c['id']})" for c in classes]
    if num_classes != 1000:
        raise ValueError(f"the checkpoint has {num_classes} classes and no prepared set names them; "
                         f"pass --data DIR (the set it was trained on)")
    if IMAGENET_INDEX.is_file():
        index = read_json(IMAGENET_INDEX)
        return [f"{index[str(i)][1]} ({index[str(i)][0]})" for i in range(1000)]
    from torchvision.models import AlexNet_Weights  # names only: no weights are loaded
    return list(AlexNet_Weights.IMAGENET1K_V1.meta["categories"])


def _run_data(checkpoint: Path) -> Path | None:
    meta = checkpoint.parent / "config.json"
    if not meta.is_file():
        return None
    path = read_json(meta).get("data", {}).get("path")
    return Path(path) if path else None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reproduction.predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True,
                        help="a run's checkpoint.pt, or one written by reproduction.caffe")
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="image files (any format PIL reads)")
    parser.add_argument("--stats", type=Path, help="stats.npz holding the mean image (or its folder)")
    parser.add_argument("--data", type=Path, help="the prepared set the net was trained on (stats and class names)")
    parser.add_argument("--centre", action="store_true", help="the centre patch only (default: ten patches, §4.1)")
    parser.add_argument("--top", type=int, default=5, help="classes to print per image (default 5)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    args = parser.parse_args(argv)
    try:
        state = load_checkpoint(args.checkpoint)
        model, config = model_from_checkpoint(state, devices=args.device)
        stats = load_stats(find_stats(args.checkpoint, args.stats, args.data))
        manifest = find_manifest(args.checkpoint, args.data)
        names = class_names(manifest, config.model.num_classes)
        size = int(manifest["image_size"]) if manifest else SIDE
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    images, good, failed = [], [], 0
    for path in args.images:
        try:
            images.append(load_image(path, size))
            good.append(path)
        except BadImage as e:
            print(f"error: {path}: {e}", file=sys.stderr)
            failed += 1
    if images:
        probs = predict(model, torch.stack(images), stats, config.data, ten_patch=not args.centre)
        views = "centre patch" if args.centre else "10 patches"
        for path, p in zip(good, probs):
            top = p.topk(min(args.top, len(p)))
            print(f"{path} ({views}, {config.data.crop}×{config.data.crop})")
            for rank, (prob, k) in enumerate(zip(top.values.tolist(), top.indices.tolist()), start=1):
                print(f"  {rank}. {prob:.4f}  {k:>4}  {names[k]}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
