"""Every hyperparameter of a run, as frozen dataclasses whose defaults are the paper's values.

`AlexNetConfig` is the network (§3), `DataConfig` the input pipeline (§2, §4.1), `TrainConfig`
the recipe (§5), and `RunConfig` holds one of each. Ablations are `dataclasses.replace` diffs
(reproduction/experiments.py); command-line overrides go through `override`, which rejects
unknown keys and wrongly typed values instead of guessing.
"""

from __future__ import annotations

import ast
import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping


LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8")  # Fig. 2's weight layers
MIDDLE_CONV = ("conv2", "conv3", "conv4")  # §7: "removing any of the middle layers" costs ~2% top-1


@dataclass(frozen=True)
class AlexNetConfig:
    num_classes: int = 1000    # §2: the 1000 ILSVRC classes (the width of fc8)
    in_channels: int = 3       # §3.5: RGB patches; 1 = grey images (the d2l Fashion-MNIST walk-through)
    input_size: int = 224      # §3.5: 224×224 patches (+3 px overhang); 227 = Caffe's crop, no overhang
    activation: str = "relu"   # §3.1: "relu" (the paper's net) | "tanh" (Fig. 1's comparison)
    lrn: str = "code"          # §3.3: "code" = cuda-convnet2's α/n per squared term | "paper" = α as printed | "none"
    lrn_size: int = 5          # §3.3: n, the number of adjacent kernel maps in the window
    lrn_alpha: float = 1e-4    # §3.3: α
    lrn_beta: float = 0.75     # §3.3: β
    lrn_k: float = 2.0         # §3.3: k
    lrn_scope: str = "tower"   # §3.3: windows within one tower's maps (the two GPUs) | "all" = across both (Caffe's grouped net)
    pool_kernel: int = 3       # §3.4: z = 3 with s = 2 (overlapping); 2 = the non-overlapping ablation
    towers: int = 2            # §3.2: two towers (the two GPUs); 1 = the one-GPU net of half the kernels
    dropout: float = 0.5       # §4.2: drop probability on the outputs of fc6 and fc7
    init_std: float = 0.01     # §5: every weight ~ N(0, 0.01)
    init_bias: float = 1.0     # §5: the bias of conv2, conv4, conv5, fc6, fc7 (all others 0)
    conv6: bool = False        # §6, Table 2's "1 CNN*": an extra sixth conv layer over pool5 (sizes: model.py)
    remove_conv: str = "none"  # §7's depth claim: "none" | "conv2" | "conv3" | "conv4", the middle conv layer left out

    def __post_init__(self) -> None:
        _check_types(self)
        _require(self, "num_classes", self.num_classes >= 1, "an integer >= 1")
        _require(self, "in_channels", self.in_channels in (1, 3), "3 (RGB) or 1 (grey)")
        _require(self, "input_size", self.input_size in (224, 227),
                 "224 (the paper's patches) or 227 (Caffe's crop, which needs no overhang)")
        _require(self, "activation", self.activation in ("relu", "tanh"), "'relu' or 'tanh'")
        _require(self, "lrn", self.lrn in ("code", "paper", "none"), "'code', 'paper' or 'none'")
        _require(self, "lrn_size", self.lrn_size >= 1 and self.lrn_size % 2 == 1,
                 "an odd integer >= 1 (the window is centred on the map)")
        _require(self, "lrn_alpha", math.isfinite(self.lrn_alpha) and self.lrn_alpha >= 0, "a number >= 0")
        _require(self, "lrn_beta", math.isfinite(self.lrn_beta) and self.lrn_beta >= 0, "a number >= 0")
        _require(self, "lrn_k", math.isfinite(self.lrn_k) and self.lrn_k > 0, "a number > 0")
        _require(self, "lrn_scope", self.lrn_scope in ("tower", "all"),
                 "'tower' (the paper: each GPU normalises its own maps) or 'all' (Caffe)")
        _require(self, "pool_kernel", self.pool_kernel in (2, 3),
                 "3 (overlapping, the paper) or 2 (the §3.4 ablation); the stride is 2 in both")
        _require(self, "towers", self.towers in (1, 2), "2 (the paper) or 1 (the §3.2 comparison net)")
        _require(self, "dropout", 0 <= self.dropout < 1, "a probability in [0, 1)")
        _require(self, "init_std", math.isfinite(self.init_std) and self.init_std > 0, "a number > 0")
        _require(self, "init_bias", math.isfinite(self.init_bias), "a finite number")
        _require(self, "remove_conv", self.remove_conv in ("none", *MIDDLE_CONV),
                 "'none' or one of the middle conv layers " + ", ".join(MIDDLE_CONV) + " (§7)")



