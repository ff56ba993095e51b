"""A .caffemodel writer for the tests, independent of reproduction/caffe_proto.py: the protobuf wire
format by hand (varint keys, varints, length-delimited fields, packed floats, fixed32 floats) and
caffe.proto's field numbers, for the current (`layer`, 100) and the V1 (`layers`, 2) formats.

Blobs are given in Caffe's own layout (conv out×in/group×H×W with BGR input maps, fc out×in with
fc6's columns in Caffe's NCHW flatten), `caffe_blobs` makes random ones of bvlc_alexnet's shapes,
and `ports_layout` is caffe-tensorflow's conversion to the .npy the TensorFlow ports load.
"""

from __future__ import annotations

import struct

import numpy as np

SHAPES = {"conv1": (96, 3, 11, 11), "conv2": (256, 48, 5, 5), "conv3": (384, 256, 3, 3),
          "conv4": (384, 192, 3, 3), "conv5": (256, 192, 3, 3),
          "fc6": (4096, 9216), "fc7": (4096, 4096), "fc8": (1000, 4096)}
CONV = {"conv1": dict(k=11, s=4, p=0, g=1), "conv2": dict(k=5, s=1, p=2, g=2), "conv3": dict(k=3, s=1, p=1, g=1),
        "conv4": dict(k=3, s=1, p=1, g=2), "conv5": dict(k=3, s=1, p=1, g=2)}
V1_TYPES = {"Data": 5, "Convolution": 4, "ReLU": 18, "LRN": 15, "Pooling": 17, "InnerProduct": 14,
            "Dropout": 6, "SoftmaxWithLoss": 21, "Accuracy": 1}


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def key(number: int, wire: int) -> bytes:
    return varint(number << 3 | wire)


def vint(number: int, value: int) -> bytes:      # wire type 0
    return key(number, 0) + varint(value)


def f32(number: int, value: float) -> bytes:     # wire type 5
    return key(number, 5) + struct.pack("<f", value)


def ld(number: int, payload: bytes) -> bytes:    # wire type 2
    return key(number, 2) + varint(len(payload)) + payload


def text(number: int, s: str) -> bytes:
    return ld(number, s.encode())


def packed_floats(number: int, values: np.ndarray) -> bytes:
    return ld(number, np.ascontiguousarray(values, dtype="<f4").tobytes())


def blob(values: np.ndarray, legacy: bool) -> bytes:
    """BlobProto: the V1-era 4-D num/channels/height/width (1-padded on the left), or shape{dim}."""
    if legacy:
        dims = (1,) * (4 - values.ndim) + values.shape
        head = b"".join(vint(n, d) for n, d in zip((1, 2, 3, 4), dims))
    else:
        head = ld(7, ld(1, b"".join(varint(d) for d in values.shape)))  # BlobShape, packed int64 dims
    return head + packed_floats(5, values.ravel())


def alexnet_layers(blobs: dict, *, caffenet_order: bool = False, lrn_alpha: float = 1e-4,
                   conv2_group: int = 2) -> list[tuple[str, str, dict]]:
    """(name, type, settings) of bvlc_alexnet's train net: a data layer, conv1..fc8, loss and accuracy.
    caffenet_order swaps pool and norm as bvlc_reference_caffenet does."""
    lrn = {"local_size": 5, "alpha": lrn_alpha, "beta": 0.75}
    pool = {"kernel": 3, "stride": 2}
    layers = [("data", "Data", {})]
    for i in range(1, 6):
        c = dict(CONV[f"conv{i}"], n=SHAPES[f"conv{i}"][0])
        if i == 2:
            c["g"] = conv2_group
        layers += [(f"conv{i}", "Convolution", {"conv": c, "blobs": blobs[f"conv{i}"]}), (f"relu{i}", "ReLU", {})]
        if i in (1, 2):
            norm_pool = [(f"norm{i}", "LRN", {"lrn": lrn}), (f"pool{i}", "Pooling", {"pool": pool})]
            layers += norm_pool[::-1] if caffenet_order else norm_pool
    layers.append(("pool5", "Pooling", {"pool": pool}))
    for i in (6, 7, 8):
        layers.append((f"fc{i}", "InnerProduct", {"fc": SHAPES[f"fc{i}"][0] if i < 8 else len(blobs["fc8"][1]),
                                                  "blobs": blobs[f"fc{i}"]}))
        if i < 8:
            layers += [(f"relu{i}", "ReLU", {}), (f"drop{i}", "Dropout", {"dropout": 0.5})]
    return layers + [("loss", "SoftmaxWithLoss", {}), ("accuracy", "Accuracy", {})]


