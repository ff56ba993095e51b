"""python -m data_prep SOURCE PATH --out DIR [options]: one-shot prep into the packed format.

Examples (see data_prep/README.md for the format and the expected output):
  python -m data_prep ilsvrc2012 /data/ilsvrc2012 --out data/ilsvrc2012
  python -m data_prep ilsvrc2010 /data/ilsvrc2010 --out data/ilsvrc2010
  python -m data_prep cifar10 ../shared/data/cifar10 --out data/cifar10
  python -m data_prep tiny-imagenet ../shared/data/tiny-imagenet-200 --out data/tiny-imagenet
  python -m data_prep fashion-mnist ../shared/data/fashion-mnist --out data/fashion-mnist
  python -m data_prep torchvision MNIST /data/mnist --out data/mnist
  python -m data_prep imagefolder /data/myset --out data/myset
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from reproduction.errors import UserError, reading, run_cli, sigterm_as_interrupt

from . import image, sources
from .pack import Options, PrepError, prepare

DEFAULT_CONSTANTS = (Path(__file__).resolve().parents[2] / "shared" / "data" / "constants"
                     / "cuda_convnet2_imagenet_meta.npz")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m data_prep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="source", required=True, metavar="SOURCE")
    specs = {
        "ilsvrc2012": "folder with ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar and "
                      "ILSVRC2012_devkit_t12.tar.gz (read as streams, never extracted), or an "
                      "extracted train/<wnid>/*.JPEG + val/<wnid>/*.JPEG tree",
        "ilsvrc2010": "folder with ILSVRC2010_images_train.tar, ILSVRC2010_images_val.tar, "
                      "ILSVRC2010_images_test.tar, ILSVRC2010_devkit-1.0.tar.gz and "
                      "ILSVRC2010_test_ground_truth.txt (read as streams, never extracted); "
                      "splits train, val and test (labelled: Table 1's test set)",
        "tiny-imagenet": "tiny-imagenet-200.zip, its extracted folder, or a folder of "
                         "train-NN.tar.gz + val.tar.gz shards with wnids.txt (shared/data layout)",
        "cifar10": "folder with train.tar.gz + test.tar.gz (<class>/<name>.jpg), or torchvision's "
                   "cifar-10-batches-py/; the test split is stored as val",
        "fashion-mnist": "torchvision FashionMNIST root (download=False); the test split is stored as val",
        "torchvision": "any torchvision.datasets classification class, then its root (download=False)",
        "imagefolder": "root/train/<class>/* and root/val/<class>/* (root/test/ if no val/)",
    }
    for name, text in specs.items():
        sp = sub.add_parser(name, help=text, description=text)
        if name == "torchvision":
            sp.add_argument("dataset_class", help="class name in torchvision.datasets, e.g. MNIST, CIFAR100")
        sp.add_argument("path", type=Path, help="where the source data is")
        if name == "imagefolder":
            sp.add_argument("--native-size", type=int, default=None, metavar="S",
                            help="every image is S×S with S < 256: store unscaled (the loader "
                                 "upsamples to 256); other sizes are skipped and listed")
            sp.add_argument("--name", default="imagefolder", help="the dataset name in the manifest")
        _common(sp)
    return p


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, required=True, help="output folder for this dataset")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="processes for decode/resize/encode (default: all %(default)s cores)")
    p.add_argument("--quality", type=int, default=95,
                   help="JPEG quality of re-encoded images (default %(default)s); images needing no "
                        "pixel change are stored byte-for-byte")
    p.add_argument("--resample", choices=sorted(image.RESAMPLE), default="bicubic",
                   help="PIL filter for the §2 shorter-side-to-256 rescale (default %(default)s)")
    p.add_argument("--chunk-size", type=int, default=1000,
                   help="images per resumable chunk of work (default %(default)s)")
    p.add_argument("--classes", type=int, default=None, metavar="K",
                   help="keep only the first K classes in sorted order (a quick subset)")
    p.add_argument("--limit-per-class", type=int, default=None, metavar="N",
                   help="keep only the first N files of each class in each split (a quick subset)")
    p.add_argument("--val-limit-per-class", type=int, default=None, metavar="M",
                   help="the same for the splits other than train (default: --limit-per-class)")
    p.add_argument("--holdout", type=int, default=None, metavar="N",
                   help="hold out the first N training images of each class as the val split; the "
                        "source's own val/test split is then stored as split test")
    p.add_argument("--stats", choices=("computed", "cuda-convnet2"), default="computed",
                   help="stats.npz from this set's train split (§4.1, default) or Krizhevsky's "
                        "constants; computed stats are compared with the constants either way")
    p.add_argument("--constants", type=Path, default=DEFAULT_CONSTANTS,
                   help="cuda-convnet2 constants .npz (default %(default)s)")
    p.add_argument("--strict-counts", action="store_true",
                   help="fail when the image counts differ from the official ones (default: a loud warning)")
    p.add_argument("--force", action="store_true",
                   help="redo from scratch even if the set is complete or partly done with other settings")
    p.add_argument("--keep-work", action="store_true",
                   help="keep the per-chunk files in OUT/.partial/ after success")
    p.add_argument("--no-hash", action="store_true",
                   help="do not sha256 the source files (saves one read of each archive)")


def make_source(args: argparse.Namespace) -> sources.Source:
    path = args.path
    if not path.exists():
        raise sources.SourceError(f"{path}: no such file or folder")
    if args.source == "ilsvrc2012":
        return sources.ilsvrc2012(path)
    if args.source == "ilsvrc2010":
        return sources.ilsvrc2010(path)
    if args.source == "tiny-imagenet":
        return sources.tiny_imagenet(path)
    if args.source == "cifar10":
        return sources.cifar10(path)
    if args.source == "fashion-mnist":
        return sources.fashion_mnist(path)
    if args.source == "torchvision":
        return sources.torchvision_dataset(args.dataset_class, path)
    return sources.imagefolder(path, dataset=args.name, native_size=args.native_size)


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv, prefix="data_prep: error")


def _main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        opts = Options(quality=args.quality, resample=args.resample, workers=args.workers,
                       chunk_size=args.chunk_size, num_classes=args.classes,
                       limit_per_class=args.limit_per_class,
                       val_limit_per_class=args.val_limit_per_class, holdout=args.holdout,
                       stats=args.stats,
                       constants=args.constants,
                       strict_counts=args.strict_counts, hash_sources=not args.no_hash,
                       keep_work=args.keep_work)
        with reading(args.path, f"{args.source} source",
                     f"see python -m data_prep {args.source} --help for the layout it reads"):
            source = make_source(args)
        with sigterm_as_interrupt():  # SIGTERM (schedulers, timeout) ends a prep as Ctrl-C does
            manifest = prepare(source, args.out, opts, source_arg=str(args.path), force=args.force)
    except (ValueError, sources.SourceError, PrepError) as e:
        raise UserError(str(e)) from None
    except KeyboardInterrupt:
        print(f"data_prep: interrupted; the finished chunks are kept in {args.out / '.partial'}: rerun the "
              "same command to resume", file=sys.stderr)
        return 130
    print_summary(manifest, args.out)
    return 0


def print_summary(manifest: dict, out: Path) -> None:
    print(f"{manifest['dataset']} -> {out}: image_size {manifest['image_size']}, "
          f"{len(manifest['classes'])} classes, {len(manifest['skipped'])} skipped, "
          f"{len(manifest['converted'])} converted to RGB")
    for split, entry in manifest["splits"].items():
        print(f"  {split} (from {entry['stored_from']}): {entry['count']:,} images, {entry['bytes']:,} bytes")
    exp = manifest["expected_counts"]
    if exp.get("checked"):
        print(f"  expected {exp['counts']}: {'match' if exp['match'] else 'MISMATCH'}")
    st = manifest["stats"]
    print(f"  stats ({st['source']}): channel mean {st['channel_mean_rgb']}, sqrt eigval {st['sqrt_eigval']}")
    # Expected for the full ILSVRC-2012 archives: train 1,281,167 images, val 50,000, match.
    # ILSVRC-2010: train 1,261,406, val 50,000, test 150,000, match.


if __name__ == "__main__":
    sys.exit(main())