def override(config: Any, items: Mapping[str, Any] | Iterable[str]) -> Any:
    """Return `config` with fields replaced, from a mapping or from "key=value" strings.

    Values given as strings are read with `ast.literal_eval` (so `dropout=0.25`, `towers=1`),
    and kept as plain strings when they are not Python literals (so `activation=tanh` works).
    Unknown keys and wrongly typed values raise ValueError naming what is allowed.
    """
    if not isinstance(items, Mapping):
        pairs = {}
        for item in items:
            key, sep, text = item.partition("=")
            if not sep or not key.strip():
                raise ValueError(f"override {item!r} is not of the form key=value")
            pairs[key.strip()] = _parse_value(text.strip())
        items = pairs
    if any(_is_config(getattr(config, f.name)) for f in dataclasses.fields(config)):
        return _override_parts(config, items)
    names = [f.name for f in dataclasses.fields(config)]
    unknown = sorted(set(items) - set(names))
    if unknown:
        raise ValueError(f"unknown {type(config).__name__} key(s) {', '.join(unknown)}; "
                         f"allowed keys: {', '.join(names)}")
    return dataclasses.replace(config, **items)


def _override_parts(config: Any, items: Mapping[str, Any]) -> Any:
    """Route each key of a flat or dotted ("model.lrn") override to the part that owns it."""
    parts = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    owner = {k.name: name for name, part in parts.items() for k in dataclasses.fields(part)}
    routed: dict[str, dict] = {name: {} for name in parts}
    for key, value in items.items():
        part, dot, field = key.rpartition(".")
        if dot and part in parts:
            routed[part][field] = value
        elif not dot and key in parts and isinstance(value, Mapping):
            routed[key].update(value)  # a whole part, e.g. from config.json
        elif not dot and key in owner:
            routed[owner[key]][key] = value
        else:
            raise ValueError(f"unknown {type(config).__name__} key {key!r}; allowed keys: "
                             + "; ".join(f"{name}: {', '.join(f.name for f in dataclasses.fields(p))}"
                                         for name, p in parts.items()))
    return dataclasses.replace(config, **{name: override(parts[name], routed[name])
                                          for name in parts if routed[name]})


def _is_config(value: Any) -> bool:
    return dataclasses.is_dataclass(value) and not isinstance(value, type)


def from_dict(cls: type, values: Mapping[str, Any]) -> Any:
    """Rebuild a config from `dataclasses.asdict` output (e.g. a run's config.json), strictly."""
    return override(cls(), values)


def _parse_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _check_types(config: Any) -> None:
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.type in ("tuple[int, ...]", "tuple[str, ...]"):
            if isinstance(value, list):  # JSON has no tuples
                value = tuple(value)
                object.__setattr__(config, f.name, value)
            item = int if f.type == "tuple[int, ...]" else str
            if item is str and isinstance(value, str):  # --set freeze=conv1,conv2 or (conv1,conv2)
                value = tuple(v.strip() for v in value.strip("()").split(",") if v.strip())
                object.__setattr__(config, f.name, value)
            ok = isinstance(value, tuple) and all(
                isinstance(v, item) and not isinstance(v, bool) for v in value)
        else:
            expected = {"int": int, "float": float, "str": str, "bool": bool}[f.type]
            ok = isinstance(value, expected) and not (expected is int and isinstance(value, bool))
            if expected is float and isinstance(value, int) and not isinstance(value, bool):
                object.__setattr__(config, f.name, float(value))  # 2 for a float field means 2.0
                ok = True
        if not ok:
            raise ValueError(f"{type(config).__name__}.{f.name} must be of type {f.type}, "
                             f"got {value!r} ({type(value).__name__})")