def layer_message(name: str, kind: str, s: dict, v1: bool) -> bytes:
    """One LayerParameter (v1=False) or V1LayerParameter, with a few fields the reader must skip."""
    n = {"name": 4, "type": 5, "blobs": 6, "conv": 10, "dropout": 12, "fc": 17, "lrn": 18, "pool": 19} if v1 else \
        {"name": 1, "type": 2, "blobs": 7, "conv": 106, "dropout": 108, "fc": 117, "lrn": 118, "pool": 121}
    out = text(n["name"], name) + (vint(n["type"], V1_TYPES[kind]) if v1 else text(n["type"], kind))
    if kind == "Data":  # transform_param {crop_size: 227 mirror: true}: not declared by the reader
        out += ld(36 if v1 else 100, vint(3, 227) + vint(2, 1))
    if "conv" in s:
        c = s["conv"]
        out += ld(n["conv"], vint(1, c["n"]) + vint(3, c["p"]) + vint(4, c["k"]) + vint(6, c["s"]) + vint(5, c["g"])
                  + ld(7, text(1, "gaussian") + f32(6, 0.01)))  # weight_filler: skipped
    if "lrn" in s:
        lrn = s["lrn"]
        out += ld(n["lrn"], vint(1, lrn["local_size"]) + f32(2, lrn["alpha"]) + f32(3, lrn["beta"]))
    if "pool" in s:
        out += ld(n["pool"], vint(1, 0) + vint(2, s["pool"]["kernel"]) + vint(3, s["pool"]["stride"]))
    if "fc" in s:
        out += ld(n["fc"], vint(1, s["fc"]))
    if "dropout" in s:
        out += ld(n["dropout"], f32(1, s["dropout"]))
    if "blobs" in s:
        out += b"".join(ld(n["blobs"], blob(b, legacy=v1)) for b in s["blobs"])
        # lr multipliers: V1 blobs_lr (7, floats); current param { lr_mult } (6): both skipped
        out += (f32(7, 1.0) + f32(7, 2.0)) if v1 else (ld(6, f32(3, 1.0)) + ld(6, f32(3, 2.0)))
    return out


def net_message(layers: list[tuple[str, str, dict]], *, v1: bool) -> bytes:
    return text(1, "AlexNet") + b"".join(ld(2 if v1 else 100, layer_message(*layer, v1=v1)) for layer in layers)


def write_caffemodel(path, blobs: dict, *, v1: bool, **variant) -> None:
    with open(path, "wb") as f:
        f.write(net_message(alexnet_layers(blobs, **variant), v1=v1))


def caffe_blobs(seed: int = 0, num_classes: int = 1000) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Random weights of bvlc_alexnet's shapes (std √(2/fan-in): activations keep their size and
    the LRN matters), nonzero biases."""
    rng = np.random.default_rng(seed)
    blobs = {}
    for name, shape in SHAPES.items():
        shape = (num_classes, shape[1]) if name == "fc8" else shape
        w = rng.standard_normal(shape, dtype=np.float32) * np.float32(np.sqrt(2.0 / np.prod(shape[1:])))
        blobs[name] = (w, rng.uniform(-1, 1, shape[0]).astype(np.float32))
    return blobs


def ports_layout(blobs: dict) -> dict[str, list[np.ndarray]]:
    """caffe-tensorflow's .npy: conv HWIO, fc in×out, fc6's rows permuted to pool5's NHWC flatten."""
    out = {}
    for name, (w, b) in blobs.items():
        if name.startswith("conv"):
            w = w.transpose(2, 3, 1, 0)
        elif name == "fc6":
            w = w.reshape(4096, 256, 6, 6).transpose(2, 3, 1, 0).reshape(9216, 4096)
        else:
            w = w.T
        out[name] = [np.ascontiguousarray(w), b]
    return out
