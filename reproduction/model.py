"""AlexNet as Krizhevsky, Sutskever & Hinton, "ImageNet Classification with Deep Convolutional
Neural Networks" (NIPS 2012), describe it in §3 and draw it in Fig. 2.

Five convolutional and three fully-connected layers, their kernels split into two towers as
the net was split across two GTX 580 GPUs (§3.2): tower A holds the first half of every layer's
kernel maps and tower B the second. "The GPUs communicate only in certain layers": conv3,
fc6, fc7 and fc8 see the maps of both towers; conv2, conv4 and conv5 see only their own.

Placement is a parameter, not a second model. Each tower's weights live on one device
(`AlexNet(devices=("cuda:0", "cuda:1"))`, or one device for both) and activations move only
where the towers communicate. Whatever the placement, the state_dict is the same: every layer's
full tensors in the layout of a grouped net (`nn.Conv2d(groups=2)`, as in Caffe), e.g.
conv2.weight 256×48×5×5, so a checkpoint saved under one placement loads under any other.

    python -m reproduction.model [--set key=value ...]   # per-layer shapes, parameters, MACs
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reproduction.ops import lrn as lrn_op
from reproduction.config import PAPER, AlexNetConfig, override, weight_layers

TOWER_NAMES = "ab"  # tower A (the first GPU) and tower B (the second)
BIAS_ONE_LAYERS = ("conv2", "conv4", "conv5", "conv6", "fc6", "fc7")  # §5; conv6 as its siblings conv4, conv5


class Towers(nn.Module):
    """The kernels of one layer, divided between the towers (§3.2).

    Tower t owns output units [t·C/T, (t+1)·C/T) as parameters `weight_a`, `bias_a` (tower B:
    `_b`), so each tower's part can sit on its own device. `cross=False`: tower t sees only its
    own tower's input maps (conv2, conv4, conv5). `cross=True`: each tower sees every input map,
    moved to its device (conv1 reading the image, conv3, fc6, fc7, fc8).

    `state_dict()` holds the canonical full tensors `weight` and `bias` (the towers' parts
    concatenated along the output dimension), never the per-tower parts.
    """

    def __init__(self, weight_shape: tuple[int, ...], towers: int, cross: bool) -> None:
        super().__init__()
        out, *rest = weight_shape
        if out % towers:
            raise ValueError(f"{out} output maps do not divide between {towers} towers")
        self.towers, self.cross = towers, cross
        for t in TOWER_NAMES[:towers]:
            self.register_parameter(f"weight_{t}", nn.Parameter(torch.empty(out // towers, *rest)))
            self.register_parameter(f"bias_{t}", nn.Parameter(torch.empty(out // towers)))

    def parts(self, name: str) -> list[Tensor]:
        """The towers' parameters called `name` ("weight" or "bias"), tower A first."""
        return [getattr(self, f"{name}_{t}") for t in TOWER_NAMES[: self.towers]]

    @property
    def devices(self) -> list[torch.device]:
        return [w.device for w in self.parts("weight")]

    def inputs(self, h: list[Tensor]) -> list[Tensor]:
        """What each tower's kernels read: its own maps, or all maps moved to its device."""
        if not self.cross:
            if len(h) != self.towers:
                raise ValueError(f"{len(h)} towers of input for a layer of {self.towers} towers")
            return h
        return [_concat([x.to(d) for x in h]) for d in self.devices]

    def forward(self, h: list[Tensor]) -> list[Tensor]:
        return [self.apply_tower(x, w, b)
                for x, w, b in zip(self.inputs(h), self.parts("weight"), self.parts("bias"))]

    def apply_tower(self, x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        raise NotImplementedError

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for name in ("weight", "bias"):
            parts = self.parts(name)
            full = _concat([p.to(parts[0].device) for p in parts], dim=0)
            destination[prefix + name] = full if keep_vars else full.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict,
                              missing_keys, unexpected_keys, error_msgs):
        for name in ("weight", "bias"):
            key, parts = prefix + name, self.parts(name)
            if key not in state_dict:
                missing_keys.append(key)
                continue
            value = state_dict[key]
            shape = (sum(p.shape[0] for p in parts), *parts[0].shape[1:])
            if tuple(value.shape) != shape:
                error_msgs.append(f"size mismatch for {key}: copying a param with shape "
                                  f"{tuple(value.shape)} from checkpoint, the shape in current "
                                  f"model is {torch.Size(shape)}.")
                continue
            with torch.no_grad():
                for p, v in zip(parts, value.split(parts[0].shape[0])):
                    p.copy_(v)
        if strict:
            unexpected_keys.extend(k for k in state_dict if k.startswith(prefix)
                                   and k[len(prefix):] not in ("weight", "bias"))