def _require(config: Any, name: str, ok: bool, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{type(config).__name__}.{name} = {getattr(config, name)!r} is not allowed; "
                         f"it must be {allowed}")


PAPER = AlexNetConfig()  # the paper's net; ablations are dataclasses.replace(PAPER, ...)


def weight_layers(config: AlexNetConfig) -> tuple[str, ...]:
    """The weight layers a config's net has, input to output: Fig. 2's eight, less the removed
    middle conv layer (§7), plus conv6 after conv5 (Table 2's 1 CNN*)."""
    convs = [n for n in LAYERS[:5] if n != config.remove_conv] + (["conv6"] if config.conv6 else [])
    return (*convs, *LAYERS[5:])


@dataclass(frozen=True)
class DataConfig:
    """How images become the net's input (§2, §4.1); read by reproduction/data.py.

    Where the text is ambiguous, the default is Krizhevsky's code (cuda-convnet2 convdata.py) and
    the literal reading is an option: mean="offset", lighting="paper", lighting_rescale=False.
    """
    crop: int = 224            # §4.1: side of the training patch and of the test patches, cut from 256×256
    flip: bool = True          # §4.1: reflect training patches horizontally with probability 0.5
    mean: str = "centre"       # §2: "centre" = the mean image's centre patch whatever the offset (cuda-convnet2) | "offset" = the mean at the patch's offset
    lighting: str = "code"     # §4.1: "code" = noise scaled by √λ on 0–255 (cuda-convnet2) | "paper" = λ of [0,1] pixels | "none"
    lighting_std: float = 0.1  # §4.1: α_i ~ N(0, 0.1), drawn per image each time it is used
    lighting_rescale: bool = True  # cuda-convnet2: a lit training image is then ×1/(1 + lighting_std); False = the text (no rescaling)

    def __post_init__(self) -> None:
        _check_types(self)
        _require(self, "crop", 1 <= self.crop <= 256,
                 "an integer in [1, 256] (patches are cut from the 256×256 image, §2)")
        _require(self, "mean", self.mean in ("centre", "offset"), "'centre' or 'offset'")
        _require(self, "lighting", self.lighting in ("code", "paper", "none"), "'code', 'paper' or 'none'")
        _require(self, "lighting_std", math.isfinite(self.lighting_std) and self.lighting_std >= 0,
                 "a number >= 0")


