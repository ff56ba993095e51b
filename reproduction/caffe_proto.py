"""Read Caffe's files with the `protobuf` package: a .caffemodel (binary NetParameter) and a
.prototxt (its text form). No Caffe, no protoc and no copy of caffe.proto: the few messages read
here are declared below as descriptors, with caffe.proto's field numbers (BVLC/caffe
src/caffe/proto/caffe.proto). Every other field of a file (solver settings, fillers, lr_mult,
data-layer parameters, ...) is skipped: unknown fields of a binary message are kept aside by the
parser, and the text parser is told to skip them.

Both layer formats are read: the current `layer` (NetParameter field 100, LayerParameter, type a
string) and the legacy `layers` (field 2, V1LayerParameter, type an enum) that bvlc_alexnet's
2014 files use. `read_net` returns one `Layer` per layer in file order, V1 types renamed as Caffe's
own upgrade renames them (CONVOLUTION → "Convolution"), blobs as float32 arrays of their shape
(`shape`, or the legacy num/channels/height/width).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format
from google.protobuf.message import DecodeError

_F = descriptor_pb2.FieldDescriptorProto
_TYPES = {"int32": _F.TYPE_INT32, "int64": _F.TYPE_INT64, "uint32": _F.TYPE_UINT32, "bool": _F.TYPE_BOOL,
          "float": _F.TYPE_FLOAT, "double": _F.TYPE_DOUBLE, "string": _F.TYPE_STRING}

# message → fields as "label type name = number [default]" (caffe.proto's declarations, abridged to
# what this project reads); `*` marks a packed repeated field. Types not in _TYPES are messages
# or enums declared here.
_MESSAGES = {
    "BlobShape": ["repeated int64 dim = 1 *"],
    "BlobProto": ["optional BlobShape shape = 7", "repeated float data = 5 *", "repeated double double_data = 8 *",
                  "optional int32 num = 1", "optional int32 channels = 2", "optional int32 height = 3",
                  "optional int32 width = 4"],
    "ConvolutionParameter": ["optional uint32 num_output = 1", "optional bool bias_term = 2 true",
                             "repeated uint32 pad = 3", "repeated uint32 kernel_size = 4",
                             "repeated uint32 stride = 6", "repeated uint32 dilation = 18",
                             "optional uint32 pad_h = 9", "optional uint32 pad_w = 10",
                             "optional uint32 kernel_h = 11", "optional uint32 kernel_w = 12",
                             "optional uint32 stride_h = 13", "optional uint32 stride_w = 14",
                             "optional uint32 group = 5 1"],
    "PoolingParameter": ["optional PoolMethod pool = 1 MAX", "optional uint32 pad = 4",
                         "optional uint32 pad_h = 9", "optional uint32 pad_w = 10", "optional uint32 kernel_size = 2",
                         "optional uint32 kernel_h = 5", "optional uint32 kernel_w = 6", "optional uint32 stride = 3 1",
                         "optional uint32 stride_h = 7", "optional uint32 stride_w = 8",
                         "optional bool global_pooling = 12"],
    "LRNParameter": ["optional uint32 local_size = 1 5", "optional float alpha = 2 1", "optional float beta = 3 0.75",
                     "optional NormRegion norm_region = 4 ACROSS_CHANNELS", "optional float k = 5 1"],
    "InnerProductParameter": ["optional uint32 num_output = 1", "optional bool bias_term = 2 true",
                              "optional int32 axis = 5 1", "optional bool transpose = 6"],
    "DropoutParameter": ["optional float dropout_ratio = 1 0.5"],
    "InputParameter": ["repeated BlobShape shape = 1"],
    "LayerParameter": ["optional string name = 1", "optional string type = 2", "repeated string bottom = 3",
                       "repeated string top = 4", "repeated BlobProto blobs = 7",
                       "optional ConvolutionParameter convolution_param = 106",
                       "optional DropoutParameter dropout_param = 108",
                       "optional InnerProductParameter inner_product_param = 117",
                       "optional InputParameter input_param = 143", "optional LRNParameter lrn_param = 118",
                       "optional PoolingParameter pooling_param = 121"],
    "V1LayerParameter": ["repeated string bottom = 2", "repeated string top = 3", "optional string name = 4",
                         "optional LayerType type = 5", "repeated BlobProto blobs = 6",
                         "optional ConvolutionParameter convolution_param = 10",
                         "optional DropoutParameter dropout_param = 12",
                         "optional InnerProductParameter inner_product_param = 17",
                         "optional LRNParameter lrn_param = 18", "optional PoolingParameter pooling_param = 19"],
    "NetParameter": ["optional string name = 1", "repeated string input = 3", "repeated BlobShape input_shape = 8",
                     "repeated int32 input_dim = 4", "repeated LayerParameter layer = 100",
                     "repeated V1LayerParameter layers = 2"],
}
# enum → (owning message, values). V1's LayerType is complete so that any V1 file's text parses
# and its layers can be named; the new name is what Caffe's UpgradeV1LayerType gives.
_ENUMS = {
    "PoolMethod": ("PoolingParameter", {"MAX": 0, "AVE": 1, "STOCHASTIC": 2}),
    "NormRegion": ("LRNParameter", {"ACROSS_CHANNELS": 0, "WITHIN_CHANNEL": 1}),
    "LayerType": ("V1LayerParameter", {
        "NONE": 0, "ACCURACY": 1, "BNLL": 2, "CONCAT": 3, "CONVOLUTION": 4, "DATA": 5, "DROPOUT": 6,
        "EUCLIDEAN_LOSS": 7, "FLATTEN": 8, "HDF5_DATA": 9, "HDF5_OUTPUT": 10, "IM2COL": 11, "IMAGE_DATA": 12,
        "INFOGAIN_LOSS": 13, "INNER_PRODUCT": 14, "LRN": 15, "MULTINOMIAL_LOGISTIC_LOSS": 16, "POOLING": 17,
        "RELU": 18, "SIGMOID": 19, "SOFTMAX": 20, "SOFTMAX_LOSS": 21, "SPLIT": 22, "TANH": 23,
        "WINDOW_DATA": 24, "ELTWISE": 25, "POWER": 26, "SIGMOID_CROSS_ENTROPY_LOSS": 27, "HINGE_LOSS": 28,
        "MEMORY_DATA": 29, "ARGMAX": 30, "THRESHOLD": 31, "DUMMY_DATA": 32, "SLICE": 33, "MVN": 34,
        "ABSVAL": 35, "SILENCE": 36, "CONTRASTIVE_LOSS": 37, "EXP": 38, "DECONVOLUTION": 39}),
}
_V1_NAMES = {"ABSVAL": "AbsVal", "ARGMAX": "ArgMax", "BNLL": "BNLL", "HDF5_DATA": "HDF5Data",
             "HDF5_OUTPUT": "HDF5Output", "IM2COL": "Im2col", "LRN": "LRN", "MVN": "MVN", "RELU": "ReLU",
             "SOFTMAX_LOSS": "SoftmaxWithLoss", "TANH": "TanH"}


def _build() -> dict[str, Any]:
    file = descriptor_pb2.FileDescriptorProto(name="reproduction_caffe.proto", package="caffe", syntax="proto2")
    labels = {"optional": _F.LABEL_OPTIONAL, "repeated": _F.LABEL_REPEATED}
    messages = {}
    for name, fields in _MESSAGES.items():
        messages[name] = m = file.message_type.add(name=name)
        for spec in fields:
            label, kind, fname, _, number, *rest = spec.split()
            f = m.field.add(name=fname, number=int(number), label=labels[label])
            if kind in _TYPES:
                f.type = _TYPES[kind]
            else:
                is_enum = kind in _ENUMS
                f.type = _F.TYPE_ENUM if is_enum else _F.TYPE_MESSAGE
                f.type_name = f".caffe.{_ENUMS[kind][0]}.{kind}" if is_enum else f".caffe.{kind}"
            if rest == ["*"]:
                f.options.packed = True
            elif rest:
                f.default_value = rest[0]
    for enum, (owner, values) in _ENUMS.items():
        e = messages[owner].enum_type.add(name=enum)
        for vname, number in values.items():
            e.value.add(name=vname, number=number)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return {name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"caffe.{name}"))
            for name in _MESSAGES}


MESSAGES = _build()
NetParameter = MESSAGES["NetParameter"]


@dataclass
class Layer:
    name: str
    type: str                                  # the current format's type name, e.g. "Convolution"
    blobs: list[np.ndarray] = field(default_factory=list)  # float32, each of its stored shape
    params: dict = field(default_factory=dict)  # the layer's settings that matter here (see _params)
    index: int = 0                              # position in the file's layer list


def parse_caffemodel(path: str | Path):
    """The file as a NetParameter message. Raises FileNotFoundError or ValueError."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"no file at {path}") from None
    try:
        return NetParameter.FromString(data)
    except DecodeError as e:
        raise ValueError(f"{path}: not a Caffe NetParameter in binary protobuf form ({e})") from None


