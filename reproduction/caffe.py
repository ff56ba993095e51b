"""Import Caffe's pretrained `bvlc_alexnet` (BVLC/caffe models/bvlc_alexnet) into our checkpoint format.

    python -m reproduction.caffe bvlc_alexnet.npy --out runs/caffe/checkpoint.pt [--mean ilsvrc_2012_mean.npy]

Reads the `bvlc_alexnet.npy` dictionary that the TensorFlow ports load (converted from the
.caffemodel by caffe-tensorflow): `np.load(path, encoding="bytes", allow_pickle=True).item()` is
{"conv1": [W, b], ..., "fc8": [W, b]} (keys may be bytes), conv W height×width×in×out with a grouped
layer's `in` counting one group's maps (conv2 is 5×5×48×256; outputs 0–127 are group 1, reading
maps 0–47), fc W in×out. Writes `checkpoint.pt` (our format; "optimizer" and "position" are None)
and `stats.npz` beside it (Caffe's mean image as RGB), which predict/evaluate read.

The mapping, layer by layer (each checked numerically in tests/test_caffe.py):
- conv: HWIO → OIHW. A grouped layer's kernels need no other change: our state_dict is a grouped
  net's (conv2.weight 256×48×5×5, outputs 0–127 read maps 0–47), the same split Caffe uses.
- conv1: Caffe's input is BGR. Its kernels' input axis is reversed, so the imported net reads RGB
  like every other net here (the function is unchanged: w_rgb[:, c] = w_bgr[:, 2 − c]).
- fc6: the ports flatten pool5 in NHWC order, so the file's row index is (h·6 + w)·256 + c
  (caffe-tensorflow permutes Caffe's c,h,w rows to h,w,c for exactly that). Our fc6 reads
  torch.flatten of N×256×6×6, index c·36 + h·6 + w: the rows are permuted back.
- fc7, fc8: transposed, and their weights multiplied by 1/(1 − p) = 2. Caffe's dropout is
  inverted (identity at test), so Caffe's fc7/fc8 were trained on un-halved activations; ours
  follows §4.2 (train: drop; test: ×0.5). ×2 on the weights (exact in binary floating point)
  makes our eval net compute Caffe's function exactly while keeping the paper's dropout for
  fine-tuning (dropout=0 would also be exact at test but would train without dropout).
- Caffe's arithmetic: 227×227 crops (no overhang), LRN x/(1 + (1e-4/5)·Σx²)^0.75 (k = 1),
  pooling sizes 55→27→13→6 (Caffe's ceil equals floor here). `CAFFE` below.
- Caffe's norm1/norm2 each normalise all 96/256 maps at once, so the windows of maps 46–49
  (norm1) and 126–129 (norm2) span both groups, where the paper's two GPUs normalised their own
  maps: the imported config sets lrn_scope="all".
- The mean: Caffe's ilsvrc_2012_mean.npy (BGR, 0–255, 3×256×256) reversed to RGB. Caffe's data
  layer subtracts it at the crop's offset and mirrors it with the crop: DataConfig mean="offset".
  No lighting statistics come with it (bvlc_alexnet was trained without relighting): eigval 0.

The .caffemodel itself is not read: that needs Caffe's caffe.proto compiled with protoc (or
pycaffe, which is not on PyPI); convert it to the .npy with caffe-tensorflow first.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import sys
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from reproduction.config import AlexNetConfig, DataConfig, RunConfig
from reproduction.model import AlexNet
from reproduction.runs import config_dict, save_checkpoint

SHARED_MEAN = (Path(__file__).resolve().parents[2] / "shared" / "data" / "constants" / "ilsvrc_2012_mean.npy")

# Caffe's arithmetic (BVLC/caffe models/bvlc_alexnet/deploy.prototxt); everything else the paper's.
CAFFE = RunConfig(model=AlexNetConfig(input_size=227, lrn="code", lrn_k=1.0, lrn_scope="all"),
                  data=DataConfig(crop=227, mean="offset", lighting="none"))

# The file's shapes: conv H×W×in×out (in per group), fc in×out; fc8's out may differ (fine-tuned files).
SHAPES = {"conv1": (11, 11, 3, 96), "conv2": (5, 5, 48, 256), "conv3": (3, 3, 256, 384),
          "conv4": (3, 3, 192, 384), "conv5": (3, 3, 192, 256),
          "fc6": (6 * 6 * 256, 4096), "fc7": (4096, 4096), "fc8": (4096, None)}


def read_npy(path: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The ports' dictionary, its keys as str, every layer's shapes checked."""
    try:
        raw = np.load(path, encoding="bytes", allow_pickle=True).item()
    except FileNotFoundError:
        raise FileNotFoundError(f"no file at {path}") from None
    except (ValueError, OSError, AttributeError) as e:
        raise ValueError(f"{path}: not a pickled dictionary in .npy form ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: holds a {type(raw).__name__}, not the {{'conv1': [W, b], ...}} dictionary")
    layers = {(k.decode() if isinstance(k, bytes) else k): v for k, v in raw.items()}
    missing = [name for name in SHAPES if name not in layers]
    if missing:
        raise ValueError(f"{path}: no layer(s) {', '.join(missing)}; it has {', '.join(sorted(layers))}")
    out = {}
    for name, shape in SHAPES.items():
        w, b = (np.asarray(a, dtype=np.float32) for a in layers[name])
        if w.ndim != len(shape) or any(s is not None and s != d for s, d in zip(shape, w.shape)):
            raise ValueError(f"{path}: {name} weights are {w.shape}, expected "
                             f"{tuple('N' if s is None else s for s in shape)} (height×width×in×out / in×out)")
        if b.shape != (w.shape[-1],):
            raise ValueError(f"{path}: {name} bias is {b.shape}, expected ({w.shape[-1]},)")
        out[name] = (w, b)
    return out