@dataclass(frozen=True)
class TrainConfig:
    """The training recipe (§5). Opt-in speed flags change the arithmetic and are recorded in
    the run's config.json; the defaults are the paper's fp32 arithmetic."""
    batch_size: int = 128                  # §5: "a batch size of 128 examples"
    lr: float = 0.01                       # §5: ε, equal for all layers, initialised at 0.01
    momentum: float = 0.9                  # §5
    weight_decay: float = 5e-4             # §5; on weights only (biases exempt, as in cuda-convnet2 and Caffe)
    epochs: int = 90                       # §5: "roughly 90 cycles through the training set"
    schedule: str = "plateau"              # §5: "plateau" = ÷10 when val error stops improving | "fixed" = ÷10 at drop_epochs
    drop_epochs: tuple[int, ...] = (30, 60, 80)  # schedule="fixed": the (0-based) epochs that start at ε/10, ε/100, ...
    patience: int = 3                      # schedule="plateau": epochs without improvement before a drop (our statement of §5's rule)
    min_improvement: float = 0.001         # schedule="plateau": a smaller fall in centre-patch val top-1 error is no improvement
    max_drops: int = 3                     # §5: "reduced three times prior to termination"
    seed: int = 0                          # every random stream of the run derives from it
    stuck_steps: int = 0                   # guard: stop if the loss is still at chance, ln(C), after this many steps (warn at a fifth); 0 = three epochs' steps, at least 5,000 (the paper's bias-1 init can sit at chance for epochs, PAPER-SPEC §10)
    freeze: tuple[str, ...] = ()           # fine-tuning (not in the paper): layers kept as loaded, e.g. ("conv1", "conv2")
    precision: str = "fp32"                # "fp32" (the paper's) | "bf16" autocast (opt-in, not in the paper)
    channels_last: bool = False            # opt-in memory format (not in the paper)
    compile: bool = False                  # opt-in torch.compile (not in the paper)
    fused_lrn: bool = False                # opt-in: §3.3's LRN as one operator, one pass each way (C on the CPU, Triton on CUDA); the same formula (not in the paper)
    fused_sgd: bool = False                # opt-in: §5's update in one C pass per CPU parameter instead of four foreach passes; the same formula and order
    deterministic: bool = False            # torch.use_deterministic_algorithms (bit-exact reruns, slower on GPU); on CUDA also sets CUBLAS_WORKSPACE_CONFIG=:4096:8 if unset and runs the LRN as the reproduction::lrn operator (F.local_response_norm's backward has no deterministic CUDA kernel)

    def __post_init__(self) -> None:
        _check_types(self)
        for name in ("batch_size", "epochs", "patience"):
            _require(self, name, getattr(self, name) >= 1, "an integer >= 1")
        _require(self, "stuck_steps", self.stuck_steps >= 0, "an integer >= 0 (0: three epochs' steps, at least 5,000)")
        _require(self, "seed", self.seed >= 0, "an integer >= 0")
        _require(self, "max_drops", self.max_drops >= 0, "an integer >= 0")
        for name in ("lr", "momentum", "weight_decay", "min_improvement"):
            _require(self, name, math.isfinite(getattr(self, name)) and getattr(self, name) >= 0, "a number >= 0")
        _require(self, "schedule", self.schedule in ("plateau", "fixed"), "'plateau' or 'fixed'")
        _require(self, "drop_epochs", list(self.drop_epochs) == sorted(set(self.drop_epochs))
                 and all(e >= 1 for e in self.drop_epochs), "increasing epochs >= 1, e.g. (30, 60, 80)")
        _require(self, "precision", self.precision in ("fp32", "bf16"), "'fp32' or 'bf16'")
        _require(self, "freeze", set(self.freeze) <= {*LAYERS, "conv6"},
                 f"a tuple of layer names from {', '.join(LAYERS)} (and conv6 where the net has it)")


