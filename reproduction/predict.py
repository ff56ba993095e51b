"""Classify images with a checkpoint: the top-5 classes of each, with names and probabilities.

    python -m reproduction.predict --checkpoint PATH IMAGE... [--stats FILE | --data DIR] [--centre]

Each image is prepared as §2 says (shorter side rescaled to 256, the central 256×256, with
data_prep's own functions; for a net trained on a set stored at its native size S < 256, e.g.
28 px Fashion-MNIST, S×S upsampled by the loader's `upsample`, as in training), then cut into
the checkpoint's test views (its DataConfig: crop 224, or 227 for an imported Caffe net; the
mean subtracted as the net was trained). The prediction is
the average of the softmax outputs of the ten patches (four corners, centre, and their
reflections, §4.1), or of the centre patch alone with --centre.

The net, its mean image and class names come from its weights record (reproduction/weights.py:
`reproduction.alexnet(weights=CHECKPOINT)`), whose `transforms()` makes the views. The mean
image (stats.npz) comes from --stats, else --data, else stats.npz beside the checkpoint
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
from reproduction.data import SIDE, Stats, average_softmax
from reproduction.errors import run_cli
from reproduction.weights import TestTransform, alexnet


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
    """images N×3×S×S (uint8, prepared by load_image; S < 256 is upsampled as the loader does) →
    class probabilities N×C: the softmax averaged over the ten patches (§4.1), or the centre
    patch's softmax. The views are the weights record's transforms() (reproduction/weights.py)."""
    model.eval()
    transform = TestTransform(stats.mean, config, image_size=images.shape[-1], ten_patch=ten_patch)
    device = next(model.parameters()).device
    out = []
    for batch in images.split(batch_size):
        views = torch.stack([transform(image) for image in batch])  # N×(10×)3×crop×crop, no lighting (test)
        views = views if ten_patch else views[:, None]
        logits = model(views.flatten(0, 1).to(device)).float()
        out.append(average_softmax(logits.unflatten(0, views.shape[:2])).cpu())
    return torch.cat(out)


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, argv)


def _main(argv: Sequence[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reproduction.predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True,
                        help="a run's checkpoint.pt (or best.pt), or one written by reproduction.caffe")
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="image files (any format PIL reads)")
    parser.add_argument("--stats", type=Path, help="stats.npz holding the mean image (or its folder)")
    parser.add_argument("--data", type=Path, help="the prepared set the net was trained on (stats and class names)")
    parser.add_argument("--centre", action="store_true", help="the centre patch only (default: ten patches, §4.1)")
    parser.add_argument("--top", type=int, default=5, help="classes to print per image (default 5)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    args = parser.parse_args(argv)
    if args.top < 1:
        parser.error(f"--top must be >= 1, got {args.top}")
    model = alexnet(weights=args.checkpoint, stats=args.stats, data=args.data, devices=args.device)
    record = model.weights
    images, good, failed = [], [], 0
    for path in args.images:
        try:
            images.append(load_image(path, record.image_size))
            good.append(path)
        except BadImage as e:
            print(f"error: {path}: {e}", file=sys.stderr)
            failed += 1
    if images:
        stats = Stats(record.mean, torch.zeros(3, dtype=torch.float64), torch.eye(3, dtype=torch.float64))
        probs = predict(model, torch.stack(images), stats, record.config.data, ten_patch=not args.centre)
        views = "centre patch" if args.centre else "10 patches"
        crop = record.config.data.crop
        for path, p in zip(good, probs):
            top = p.topk(min(args.top, len(p)))
            print(f"{path} ({views}, {crop}×{crop})")
            for rank, (prob, k) in enumerate(zip(top.values.tolist(), top.indices.tolist()), start=1):
                print(f"  {rank}. {prob:.4f}  {k:>4}  {record.classes[k]}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
