"""Import Caffe's pretrained `bvlc_alexnet` (BVLC/caffe models/bvlc_alexnet) into our checkpoint format.

    python -m reproduction.caffe bvlc_alexnet.caffemodel --out runs/caffe/checkpoint.pt [--prototxt deploy.prototxt]
    python -m reproduction.caffe bvlc_alexnet.npy --out runs/caffe/checkpoint.pt [--mean ilsvrc_2012_mean.npy]

Reads either file BVLC's net comes as:
- `bvlc_alexnet.caffemodel`, BVLC's own file (244 MB) from
  http://dl.caffe.berkeleyvision.org/bvlc_alexnet.caffemodel, sha1
  9116a64c0fbe4459d18f4bb6b56d647b63920377 (both from BVLC/caffe models/bvlc_alexnet/readme.md;
  a file with another sha1 is imported with a warning that it is not BVLC's): a
  binary protobuf NetParameter, read with the `protobuf` package through the few messages that
  reproduction/caffe_proto.py declares (no Caffe, no protoc). Its layer list is checked against
  AlexNet's (order, types, kernel sizes, strides, pads, groups, LRN and pooling settings): a file
  that differs is refused with the first layer that differs (bvlc_reference_caffenet, which pools
  before it normalises, is refused at its pool1). Blobs are in Caffe's layout: conv
  out×(in/group)×H×W with BGR input maps, fc out×in, fc6's columns in Caffe's c·36 + h·6 + w
  (NCHW) flatten. `--prototxt deploy.prototxt` (text format) is checked the same way, with its
  input size, and must agree with the weights.
- the `bvlc_alexnet.npy` dictionary that the TensorFlow ports load (converted from the .caffemodel
  by caffe-tensorflow): `np.load(path, encoding="bytes", allow_pickle=True).item()` is
  {"conv1": [W, b], ..., "fc8": [W, b]} (keys may be bytes), conv W height×width×in×out with a
  grouped layer's `in` counting one group's maps (conv2 is 5×5×48×256; outputs 0–127 are group 1,
  reading maps 0–47), fc W in×out with fc6's rows in NHWC order.
The .caffemodel's blobs are first put in the ports' layout (what caffe-tensorflow does: conv
OIHW → HWIO, fc6's columns (c, h, w) → rows (h, w, c), fc transposed), so that both files go
through the one mapping below. Composed, a .caffemodel's conv and fc6 weights arrive unchanged
but for conv1's BGR → RGB, and fc7/fc8's ×2. Writes `checkpoint.pt` (our format; "optimizer"
and "position" are None) and `stats.npz` beside it (Caffe's mean image as RGB), which
predict/evaluate and the weights record (reproduction/weights.py) read.

The mapping from the ports' layout, layer by layer (each checked numerically in tests/test_caffe.py):
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
- The mean: with `--mean`, Caffe's ilsvrc_2012_mean.npy (BGR, 0–255, 3×256×256) reversed to RGB.
  Caffe's data layer subtracts it at the crop's offset and mirrors it with the crop: DataConfig
  mean="offset". Without it, that image's per-channel mean (BGR 104.00698793, 116.66876762,
  122.67891434) as a constant image: no file to fetch, a small departure (README, Departures).
  No lighting statistics come with it (bvlc_alexnet was trained without relighting): eigval 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import sys
import warnings
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from reproduction import caffe_proto
from reproduction.config import AlexNetConfig, DataConfig, RunConfig
from reproduction.errors import UserError, run_cli
from reproduction.model import AlexNet
from reproduction.training.checkpoints import config_dict, save_checkpoint  # BVLC/caffe models/bvlc_alexnet/readme.md: caffemodel_url and sha1.
BVLC_URL = "http://dl.caffe.berkeleyvision.org/bvlc_alexnet.caffemodel"
BVLC_SHA1 = "9116a64c0fbe4459d18f4bb6b56d647b63920377"
# Said by every error about the weights file: a missing or cut-short download is the likely cause.
WHERE_FROM = f"BVLC's bvlc_alexnet.caffemodel is at {BVLC_URL}, sha1 {BVLC_SHA1}"
# DEVIATION(§2): with no mean file, Caffe's per-channel ImageNet mean (the channel means of
# python/caffe/imagenet/ilsvrc_2012_mean.npy, BGR) stands in for the 256×256 mean image that
# bvlc_alexnet was trained and deployed with. We ship no data file; in the centre crop's 227×227
# the image differs from its channel means by 4.6 on average, 13.9 at most (0–255; README, Departures).
CAFFE_CHANNEL_MEAN_BGR = (104.00698793, 116.66876762, 122.67891434)
CHANNEL_MEAN_SOURCE = ("Caffe's per-channel ImageNet mean, BGR 104.00698793, 116.66876762, 122.67891434 "
                       "(no mean file given; bvlc_alexnet was trained with the mean image ilsvrc_2012_mean.npy)")

# Caffe's arithmetic (BVLC/caffe models/bvlc_alexnet/deploy.prototxt); everything else the paper's.
CAFFE = RunConfig(model=AlexNetConfig(input_size=227, lrn="code", lrn_k=1.0, lrn_scope="all"),
                  data=DataConfig(crop=227, mean="offset", lighting="none"))

# The ports' shapes: conv H×W×in×out (in per group), fc in×out; fc8's out may differ (fine-tuned files).
SHAPES = {"conv1": (11, 11, 3, 96), "conv2": (5, 5, 48, 256), "conv3": (3, 3, 256, 384),
          "conv4": (3, 3, 192, 384), "conv5": (3, 3, 192, 256),
          "fc6": (6 * 6 * 256, 4096), "fc7": (4096, 4096), "fc8": (4096, None)}


def _alexnet_layers(m: AlexNetConfig = CAFFE.model) -> list[tuple[str, str, dict]]:
    """bvlc_alexnet's layers in order with the settings this import assumes (those of CAFFE: Caffe's
    LRN alpha is, like lrn="code", divided by local_size inside the layer). None = any value."""
    def conv(name, k, s, p, g):
        out = SHAPES[name][3]
        return (name, "Convolution", {"num_output": out, "kernel": (k, k), "stride": (s, s), "pad": (p, p),
                                      "group": g, "dilation": (1, 1), "bias_term": True})
    lrn = {"local_size": m.lrn_size, "alpha": m.lrn_alpha, "beta": m.lrn_beta, "k": m.lrn_k,
           "norm_region": "ACROSS_CHANNELS"}
    pool = {"pool": "MAX", "kernel": (m.pool_kernel,) * 2, "stride": (2, 2), "pad": (0, 0), "global_pooling": False}
    fc = lambda name, n: (name, "InnerProduct", {"num_output": n, "bias_term": True, "axis": 1, "transpose": False})
    drop = {"dropout_ratio": m.dropout}
    return [conv("conv1", 11, 4, 0, 1), ("relu1", "ReLU", {}), ("norm1", "LRN", lrn), ("pool1", "Pooling", pool),
            conv("conv2", 5, 1, 2, 2), ("relu2", "ReLU", {}), ("norm2", "LRN", lrn), ("pool2", "Pooling", pool),
            conv("conv3", 3, 1, 1, 1), ("relu3", "ReLU", {}), conv("conv4", 3, 1, 1, 2), ("relu4", "ReLU", {}),
            conv("conv5", 3, 1, 1, 2), ("relu5", "ReLU", {}), ("pool5", "Pooling", pool),
            fc("fc6", 4096), ("relu6", "ReLU", {}), ("drop6", "Dropout", drop),
            fc("fc7", 4096), ("relu7", "ReLU", {}), ("drop7", "Dropout", drop), fc("fc8", None)]


ALEXNET = _alexnet_layers()
# Layers that compute nothing in the deploy net's logits: inputs, losses, scores, plumbing.
IGNORED = {"Data", "Input", "ImageData", "MemoryData", "HDF5Data", "WindowData", "DummyData", "Softmax",
           "SoftmaxWithLoss", "Accuracy", "Silence", "Split"}


def check_alexnet(layers: Sequence[caffe_proto.Layer], where) -> dict[str, caffe_proto.Layer]:
    """The file's layers matched to ALEXNET in order (layer names may differ, e.g. a renamed fc8);
    raises ValueError naming the first layer whose type or settings differ."""
    kept = [layer for layer in layers if layer.type not in IGNORED]
    for i, (name, kind, expected) in enumerate(ALEXNET):
        if i == len(kept):
            last = f"after {kept[-1].name!r}" if kept else "with no computing layer"
            raise ValueError(f"{where}: not bvlc_alexnet: the net ends {last}, where AlexNet goes on with "
                             f"{name} ({kind})")
        layer = kept[i]
        if layer.type != kind:
            hint = (" (pooling before normalisation is bvlc_reference_caffenet's order; this import is for "
                    "bvlc_alexnet)" if name == "norm1" and layer.type == "Pooling" else "")
            raise ValueError(f"{where}: not bvlc_alexnet: layer #{layer.index} {layer.name!r} is {layer.type} "
                             f"where AlexNet has {name} ({kind}){hint}")
        for key, want in expected.items():
            got = layer.params.get(key)
            if want is not None and not _same(got, want):
                raise ValueError(f"{where}: not bvlc_alexnet: layer #{layer.index} {layer.name!r} ({kind}) has "
                                 f"{key} {_show(got)}, where the import assumes {_show(want)} (AlexNet's {name})")
    if len(kept) > len(ALEXNET):
        extra = kept[len(ALEXNET)]
        raise ValueError(f"{where}: not bvlc_alexnet: layer #{extra.index} {extra.name!r} ({extra.type}) follows "
                         f"fc8, where AlexNet ends")
    return {name: layer for (name, _, _), layer in zip(ALEXNET, kept)}


def _show(value) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)  # float32 1e-4, not 9.99999974738e-05


def _same(got, want) -> bool:
    if isinstance(want, float):
        return isinstance(got, (int, float)) and abs(got - want) <= 1e-6 * abs(want)  # float32 in the file
    return got == want


def read_caffemodel(path: str | Path, prototxt: str | Path | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A .caffemodel's conv1..fc8 in the ports' layout (see the module docstring), its layer list
    checked against AlexNet's and, if given, against the deploy prototxt's."""
    path = Path(path)
    try:
        net = caffe_proto.parse_caffemodel(path)
    except ValueError as e:  # most often a download cut short
        raise ValueError(f"{e}; {WHERE_FROM}: download it again and check its sha1") from None
    matched = check_alexnet(caffe_proto.read_net(net, path), path)
    layers = {}
    for name, shape in SHAPES.items():
        layer = matched[name]
        if len(layer.blobs) != 2:
            raise ValueError(f"{path}: layer {layer.name!r} holds {len(layer.blobs)} blobs, expected 2 "
                             f"(weights and bias)")
        w, b = layer.blobs
        if name.startswith("fc") and w.ndim == 4 and w.shape[:2] == (1, 1):
            w = w.reshape(w.shape[2:])            # legacy 1×1×out×in
        b = b.reshape(-1) if b.ndim == 1 or set(b.shape[:-1]) == {1} else b  # legacy 1×1×1×out
        caffe_shape = shape[::-1] if name.startswith("fc") else (shape[3], shape[2], shape[0], shape[1])
        if w.ndim != len(caffe_shape) or any(s is not None and s != d for s, d in zip(caffe_shape, w.shape)):
            want = tuple("N" if s is None else s for s in caffe_shape)
            raise ValueError(f"{path}: not bvlc_alexnet: layer {layer.name!r} weights are {w.shape}, AlexNet's "
                             f"{name} are {want} ({'out×in' if name.startswith('fc') else 'out×in/group×H×W'})")
        if b.shape != (w.shape[0],):
            raise ValueError(f"{path}: layer {layer.name!r} bias is {b.shape}, expected ({w.shape[0]},)")
        if name.startswith("conv"):
            w = w.transpose(2, 3, 1, 0)           # out×in×H×W → H×W×in×out
        elif name == "fc6":                       # columns (c, h, w) → rows (h, w, c), as caffe-tensorflow does
            w = w.reshape(-1, 256, 6, 6).transpose(2, 3, 1, 0).reshape(9216, -1)
        else:
            w = w.T                               # out×in → in×out
        layers[name] = (w, b)
    if prototxt is not None:
        check_prototxt(prototxt, num_classes=layers["fc8"][0].shape[1])
    return layers