@dataclass(frozen=True)
class RunConfig:
    """One experiment: the net (§3), its input pipeline (§2, §4.1) and its recipe (§5).

    `override(run, {"lrn": "none"})` finds the part that owns a key; keys are unique across
    the parts, and "model.lrn" names the part explicitly.
    """
    model: AlexNetConfig = dataclasses.field(default_factory=AlexNetConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            kind = {"model": AlexNetConfig, "data": DataConfig, "train": TrainConfig}[f.name]
            value = getattr(self, f.name)
            if isinstance(value, Mapping):  # from a run's config.json
                object.__setattr__(self, f.name, from_dict(kind, value))
            elif not isinstance(value, kind):
                raise ValueError(f"RunConfig.{f.name} must be a {kind.__name__}, got {type(value).__name__}")
        absent = sorted(set(self.train.freeze) - set(weight_layers(self.model)))
        if absent:  # e.g. freeze=conv6 without conv6=True, or a layer remove_conv left out
            raise ValueError(f"TrainConfig.freeze names {', '.join(absent)}, which this net does not have; "
                             f"its layers are {', '.join(weight_layers(self.model))}")


@dataclass(frozen=True)
class CifarConfig:
    """The paper's two CIFAR-10 experiments (§3.1 Fig. 1, §3.3), run with Krizhevsky's own
    four-layer nets from cuda-convnet's example-layers/ (read by reproduction/cifar.py).

    Defaults are layers-18pct.cfg + layer-params-18pct.cfg, the four-layer net (three conv
    layers and a classifier) of the kind Fig. 1 describes; reproduction/experiments.py
    states each experiment as a diff from it.
    """
    layout: str = "18pct"            # "18pct": conv32-conv32-conv64-fc10 (layers-18pct.cfg) | "conv-local": conv64-conv64-local32-local32-fc10 (layers-conv-local-1{1,3}pct.cfg, §3.3's 13% / 11% pair)
    activation: str = "relu"         # §3.1: "relu" | "tanh" (Fig. 1's comparison)
    norm: str = "spatial"            # "spatial" = cuda-convnet's rnorm (same map, size×size region) | "crossmap" = §3.3's form (adjacent maps) | "none"
    norm_size: int = 3               # rnorm's size (18pct: 3; conv-local-11pct: 5 maps)
    norm_scale: float = 5e-5         # α: b = a / (1 + α/size^d · Σ a²)^β with d = 2 (spatial) or 1 (crossmap), as cuda-convnet
    norm_pow: float = 0.75           # β
    crop: int = 32                   # 32 = whole images (18pct) | 24 = random 24×24 crops + centre crop at test (cuda-convnet's cifar-cropped, conv-local)
    flip: bool = False               # random horizontal flips while training (cifar-cropped does them)
    batch_size: int = 128            # cuda-convnet's --mini=128
    lr: float = 0.001                # epsW (on the batch-mean gradient); biases use 2× (epsB = 0.002)
    momentum: float = 0.9            # momW, momB
    weight_decay_conv: float = 0.004  # wc of the conv layers
    weight_decay_top: float = 1.0    # wc of the local and fc layers (18pct: fc10 wc=1)
    epochs: int = 140                # layer-params-18pct: ÷10 after 120 epochs, again after 10 more
    drop_epochs: tuple[int, ...] = (120, 130)  # epochs (0-based) that start at ε/10, ε/100
    stop_below: float = 0.0          # stop after the epoch in which training error reaches this (Fig. 1's 0.25); 0 = run all epochs
    seed: int = 0                    # init, data order, crops and flips all derive from it

    def __post_init__(self) -> None:
        _check_types(self)
        _require(self, "stop_below", 0 <= self.stop_below < 1, "a fraction in [0, 1)")
        _require(self, "layout", self.layout in ("18pct", "conv-local"), "'18pct' or 'conv-local'")
        _require(self, "activation", self.activation in ("relu", "tanh"), "'relu' or 'tanh'")
        _require(self, "norm", self.norm in ("spatial", "crossmap", "none"), "'spatial', 'crossmap' or 'none'")
        _require(self, "norm_size", self.norm_size >= 1 and self.norm_size % 2 == 1, "an odd integer >= 1")
        for name in ("norm_scale", "norm_pow", "lr", "momentum", "weight_decay_conv", "weight_decay_top"):
            _require(self, name, math.isfinite(getattr(self, name)) and getattr(self, name) >= 0, "a number >= 0")
        _require(self, "crop", self.crop in (24, 32), "32 (whole images) or 24 (cuda-convnet's cropped provider)")
        for name in ("batch_size", "epochs"):
            _require(self, name, getattr(self, name) >= 1, "an integer >= 1")
        _require(self, "drop_epochs", list(self.drop_epochs) == sorted(set(self.drop_epochs))
                 and all(e >= 1 for e in self.drop_epochs), "increasing epochs >= 1")