class TowerConv2d(Towers):
    """`out_channels` kernels of size k×k×`in_channels`, in the paper's words (§3.5)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, stride: int = 1,
                 padding: int = 0, towers: int, cross: bool = False) -> None:
        super().__init__((out_channels, in_channels, kernel_size, kernel_size), towers, cross)
        self.stride, self.padding = stride, padding

    def apply_tower(self, x, weight, bias):
        return F.conv2d(x, weight, bias, stride=self.stride, padding=self.padding)

    def extra_repr(self):
        w = self.weight_a
        return (f"{w.shape[1]}→{w.shape[0] * self.towers}, kernel {w.shape[2]}, stride {self.stride}, "
                f"padding {self.padding}, towers {self.towers}, cross {self.cross}")


class TowerLinear(Towers):
    """A fully-connected layer: every unit sees all units of the previous layer (§3.2)."""

    def __init__(self, in_features: int, out_features: int, *, towers: int) -> None:
        super().__init__((out_features, in_features), towers, cross=True)

    def apply_tower(self, x, weight, bias):
        return F.linear(x, weight, bias)

    def extra_repr(self):
        w = self.weight_a
        return f"{w.shape[1]}→{w.shape[0] * self.towers}, towers {self.towers}"


class LocalResponseNorm(nn.Module):
    """§3.3: b_i = a_i / (k + c·Σ_j a_j²)^β, the sum over the n maps centred on map i and
    clipped at the edges of the tower's maps (applied to one tower at a time, so a window
    never crosses into the other tower).

    form="code": c = α/n, as in Krizhevsky's cuda-convnet2 (`scale /= size`) and
    torch's `nn.LocalResponseNorm`; form="paper": c = α, the §3.3 formula read literally.

    fused=True (a performance switch, not in the paper): the same formula as one registered
    operator (`reproduction.ops.lrn`): one pass each way, a C kernel on the CPU and Triton kernels
    on CUDA; F.local_response_norm stays the plain path and the tests' oracle.
    """

    fused: bool = False

    def __init__(self, size: int, alpha: float, beta: float, k: float, form: str) -> None:
        super().__init__()
        if form not in ("code", "paper"):
            raise ValueError(f"LRN form must be 'code' or 'paper', got {form!r}")
        self.size, self.alpha, self.beta, self.k, self.form = size, alpha, beta, k, form

    def forward(self, x: Tensor) -> Tensor:
        # F.local_response_norm divides its alpha by size; undo that for the literal form.
        alpha = self.alpha * self.size if self.form == "paper" else self.alpha
        if self.fused:  # fp32 arithmetic inside for bf16/fp16 inputs, on every device
            return lrn_op.local_response_norm(x, self.size, alpha, self.beta, self.k)
        if x.dtype in (torch.float16, torch.bfloat16):  # under autocast: Σa² and the power in fp32 (a² overflows fp16)
            return F.local_response_norm(x.float(), self.size, alpha=alpha, beta=self.beta, k=self.k).to(x.dtype)
        return F.local_response_norm(x, self.size, alpha=alpha, beta=self.beta, k=self.k)

    def extra_repr(self):
        return (f"n={self.size}, alpha={self.alpha}, beta={self.beta}, k={self.k}, form={self.form!r}"
                + (", fused" if self.fused else ""))


class Dropout(nn.Module):
    """§4.2 as written: while training, zero each output with probability p; at test time use
    all outputs "but multiply their outputs by 0.5" (1 − p). torch's nn.Dropout scales by
    1/(1 − p) while training instead, which doubles what fc7 and fc8 learn from."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0:
            return x
        if self.training:
            return x * torch.empty_like(x).bernoulli_(1 - self.p)
        return x * (1 - self.p)

    def extra_repr(self):
        return f"p={self.p}"