def check_prototxt(path: str | Path, *, num_classes: int) -> None:
    """deploy.prototxt describes the net the import builds: AlexNet's layers and settings, a
    227×227 input and fc8's width. Raises ValueError saying where it differs."""
    net = caffe_proto.parse_prototxt(path)
    fc8 = check_alexnet(caffe_proto.read_net(net, path), path)["fc8"]
    if fc8.params["num_output"] != num_classes:
        raise ValueError(f"{path}: {fc8.name!r} has num_output {fc8.params['num_output']}, the weights have "
                         f"{num_classes} classes: not the prototxt of these weights")
    shape = caffe_proto.input_shape(net)
    size = CAFFE.model.input_size
    if shape is not None and tuple(shape[-3:]) != (3, size, size):
        raise ValueError(f"{path}: the input is {'×'.join(map(str, shape))}, where the import assumes "
                         f"N×3×{size}×{size} (Caffe's crops)")


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


def read_weights(path: str | Path, prototxt: str | Path | None = None, *,
                 prototxt_arg: str = "prototxt=") -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Either file, told apart by its first bytes (a .npy starts with \\x93NUMPY). prototxt_arg:
    how the caller names the prototxt in its errors (the CLI: --prototxt)."""
    if Path(path).is_dir():
        raise ValueError(f"{path} is a folder; give the weights file in it ({WHERE_FROM}, or the TensorFlow "
                         "ports' bvlc_alexnet.npy)")
    try:
        is_npy = _is_npy(Path(path))
    except FileNotFoundError:
        raise FileNotFoundError(f"no file at {path}; {WHERE_FROM} (or give the TensorFlow ports' "
                                f"bvlc_alexnet.npy)") from None
    if is_npy:
        if prototxt is not None:
            raise ValueError(f"{prototxt_arg} checks a .caffemodel; {path} is the ports' .npy (its layer "
                             f"settings are not in the file): leave {prototxt_arg} out")
        return read_npy(path)
    return read_caffemodel(path, prototxt)


def caffe_state_dict(layers: Mapping[str, tuple[np.ndarray, np.ndarray]], *, dropout: float = 0.5) -> dict:
    """The file's arrays (the ports' layout) as our state_dict (see the module docstring for each step)."""
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


def caffe_net(weights: str | Path, *, prototxt: str | Path | None = None,
              prototxt_arg: str = "prototxt=") -> tuple[AlexNet, RunConfig, dict]:
    """The imported net (eval mode), its config (CAFFE with fc8's width) and where it came from.
    A .caffemodel whose sha1 is not BVLC's is imported (a fine-tuned or re-saved copy has the same
    layers) with a UserWarning saying so; its record then carries neither BVLC's licence nor figures."""
    weights = Path(weights)
    layers = read_weights(weights, prototxt, prototxt_arg=prototxt_arg)
    num_classes = layers["fc8"][0].shape[1]
    config = dataclasses.replace(CAFFE, model=dataclasses.replace(CAFFE.model, num_classes=num_classes))
    model = AlexNet(config.model)
    model.load_state_dict(caffe_state_dict(layers, dropout=config.model.dropout))
    sha1, sha256 = _digests(weights)
    is_npy = _is_npy(weights)
    source = {"weights": str(weights), "format": "npy" if is_npy else "caffemodel", "weights_sha1": sha1,
              "weights_sha256": sha256, "prototxt": None if prototxt is None else str(prototxt),
              # the .npy is a conversion: its bytes say nothing of which .caffemodel it came from
              "bvlc_alexnet": None if is_npy else sha1 == BVLC_SHA1, "importer": "reproduction.caffe"}
    if source["bvlc_alexnet"] is False:
        warnings.warn(f"{weights}: sha1 {sha1} is not that of BVLC's bvlc_alexnet.caffemodel ({BVLC_SHA1}, "
                      f"{BVLC_URL}); imported as a net with AlexNet's layers, but BVLC's licence and figures "
                      f"do not apply (re-download the file if it should be BVLC's)", UserWarning, stacklevel=3)
    return model.eval(), config, source