def parse_prototxt(path: str | Path):
    """A .prototxt (protobuf text format) as a NetParameter; fields not declared here are skipped."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise FileNotFoundError(f"no file at {path}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not text (a .prototxt is protobuf text format)") from None
    try:
        return text_format.Parse(text, NetParameter(), allow_unknown_field=True)
    except text_format.ParseError as e:
        raise ValueError(f"{path}: not a Caffe net definition in protobuf text format ({e})") from None


def read_net(net, where: str | Path) -> list[Layer]:
    """The net's layers in file order, whichever of the two formats it uses."""
    if len(net.layer) and len(net.layers):
        raise ValueError(f"{where}: holds layers in both the current and the V1 format; Caffe refuses such a file too")
    if len(net.layers):
        layers = []
        for i, v1 in enumerate(net.layers):
            kind = v1.DESCRIPTOR.fields_by_name["type"].enum_type.values_by_number.get(v1.type)
            if v1.type == 0 or kind is None:
                raise ValueError(f"{where}: layer #{i} {v1.name!r} has no V1 type (a V0-format net, or an unknown "
                                 f"type number {v1.type}); upgrade it with Caffe's upgrade_net_proto_binary")
            type_name = _V1_NAMES.get(kind.name, kind.name.title().replace("_", ""))
            layers.append(Layer(v1.name, type_name, _blobs(v1.blobs, where, v1.name), _params(v1, type_name), i))
        return layers
    return [Layer(l.name, l.type, _blobs(l.blobs, where, l.name), _params(l, l.type), i)
            for i, l in enumerate(net.layer)]