class AlexNet(nn.Module):
    """The paper's net (default) or any `AlexNetConfig` ablation of it.

    devices: None (both towers on the CPU, movable with `.to`), one device, or one device per
    tower, e.g. ("cuda:0", "cuda:1"); fc8 sits with tower A. See `place`.
    """

    def __init__(self, config: AlexNetConfig | None = None,
                 devices: str | torch.device | Sequence[str | torch.device] | None = None) -> None:
        super().__init__()
        c = self.config = PAPER if config is None else config
        if not isinstance(c, AlexNetConfig):
            raise TypeError(f"config must be an AlexNetConfig, got {type(c).__name__}")
        t = c.towers  # the one-tower net halves conv1-conv4 only (§3.2, footnote)
        self.layer_names = weight_layers(c)
        has = set(self.layer_names)
        self.conv1 = TowerConv2d(c.in_channels, 48 * t, 11, stride=4, towers=t, cross=True)  # 96×55×55: 96 kernels 11×11×3, stride 4
        self.lrn1 = _lrn(c)                                                      # 96×55×55, §3.3
        self.pool1 = nn.MaxPool2d(c.pool_kernel, stride=2)                       # 96×27×27, §3.4
        self.conv2 = TowerConv2d(48, 128 * t, 5, padding=2, towers=t) if "conv2" in has else None  # 256×27×27: 256 kernels 5×5×48
        self.lrn2 = _lrn(c) if "conv2" in has else None                          # 256×27×27
        self.pool2 = nn.MaxPool2d(c.pool_kernel, stride=2)                       # 256×13×13
        # §7's depth ablation: a removed middle layer's successor reads what the removed layer
        # read. DEVIATION(§7): the paper names no sizes. Without conv2, pool2 still follows pool1
        # (so conv3 reads 96 maps at 13×13 and fc6 keeps its 9216 inputs); without conv3, conv4
        # reads pool2's 256 maps and takes over conv3's crossing of the towers (§3.2's
        # communication kept); without conv4, conv5 reads conv3's 192 maps per tower as before.
        c3_in = (128 if "conv2" in has else 48) * t
        self.conv3 = TowerConv2d(c3_in, 192 * t, 3, padding=1, towers=t, cross=True) if "conv3" in has else None  # 384×13×13: 384 kernels 3×3×256
        self.conv4 = (TowerConv2d(192, 192 * t, 3, padding=1, towers=t) if "conv3" in has      # 384×13×13: 384 kernels 3×3×192
                      else TowerConv2d(128 * t, 192 * t, 3, padding=1, towers=t, cross=True)) if "conv4" in has else None
        self.conv5 = TowerConv2d(192, 256, 3, padding=1, towers=t)               # 256×13×13: 256 kernels 3×3×192
        self.pool5 = nn.MaxPool2d(c.pool_kernel, stride=2)                       # 256×6×6
        # DEVIATION(§6): Table 2's 1 CNN* adds "an extra sixth convolutional layer over the last
        # pooling layer" without its sizes. Chosen: 256 kernels 3×3, padding 1, each tower from its
        # own maps (as conv4, conv5), bias 1 (as conv4, conv5), no pooling after it: 256×6×6
        # in and out, so fc6 is unchanged.
        self.conv6 = TowerConv2d(256 // t, 256, 3, padding=1, towers=t) if c.conv6 else None  # 256×6×6: 256 kernels 3×3×128
        self.fc6 = TowerLinear(256 * 6 * 6, 4096, towers=t)                      # 4096
        self.drop6 = Dropout(c.dropout)                                          # §4.2
        self.fc7 = TowerLinear(4096, 4096, towers=t)                             # 4096
        self.drop7 = Dropout(c.dropout)
        self.fc8 = TowerLinear(4096, c.num_classes, towers=1)                    # 1000, softmax in the loss
        self.act = nn.ReLU() if c.activation == "relu" else nn.Tanh()            # §3.1, after every layer but fc8
        paper_init(self)
        self.place(devices)

    def forward(self, x: Tensor) -> Tensor:
        _check_input(x, self.config)
        # DEVIATION(§3.5): the paper feeds 224×224 patches yet gets 55×55 maps from an 11×11
        # stride-4 conv1, which floor arithmetic does not give (54). Krizhevsky's code lets the
        # last window overhang the image by 3 pixels; zero-padding bottom and right is the same.
        # (A 227×227 input, Caffe's crop, needs no overhang.)
        overhang = 227 - self.config.input_size
        x = F.pad(x, (0, overhang, 0, overhang))        # 3×227×227
        h = self.conv1([x])                             # 96×55×55, as 2 towers × 48
        h = self.normalise(each(h, self.act), self.lrn1)  # 96×55×55: ReLU, then LRN (§3.3)
        h = each(h, self.pool1)                         # 96×27×27
        if self.conv2 is not None:                      # (§7's depth ablation may leave out conv2, conv3 or conv4)
            h = self.conv2(h)                           # 256×27×27, each tower from its own 48 maps
            h = self.normalise(each(h, self.act), self.lrn2)  # 256×27×27
        h = each(h, self.pool2)                         # 256×13×13
        if self.conv3 is not None:
            h = each(self.conv3(h), self.act)           # 384×13×13, from all 256 maps of both towers
        if self.conv4 is not None:
            h = each(self.conv4(h), self.act)           # 384×13×13, each tower from its own 192
        h = each(self.conv5(h), self.act, self.pool5)   # 256×6×6, each tower from its own 192
        if self.conv6 is not None:
            h = each(self.conv6(h), self.act)           # 256×6×6, Table 2's sixth conv layer over pool5
        h = [torch.flatten(x, 1) for x in h]            # 9216 = 256·6·6
        h = each(self.fc6(h), self.act, self.drop6)     # 4096, from both towers
        h = each(self.fc7(h), self.act, self.drop7)     # 4096
        (logits,) = self.fc8(h)                         # 1000, on tower A's device
        return logits

    FEATURES = ("pool1", "pool2", "pool5", "fc6", "fc7", "fc8")

    @torch.no_grad()
    def features(self, x: Tensor, layer: str = "fc7") -> Tensor:
        """A layer's activations for a batch of patches x (N×3×224×224, mean-subtracted as
        `transforms()` makes them), as the net computes them in eval mode: pool1/pool2/pool5 its
        maps (pool5: N×256×6×6), fc6/fc7 after their ReLU (N×4096; §6.1's and Fig. 4's fc7
        vector), fc8 the logits. Tower A's maps or units come first."""
        if layer not in self.FEATURES:
            raise ValueError(f"features: layer {layer!r}; give one of {', '.join(self.FEATURES)}")
        module = getattr(self, layer)
        captured: list = []
        handle = module.register_forward_hook(lambda m, inputs, output: captured.append(output))
        was_training = self.training
        self.eval()
        try:
            self(x)
        finally:
            handle.remove()
            self.train(was_training)
        parts = captured if isinstance(module, nn.MaxPool2d) else captured[0]  # a pool runs once per tower
        out = torch.cat([p.to(parts[0].device) for p in parts], dim=1)
        return self.act(out) if layer in ("fc6", "fc7") else out

    def normalise(self, h: list[Tensor], lrn: nn.Module) -> list[Tensor]:
        """§3.3's LRN. On the paper's two GPUs each tower normalises its own maps, so a window
        stops at the tower's edge; lrn_scope="all" runs the windows across both towers' maps,
        as Caffe's grouped net does (the towers then meet here too)."""
        if self.config.lrn_scope == "tower" or len(h) == 1:
            return each(h, lrn)
        home = h[0].device
        y = lrn(torch.cat([x.to(home) for x in h], dim=1))
        return [part.to(x.device) for part, x in zip(y.split([x.shape[1] for x in h], dim=1), h)]

    def place(self, devices: str | torch.device | Sequence[str | torch.device] | None) -> AlexNet:
        """Put tower t's part of every layer on devices[t] (fc8 with tower A), or everything on
        one device. Returns self. `.to(device)` also works; it moves both towers to one device."""
        if devices is None:
            devices = ["cpu"]
        elif isinstance(devices, (str, torch.device)):
            devices = [devices]
        devices = [torch.device(d) for d in devices]
        if len(devices) not in (1, self.config.towers):
            raise ValueError(f"{len(devices)} devices for a net of {self.config.towers} tower(s): "
                             f"give one device, or one per tower")
        for name in self.layer_names:
            layer = getattr(self, name)
            for t in range(layer.towers):
                d = devices[t % len(devices)]
                for kind in ("weight", "bias"):
                    p = getattr(layer, f"{kind}_{TOWER_NAMES[t]}")
                    p.data = p.data.to(d)
        return self

    def set_fused_lrn(self, on: bool) -> AlexNet:
        """Performance switch (TrainConfig.fused_lrn): lrn1/lrn2 as the one-pass LRN operator
        (`reproduction.ops.lrn`: C on the CPU, Triton on CUDA), the same §3.3 formula."""
        for lrn in (self.lrn1, self.lrn2):
            if isinstance(lrn, LocalResponseNorm):
                lrn.fused = on
        return self

    @property
    def devices(self) -> tuple[torch.device, ...]:
        """The device of each tower, tower A first."""
        return tuple(self.conv1.devices)


def each(h: list[Tensor], *layers: nn.Module) -> list[Tensor]:
    """Apply layers that act within a tower's maps (activation, LRN, pooling, dropout) to every tower."""
    out = []
    for x in h:
        for layer in layers:
            x = layer(x)
        out.append(x)
    return out


def paper_init(model: AlexNet) -> None:
    """§5: "We initialized the weights in each layer from a zero-mean Gaussian distribution with
    standard deviation 0.01. We initialized the neuron biases in the second, fourth, and fifth
    convolutional layers, as well as in the fully-connected hidden layers, with the constant 1
    [...] We initialized the neuron biases in the remaining layers with the constant 0."

    The std and the constant are `config.init_std` and `config.init_bias`. Draws tower A's
    weights before tower B's, layer by layer, from torch's default generator.
    """
    c = model.config
    with torch.no_grad():
        for name in model.layer_names:
            layer = getattr(model, name)
            for weight, bias in zip(layer.parts("weight"), layer.parts("bias")):
                weight.normal_(0.0, c.init_std)
                bias.fill_(c.init_bias if name in BIAS_ONE_LAYERS else 0.0)


def default_devices(towers: int = 2) -> tuple[str, ...]:
    """Where the towers go unless told otherwise: two CUDA devices when two are visible (the
    paper's two GPUs), else the one CUDA device, else the CPU."""
    n = torch.cuda.device_count()
    if n >= 2 and towers == 2:
        return ("cuda:0", "cuda:1")
    return ("cuda:0",) if n >= 1 else ("cpu",)


def _lrn(c: AlexNetConfig) -> nn.Module:
    if c.lrn == "none":
        return nn.Identity()
    return LocalResponseNorm(c.lrn_size, c.lrn_alpha, c.lrn_beta, c.lrn_k, form=c.lrn)


def _concat(xs: list[Tensor], dim: int = 1) -> Tensor:
    return xs[0] if len(xs) == 1 else torch.cat(xs, dim=dim)


def _check_input(x: Tensor, c: AlexNetConfig) -> None:
    if isinstance(x, torch.fx.Proxy):
        raise TypeError("AlexNet's towers cannot be traced by torch.fx (torchvision's create_feature_extractor): "
                        "use model.features(x, \"fc7\") for a layer's activations (pool1, pool2, pool5, fc6, fc7, fc8)")
    if not isinstance(x, Tensor):
        raise TypeError(f"AlexNet takes a tensor, got {type(x).__name__}")
    if x.dim() != 4 or x.shape[1] != c.in_channels or tuple(x.shape[2:]) != (c.input_size,) * 2:
        raise ValueError(f"AlexNet takes a batch N×{c.in_channels}×{c.input_size}×{c.input_size} "
                         f"(§3.5, §4.1: {c.input_size}×{c.input_size} patches, in_channels="
                         f"{c.in_channels}); got a tensor of shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"AlexNet takes floating-point pixels (mean-subtracted, §2); got {x.dtype}")


# --- python -m reproduction.model: what each layer of a config computes --------------------

def layer_table(model: AlexNet) -> list[dict]:
    """One row per layer for a single image: output shape, parameters, multiply-accumulates.

    MACs count the conv and fc multiply-accumulates only (no bias, activation, LRN or pooling).
    """
    rows: dict[str, dict] = {}

    def record(name):
        def hook(module, inputs, output):
            outs = output if isinstance(output, list) else [output]
            row = rows.setdefault(name, {"layer": name, "towers": [], "params": 0, "macs": 0})
            row["towers"] += [tuple(o.shape[1:]) for o in outs]
            if isinstance(module, Towers):
                row["params"] = sum(p.numel() for p in module.parameters())
                row["macs"] = sum(o[0].numel() * w[0].numel() for o, w in zip(outs, module.parts("weight")))
        return hook

    names = [n for n in ("conv1", "lrn1", "pool1", "conv2", "lrn2", "pool2", "conv3", "conv4", "conv5",
                         "pool5", "conv6", "fc6", "fc7", "fc8") if getattr(model, n) is not None]
    handles = [getattr(model, n).register_forward_hook(record(n)) for n in names]
    try:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            c = model.config
            model(torch.zeros(1, c.in_channels, c.input_size, c.input_size, device=model.devices[0]))
        model.train(was_training)
    finally:
        for h in handles:
            h.remove()
    c = model.config
    table = [{"layer": "input", "shape": (c.in_channels, c.input_size, c.input_size), "split": "",
              "params": 0, "macs": 0}]
    if c.input_size == 224:
        table.append({"layer": "pad", "shape": (c.in_channels, 227, 227), "split": "", "params": 0,
                      "macs": 0, "note": "3 px overhang, bottom/right: DEVIATION(§3.5)"})
    for n in names:
        row = rows[n]
        shapes = row.pop("towers")
        channels = sum(s[0] for s in shapes)
        split = " + ".join(str(s[0]) for s in shapes) if len(shapes) > 1 else ""
        table.append({**row, "shape": (channels, *shapes[0][1:]), "split": split})
    return table


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m reproduction.model",
        description="Print the network layer by layer for one image: output shape, "
                    "how the maps divide between the towers, parameters and multiply-accumulates. "
                    "With no options: the paper's net (60,965,224 parameters, 724,406,816 MACs).",
        epilog="Config keys (paper value): " + ", ".join(
            f"{k}={v!r}" for k, v in PAPER.__dict__.items()) + ". Example: --set towers=1 lrn=none")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override config fields, e.g. --set lrn=none pool_kernel=2")
    args = parser.parse_args(argv)
    try:
        config = override(PAPER, args.set)
    except ValueError as e:
        parser.error(str(e))
    model = AlexNet(config)
    changed = {k: v for k, v in config.__dict__.items() if getattr(PAPER, k) != v}
    print(f"AlexNet, {'the paper' if not changed else 'paper + ' + str(changed)}")
    table = layer_table(model)
    print(f"{'layer':<7} {'output':>12} {'towers':>11} {'params':>12} {'MACs':>13}")
    for r in table:
        shape = "×".join(map(str, r["shape"]))
        params = f"{r['params']:,}" if r["params"] else ""
        macs = f"{r['macs']:,}" if r["macs"] else ""
        print(f"{r['layer']:<7} {shape:>12} {r['split']:>11} {params:>12} {macs:>13}  {r.get('note', '')}".rstrip())
    params = sum(r["params"] for r in table)
    macs = sum(r["macs"] for r in table)
    assert params == sum(p.numel() for p in model.parameters())
    print(f"{'total':<7} {'':>12} {'':>11} {params:>12,} {macs:>13,}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