def import_caffe(weights: str | Path, out: str | Path, *, mean: str | Path | None = None,
                 prototxt: str | Path | None = None, args: tuple[str, str] = ("mean=", "prototxt=")
                 ) -> tuple[AlexNet, dict]:
    """Write `out` (our checkpoint) and `stats.npz` beside it; return the imported net and its source.
    mean: Caffe's ilsvrc_2012_mean.npy, or None for its per-channel mean (CAFFE_CHANNEL_MEAN_BGR).
    args: how the caller names mean and prototxt in its errors (the CLI: --mean, --prototxt)."""
    out = Path(out)
    rgb_mean = caffe_mean_rgb(mean, arg=args[0])  # before the long read: a missing mean fails at once
    model, config, source = caffe_net(weights, prototxt=prototxt, prototxt_arg=args[1])
    source["mean"] = mean_source(mean)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out, {"model": model.state_dict(), "optimizer": None, "position": None,
                          "config": config_dict(config), "epoch": 0, "source": source})
    np.savez(out.parent / "stats.npz", mean=rgb_mean, rgb_cov=np.zeros((3, 3)), eigval=np.zeros(3),
             eigvec=np.eye(3), count=0, source=mean_source(mean))
    return model, source


def caffe_mean_rgb(path: str | Path | None, *, arg: str = "mean=") -> np.ndarray:
    """Caffe's mean image (BGR, 0–255, 3×256×256) as float32 RGB; for path None, its per-channel
    mean as a 3×256×256 image (DEVIATION(§2), see CAFFE_CHANNEL_MEAN_BGR). arg: how the caller
    names the mean in its errors (the Python API: mean=; the CLI: --mean)."""
    if path is None:
        rgb = np.array(CAFFE_CHANNEL_MEAN_BGR[::-1], dtype=np.float32)
        return np.ascontiguousarray(np.broadcast_to(rgb[:, None, None], (3, 256, 256)))
    advice = (f"give {arg} Caffe's python/caffe/imagenet/ilsvrc_2012_mean.npy, or leave {arg} out "
              f"for Caffe's per-channel mean")
    try:
        mean = np.load(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{arg} {path}: no such file; {advice}") from None
    except (ValueError, OSError) as e:
        raise ValueError(f"{arg} {path}: not a .npy array ({e}); {advice}") from None
    if not isinstance(mean, np.ndarray) or mean.shape != (3, 256, 256):
        raise ValueError(f"{arg} {path}: the mean image must be 3×256×256 (BGR), got "
                         f"{getattr(mean, 'shape', type(mean).__name__)}; {advice}")
    return np.ascontiguousarray(mean[::-1], dtype=np.float32)


def mean_source(path: str | Path | None) -> str:
    """Where an import's mean came from, as its record and stats.npz say it."""
    return CHANNEL_MEAN_SOURCE if path is None else f"{path} (Caffe's mean image, BGR reversed to RGB)"


def _is_npy(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(6) == b"\x93NUMPY"


def _digests(path: Path) -> tuple[str, str]:
    sha1, sha256 = hashlib.sha1(), hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha1.update(block)
            sha256.update(block)
    return sha1.hexdigest(), sha256.hexdigest()


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, argv)


def _main(argv: Sequence[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reproduction.caffe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("weights", type=Path, metavar="WEIGHTS",
                        help=f"bvlc_alexnet.caffemodel (BVLC's file: {BVLC_URL}, sha1 {BVLC_SHA1}) or "
                             "bvlc_alexnet.npy (the TensorFlow ports')")
    parser.add_argument("--out", type=Path, required=True, help="the checkpoint to write (stats.npz goes beside it)")
    parser.add_argument("--prototxt", type=Path,
                        help="deploy.prototxt: check its layers, LRN/pooling settings and input size against "
                             "what the import assumes (.caffemodel only)")
    parser.add_argument("--mean", type=Path, default=None,
                        help="Caffe's mean image, python/caffe/imagenet/ilsvrc_2012_mean.npy (default: its "
                             "per-channel mean, BGR 104.01, 116.67, 122.68; a departure, see README)")
    parser.add_argument("--force", action="store_true",
                        help="replace an existing checkpoint or stats.npz at --out (default: refuse)")
    args = parser.parse_args(argv)
    if args.out.is_dir():
        raise UserError(f"--out {args.out} is a folder; give the checkpoint's file name, e.g. {args.out / 'checkpoint.pt'}")
    # stats.npz beside a prepared set's files is that set's own (its PCA lighting): never replaced silently
    existing = [p for p in (args.out, args.out.parent / "stats.npz") if p.exists()]
    if existing and not args.force:
        raise UserError(f"--out {args.out}: {' and '.join(map(str, existing))} already exist(s); choose another "
                        "folder, or pass --force to replace them")
    print(f"reading {args.weights} ...", flush=True)
    try:
        with warnings.catch_warnings():  # the sha1 is said in the summary line below
            warnings.simplefilter("ignore", UserWarning)
            model, source = import_caffe(args.weights, args.out, mean=args.mean, prototxt=args.prototxt,
                                         args=("--mean", "--prototxt"))
    except (FileNotFoundError, ValueError) as e:
        raise UserError(f"{e}") from None
    known = {True: f"BVLC's bvlc_alexnet.caffemodel (sha1 {BVLC_SHA1})", None: "a .npy conversion",
             False: f"not BVLC's own file: sha1 {source['weights_sha1']}, BVLC's is {BVLC_SHA1}; BVLC's "
                    f"licence and figures do not apply"}[source["bvlc_alexnet"]]
    checked = f", layers checked against {args.prototxt}" if args.prototxt else ""
    print(f"{args.weights} ({known}{checked}) -> {args.out} ({model.config.num_classes} classes, 227×227 RGB "
          f"input, LRN k=1, fc7/fc8 weights ×2 for §4.2 dropout) and {args.out.parent / 'stats.npz'} "
          f"(mean: {source['mean']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