def caffe_state_dict(layers: Mapping[str, tuple[np.ndarray, np.ndarray]], *, dropout: float = 0.5) -> dict:
    """The file's arrays as our state_dict (see the module docstring for each step)."""
    state = {}
    for name in ("conv1", "conv2", "conv3", "conv4", "conv5"):
        w, b = layers[name]
        w = w.transpose(3, 2, 0, 1)           # H×W×in×out → out×in×H×W (grouped: in per group)
        if name == "conv1":
            w = w[:, ::-1]                    # BGR input maps → RGB
        state[f"{name}.weight"], state[f"{name}.bias"] = w, b
    w, b = layers["fc6"]
    # rows (h, w, c) of the ports' NHWC flatten → columns (c, h, w) of torch.flatten(N×256×6×6)
    state["fc6.weight"], state["fc6.bias"] = w.reshape(6, 6, 256, -1).transpose(3, 2, 0, 1).reshape(-1, 9216), b
    for name in ("fc7", "fc8"):
        w, b = layers[name]
        # DEVIATION-compensation (§4.2): our dropout halves fc6/fc7 outputs at test, Caffe's does not
        state[f"{name}.weight"], state[f"{name}.bias"] = w.T / (1.0 - dropout), b
    return {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in state.items()}


def caffe_mean_rgb(path: str | Path) -> np.ndarray:
    """Caffe's mean image (BGR, 0–255, 3×256×256) as float32 RGB."""
    mean = np.load(path)
    if mean.shape != (3, 256, 256):
        raise ValueError(f"{path}: the mean image must be 3×256×256 (BGR), got {mean.shape}")
    return np.ascontiguousarray(mean[::-1], dtype=np.float32)


def import_caffe(npy: str | Path, out: str | Path, *, mean: str | Path = SHARED_MEAN) -> AlexNet:
    """Write `out` (our checkpoint) and `stats.npz` beside it; return the imported net."""
    npy, out = Path(npy), Path(out)
    layers = read_npy(npy)
    num_classes = layers["fc8"][0].shape[1]
    config = dataclasses.replace(CAFFE, model=dataclasses.replace(CAFFE.model, num_classes=num_classes))
    model = AlexNet(config.model)
    model.load_state_dict(caffe_state_dict(layers, dropout=config.model.dropout))
    rgb_mean = caffe_mean_rgb(mean)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out, {"model": model.state_dict(), "optimizer": None, "position": None,
                          "config": config_dict(config), "epoch": 0,
                          "source": {"weights": str(npy), "weights_sha256": _sha256(npy),
                                     "mean": str(mean), "importer": "reproduction.caffe"}})
    np.savez(out.parent / "stats.npz", mean=rgb_mean, rgb_cov=np.zeros((3, 3)), eigval=np.zeros(3),
             eigvec=np.eye(3), count=0, source=f"caffe {Path(mean).name}, BGR reversed to RGB")
    return model


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reproduction.caffe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("npy", type=Path, help="bvlc_alexnet.npy (the TensorFlow ports' dictionary)")
    parser.add_argument("--out", type=Path, required=True, help="the checkpoint to write (stats.npz goes beside it)")
    parser.add_argument("--mean", type=Path, default=SHARED_MEAN,
                        help="Caffe's ilsvrc_2012_mean.npy (default %(default)s)")
    args = parser.parse_args(argv)
    try:
        model = import_caffe(args.npy, args.out, mean=args.mean)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.npy} -> {args.out} ({model.config.num_classes} classes, 227×227 RGB input, LRN k=1, "
          f"fc7/fc8 weights ×2 for §4.2 dropout) and {args.out.parent / 'stats.npz'} (Caffe's mean, RGB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