def input_shape(net) -> tuple[int, ...] | None:
    """The deploy net's input blob shape (Input layer, input_shape or the legacy input_dim), if given."""
    for layer in net.layer:
        if layer.type == "Input" and len(layer.input_param.shape):
            return tuple(layer.input_param.shape[0].dim)
    if len(net.input_shape):
        return tuple(net.input_shape[0].dim)
    return tuple(net.input_dim[:4]) if len(net.input_dim) >= 4 else None


def _blobs(blobs, where, layer: str) -> list[np.ndarray]:
    out = []
    for j, b in enumerate(blobs):
        shape = tuple(b.shape.dim) if b.HasField("shape") else (b.num, b.channels, b.height, b.width)
        values = np.array(b.data, dtype=np.float32) if len(b.data) else np.array(b.double_data, dtype=np.float32)
        if values.size != int(np.prod(shape)):
            raise ValueError(f"{where}: layer {layer!r} blob {j} holds {values.size} values for shape {shape}")
        out.append(values.reshape(shape))
    return out


def _pair(single, h, w, default: int) -> tuple[int, int]:
    """Caffe's spatial settings: *_h/*_w if set, else one value for both (or one per axis)."""
    if h or w:
        return int(h), int(w)
    single = list(single) if hasattr(single, "__len__") else ([single] if single else [])
    if not single:
        return default, default
    return (int(single[0]), int(single[-1]))


def _params(layer, kind: str) -> dict:
    """The settings an AlexNet import checks, in one form for both formats; a parameter message
    the file leaves out reads as Caffe's defaults."""
    if kind == "Convolution":
        c = layer.convolution_param
        return {"num_output": c.num_output, "kernel": _pair(c.kernel_size, c.kernel_h, c.kernel_w, 0),
                "stride": _pair(c.stride, c.stride_h, c.stride_w, 1), "pad": _pair(c.pad, c.pad_h, c.pad_w, 0),
                "group": c.group, "dilation": _pair(c.dilation, 0, 0, 1), "bias_term": c.bias_term}
    if kind == "Pooling":
        p = layer.pooling_param
        return {"pool": p.DESCRIPTOR.fields_by_name["pool"].enum_type.values_by_number[p.pool].name,
                "kernel": _pair(p.kernel_size, p.kernel_h, p.kernel_w, 0),
                "stride": _pair(p.stride, p.stride_h, p.stride_w, 1), "pad": _pair(p.pad, p.pad_h, p.pad_w, 0),
                "global_pooling": p.global_pooling}
    if kind == "LRN":
        n = layer.lrn_param
        region = n.DESCRIPTOR.fields_by_name["norm_region"].enum_type.values_by_number[n.norm_region].name
        return {"local_size": n.local_size, "alpha": n.alpha, "beta": n.beta, "k": n.k, "norm_region": region}
    if kind == "InnerProduct":
        f = layer.inner_product_param
        return {"num_output": f.num_output, "bias_term": f.bias_term, "axis": f.axis, "transpose": f.transpose}
    if kind == "Dropout":
        return {"dropout_ratio": layer.dropout_param.dropout_ratio}
    return {}
