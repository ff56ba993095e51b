"""The builder, `reproduction.alexnet(...)`, and the record that comes with a checkpoint's weights.

    import reproduction
    model = reproduction.alexnet()                           # the paper's net, §5's initialisation
    model = reproduction.alexnet(towers=1, num_classes=10)   # any AlexNetConfig field
    model = reproduction.alexnet(weights="runs/x/checkpoint.pt")   # trained or imported; eval mode
    w = model.weights                                        # its Weights record (below)
    x = w.transforms()(PIL.Image.open("cat.jpg"))            # 3×224×224 (227 for Caffe's net)
    probs = model(x[None]).softmax(-1)                       # w.classes[probs.argmax()]

A `Weights` record holds, in torchvision's spirit (`weights.transforms()`, `weights.meta`): the
run config, the class names, the mean image it was trained with (a 3×256×256 image, which
torchvision's per-channel mean/std tuples cannot express), the metrics measured on it with the
data they were measured on (the run folder's final.json, evaluate's eval-<split>.json, best.pt's
own validation figures), its recipe, and its licence. For Caffe's bvlc_alexnet (imported by
reproduction.caffe) the recipe, the figures BVLC reports and the licence are those of BVLC's
models/bvlc_alexnet/readme.md.

`transforms()` is §2 and §4.1's test pipeline: the shorter side rescaled to 256 and the central
256×256 kept (data_prep's own functions; a net trained on a set stored at S < 256 px gets S×S,
upsampled as the loader does), then the centre patch (224, or 227 for Caffe's arithmetic) minus
the mean as the net was trained (DataConfig.mean); `ten_patch=True` gives §4.1's ten patches,
10×3×crop×crop, whose softmaxes are averaged.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms.functional import convert_image_dtype

from data_prep.image import resize_center_crop, to_rgb
from reproduction.config import PAPER, AlexNetConfig, DataConfig, RunConfig
from reproduction.data import SIDE, load_stats, ten_patch_offsets, view_batch
from reproduction.errors import UserError
from reproduction.model import AlexNet
from reproduction.training.checkpoints import CHECKPOINT, config_of, load_checkpoint, model_from_checkpoint
from reproduction.files import read_json
from reproduction.training.runfolder import SELECTED_BY_VAL, locate_data
IMAGENET_INDEX = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-sample" / "imagenet_class_index.json"

# What BVLC says of bvlc_alexnet (BVLC/caffe models/bvlc_alexnet/readme.md).
BVLC = {
    "licence": "BVLC's models/bvlc_alexnet/readme.md: \"This model is released for unrestricted use.\" "
               "(front matter: license: unrestricted). Its training data, ILSVRC-2012, comes under ImageNet's "
               "terms of access (non-commercial research and educational use), which an earlier version of "
               "that readme gave as the reason for a non-commercial licence.",
    "recipe": "BVLC's Caffe training of the paper's net (models/bvlc_alexnet/readme.md): no relighting "
              "augmentation, non-zero biases initialised to 0.1 instead of 1, 227×227 crops, LRN across both "
              "groups; the iteration-360,000 snapshot, trained by Evan Shelhamer",
    "reported": {"centre": {"top1_error": 0.429, "top5_error": 0.198},
                 "measured_on": "ILSVRC-2012 validation set, centre crop, by BVLC (readme: 57.1% top-1, "
                                "80.2% top-5 accuracy); not measured by this project"},
}


@dataclass(frozen=True)
class Weights:
    """What a net's weights are and what they need (see the module docstring)."""
    path: str | None         # the checkpoint (or Caffe file) they came from
    config: RunConfig        # architecture, data views and recipe of the run
    classes: list[str]       # fc8's outputs, in order
    mean: Tensor             # float32 3×256×256 RGB, 0–255: the mean image subtracted (§2)
    mean_source: str         # where the mean came from
    image_size: int          # side the prepared set stores (256; < 256 is upsampled, as in training)
    metrics: list[dict]      # measured here: each {"centre", "ten_patch", "measured_on", "file"}
    recipe: dict | str       # how they were trained
    licence: str
    reported: dict | None = None   # figures their authors state, not measured here (bvlc_alexnet)
    source: dict | None = None     # an import's provenance (file, sha1, ...)
    selection: str | None = None   # how this checkpoint was chosen among a run's (best.pt)

    def transforms(self, *, ten_patch: bool = False) -> "TestTransform":
        """§2/§4.1's test view(s), mean-centred, of what torchvision's ImageClassification presets
        take: a PIL image, or a C×H×W or B×C×H×W tensor, uint8 (0–255) or float (0–1)."""
        return TestTransform(self.mean, self.config.data, image_size=self.image_size, ten_patch=ten_patch)

    @property
    def meta(self) -> dict:
        """Everything but the tensors, as JSON-ready values; `categories` is `classes` under
        torchvision's key (meta["categories"][i] names output i)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("mean", "config")}
        return out | {"config": dataclasses.asdict(self.config), "num_classes": len(self.classes),
                      "categories": list(self.classes)}


class TestTransform:
    """Image → float32 3×crop×crop test view (10×3×crop×crop with ten_patch), as predict and
    evaluate make them. Takes what torchvision's ImageClassification takes: a PIL image, or a
    tensor C×H×W or with leading batch dimensions (B×C×H×W → B×3×crop×crop, B×10×... with
    ten_patch), uint8 0–255 or float 0–1 (converted to uint8 as torchvision converts, exact for
    k/255; the net was trained on uint8 JPEG pixels). A uint8 3×S×S tensor with S = image_size
    is taken as already prepared (what predict.load_image returns); any other image goes
    through §2's rescale and crop."""

    def __init__(self, mean: Tensor, config: DataConfig, *, image_size: int = SIDE, ten_patch: bool = False):
        self.mean, self.config, self.image_size, self.ten_patch = mean, config, image_size, ten_patch
        offsets = ten_patch_offsets(config.crop)
        self.offsets = offsets if ten_patch else offsets[4:5]  # the centre

    def __call__(self, image: Image.Image | Tensor | np.ndarray) -> Tensor:
        if isinstance(image, Tensor) and image.dim() > 3:  # ...×C×H×W: each image on its own
            flat = image.reshape(-1, *image.shape[-3:])
            if not len(flat):
                raise ValueError(f"expected at least one image, got a tensor of shape {tuple(image.shape)}")
            out = torch.stack([self(x) for x in flat])
            return out.reshape(*image.shape[:-3], *out.shape[1:])
        x = self.prepare(image)
        n = len(self.offsets)
        top, left, flip = (torch.tensor(v) for v in zip(*self.offsets))
        views = view_batch(x[None].expand(n, *x.shape), self.mean, self.config, top, left, flip)
        return views if self.ten_patch else views[0]

    def prepare(self, image: Image.Image | Tensor | np.ndarray) -> Tensor:
        """§2: uint8 3×S×S RGB, S = image_size."""
        if not isinstance(image, (Image.Image, Tensor, np.ndarray)):
            raise TypeError(f"expected a PIL image or an image tensor/array, got {type(image).__name__}; "
                            "open a file with PIL.Image.open(path) (or use reproduction.predict.load_image)")
        if isinstance(image, Tensor):
            if image.dim() != 3 or image.shape[0] not in (1, 3) or image.dtype == torch.bool or image.is_complex() \
                    or not image.shape[1] or not image.shape[2]:
                raise ValueError(f"expected an image tensor C×H×W or B×C×H×W (C = 1 or 3, H and W >= 1), uint8 "
                                 f"0–255 or float 0–1, got {image.dtype} {tuple(image.shape)}")
            if not image.is_floating_point() and image.dtype != torch.uint8:  # int16/32/64 holding 0–255
                lo, hi = image.min().item(), image.max().item()
                if lo < 0 or hi > 255:
                    raise ValueError(f"an integer image tensor must hold 0–255, got {lo}…{hi} ({image.dtype})")
                image = image.to(torch.uint8)  # not convert_image_dtype: it scales by the dtype's range
            if image.is_floating_point():
                lo, hi = (image.min().item(), image.max().item()) if image.numel() else (0.0, 0.0)
                if not (lo >= 0.0 and hi <= 1.0):  # NaN fails too; torchvision's presets do not check
                    raise ValueError(f"a float image tensor must hold 0–1 (torchvision's convention), got "
                                     f"{lo:.4g}…{hi:.4g}; divide 0–255 values by 255 or pass a uint8 tensor")
            if image.dtype != torch.uint8:
                image = convert_image_dtype(image.cpu(), torch.uint8)  # torchvision's own conversion
            image = image.cpu()
            if tuple(image.shape) == (3, self.image_size, self.image_size):
                return image
            image = image.permute(1, 2, 0).numpy()
        if isinstance(image, np.ndarray):
            image = Image.fromarray(np.ascontiguousarray(image.squeeze(-1) if image.ndim == 3 and
                                                         image.shape[-1] == 1 else image))
        img = resize_center_crop(to_rgb(image), self.image_size)
        return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)

    def __repr__(self) -> str:
        views = "ten patches (§4.1)" if self.ten_patch else "centre patch"
        return (f"TestTransform(shorter side → 256, central 256×256, {views} {self.config.crop}×{self.config.crop}, "
                f"minus the mean image (mean={self.config.mean!r}))")


# ----------------------------------------------------------------------------- the builder

def no_pretrained(habit: str) -> ValueError:
    """What torchvision's and Caffe users try first (weights="DEFAULT", pretrained=True,
    AlexNet_Weights.DEFAULT) has no meaning here: say where pretrained weights come from."""
    from reproduction.caffe import BVLC_SHA1, BVLC_URL
    return ValueError(
        f"alexnet({habit}): this project ships no weights, and torchvision's AlexNet_Weights belong to its "
        f"own, different net (the 'One weird trick' variant). For pretrained weights of the paper's net use "
        f"Caffe's bvlc_alexnet: download {BVLC_URL} (sha1 {BVLC_SHA1}) and call "
        f"reproduction.alexnet_caffe(\"bvlc_alexnet.caffemodel\") (torch.hub: torch.hub.load(repo, "
        f"\"alexnet_caffe\", \"bvlc_alexnet.caffemodel\")); weights= takes a checkpoint file of this project")


def _torchvision_habit(weights: Any, config: dict) -> str | None:
    """How a torchvision-style request was spelled, or None for a plain call."""
    if config.get("pretrained"):
        return f"pretrained={config['pretrained']!r}"
    if isinstance(weights, enum.Enum):  # torchvision's WeightsEnum, e.g. AlexNet_Weights.DEFAULT
        return f"weights={type(weights).__name__}.{weights.name}"
    # a weights name as torchvision spells them ("DEFAULT", "IMAGENET1K_V1"), not a file
    if isinstance(weights, str) and re.fullmatch(r"[A-Z][A-Z0-9_]*", weights) and not Path(weights).exists():
        return f"weights={weights!r}"
    return None


def alexnet(weights: str | Path | None = None, *, devices=None, stats: str | Path | None = None,
            data: str | Path | None = None, **config: Any) -> AlexNet:
    """The paper's net (AlexNetConfig's defaults, any field overridden by keyword), freshly
    initialised (§5); or, with `weights` (a checkpoint of this project, trained or imported),
    that net in eval mode with its record as `model.weights`. stats/data: where its mean image
    and class names are, when not beside the checkpoint or in its run's config.json (see
    reproduction.predict). torchvision's weights="DEFAULT", weights=AlexNet_Weights.DEFAULT
    and pretrained=True raise a ValueError pointing to alexnet_caffe (Caffe's bvlc_alexnet)."""
    habit = _torchvision_habit(weights, config)
    if habit is not None:
        raise no_pretrained(habit)
    if config.get("pretrained", True) is False:
        del config["pretrained"]  # torchvision's spelling of weights=None
    if weights is None:
        fields = {f.name for f in dataclasses.fields(AlexNetConfig)}
        unknown = sorted(set(config) - fields)
        if unknown:
            raise TypeError(f"alexnet() got unknown config field(s) {', '.join(unknown)}; AlexNetConfig has "
                            f"{', '.join(sorted(fields))}")
        model = AlexNet(dataclasses.replace(PAPER, **config), devices=devices)
        model.weights = None
        return model
    if config:
        raise TypeError(f"alexnet(weights=...) takes its architecture from the checkpoint; drop "
                        f"{', '.join(sorted(config))}")
    path = Path(weights)
    state = load_checkpoint(path)
    record = load_weights(path, stats=stats, data=data, state=state)
    model, _ = model_from_checkpoint(state, devices=devices, path=path)
    model.weights = record
    return model.eval()


def load_weights(path: str | Path, *, stats: str | Path | None = None, data: str | Path | None = None,
                 state: dict | None = None) -> Weights:
    """The record of a checkpoint (see the module docstring); raises UserError when its mean or
    class names cannot be found."""
    path = Path(path)
    state = load_checkpoint(path) if state is None else state
    config = config_of(state, path)
    source = state.get("source")
    try:
        folder = find_stats(path, None if stats is None else Path(stats), None if data is None else Path(data))
        mean = load_stats(folder).mean
        manifest = find_manifest(path, None if data is None else Path(data))
        classes = class_names(manifest, config.model.num_classes)
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise UserError(f"{e}") from None
    with np.load(folder / "stats.npz") as f:
        mean_source = f"{folder / 'stats.npz'}" + (f" ({f['source']})" if "source" in f else "")
    image_size = int(manifest["image_size"]) if manifest else SIDE
    metrics = measured(path, state)
    if source and source.get("importer") == "reproduction.caffe":
        return Weights(str(path), config, classes, mean, mean_source, image_size, metrics, BVLC["recipe"],
                       caffe_licence(source), reported=BVLC["reported"], source=source)
    meta = read_json(path.parent / "config.json") if (path.parent / "config.json").is_file() else {}
    recipe = {"experiment": meta.get("experiment"), "train": dataclasses.asdict(config.train),
              "data": dataclasses.asdict(config.data), "command": meta.get("command"),
              "dataset": meta.get("data"), "git": meta.get("git")}
    licence = ("not stated: trained with this project's code; the weights may carry the terms of the data "
               f"they were trained on ({(meta.get('data') or {}).get('dataset') or 'see the run folder'})")
    return Weights(str(path), config, classes, mean, mean_source, image_size, metrics, recipe, licence,
                   selection=SELECTED_BY_VAL if "best" in state else None)


def caffe_licence(source: dict) -> str:
    """BVLC's words, and whether the file is BVLC's own."""
    known = source.get("bvlc_alexnet")
    if known is False:
        return (f"unknown: {source.get('weights')} is not BVLC's bvlc_alexnet.caffemodel (sha1 "
                f"{source.get('weights_sha1')}); its author's terms apply")
    whose = ("the file is BVLC's (sha1 matches its readme)" if known else
             "assumed to be a conversion of BVLC's bvlc_alexnet.caffemodel (a .npy's bytes cannot show it)")
    return f"{BVLC['licence']} ({whose})"


def measured(path: Path, state: dict) -> list[dict]:
    """The metrics recorded for exactly this checkpoint: the run's final.json (checkpoint.pt after
    its last epoch), evaluate's eval-<split>.json beside it, best.pt's own validation figures."""
    out, folder, epoch = [], path.parent, state.get("epoch")
    meta = read_json(folder / "config.json") if (folder / "config.json").is_file() else {}
    data = meta.get("data") or {}
    final = folder / "final.json"
    if path.name == CHECKPOINT and final.is_file():
        f = read_json(final)
        if f.get("epochs") == epoch:
            out.append({"centre": f.get("centre"), "ten_patch": f.get("ten_patch"), "file": str(final),
                        "measured_on": {"data": f.get("data"), "dataset": data.get("dataset"), "split": "val",
                                        "images": data.get("val_images")}})
    for e_path in sorted(folder.glob("eval-*.json")):
        e = read_json(e_path)
        if isinstance(e.get("checkpoint"), str) and Path(e["checkpoint"]).name == path.name \
                and e.get("epochs_trained") == epoch:
            out.append({"centre": e.get("centre"), "ten_patch": e.get("ten_patch"), "file": str(e_path),
                        "measured_on": {"data": e.get("data"), "split": e.get("split")}})
    if "best" in state:
        b = state["best"]
        out.append({"centre": {"top1_error": b.get("val_top1_error"), "top5_error": b.get("val_top5_error")},
                    "ten_patch": None, "file": str(path),
                    "measured_on": {"data": data.get("path"), "dataset": data.get("dataset"), "split": "val",
                                    "images": data.get("val_images"), "epochs_trained": b.get("epochs_trained"),
                                    "note": SELECTED_BY_VAL}})
    return out


# ------------------------------------------------------------- where a checkpoint's data is

def find_stats(checkpoint: Path, stats: Path | None, data: Path | None) -> Path:
    """The folder whose stats.npz holds the net's mean image: --stats, else --data, else beside
    the checkpoint (what reproduction.caffe writes), else the prepared set in its config.json."""
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
    """Names for fc8's outputs: the prepared set's manifest, else ImageNet's for 1000 classes
    (../shared/data/imagenet-sample/imagenet_class_index.json, else torchvision's metadata), in
    sorted-wnid order, which is Caffe's and data_prep's order."""
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
    return locate_data(path, checkpoint.parent) if path else None


def alexnet_caffe(path: str | Path | None = None, *, mean: str | Path | None = None,
                  prototxt: str | Path | None = None, devices=None) -> AlexNet:
    """Caffe's bvlc_alexnet from its .caffemodel (or the ports' .npy), imported in memory as
    `python -m reproduction.caffe` imports it (eval mode, `model.weights` its record). BVLC's
    file: reproduction.caffe.BVLC_URL, sha1 BVLC_SHA1; another sha1 is imported with a
    UserWarning. mean: Caffe's ilsvrc_2012_mean.npy; None (the default) uses its per-channel
    mean, so that no file beyond the weights is needed (DEVIATION(§2), see reproduction.caffe).
    Raises FileNotFoundError or ValueError naming the file and the argument."""
    from reproduction import caffe  # protobuf is needed only here
    if path is None:
        raise ValueError(f"alexnet_caffe(path): give the path of bvlc_alexnet.caffemodel, downloaded from "
                         f"{caffe.BVLC_URL} (sha1 {caffe.BVLC_SHA1}), or of the TensorFlow ports' bvlc_alexnet.npy")
    rgb_mean = torch.from_numpy(caffe.caffe_mean_rgb(mean, arg="mean="))
    model, config, source = caffe.caffe_net(path, prototxt=prototxt, prototxt_arg="prototxt=")
    n = config.model.num_classes
    classes = class_names(None, n) if n == 1000 else [str(i) for i in range(n)]  # a fine-tuned file names none
    record = Weights(str(path), config, classes, rgb_mean, caffe.mean_source(mean), SIDE, [], BVLC["recipe"],
                     caffe_licence(source), reported=BVLC["reported"], source=source | {"mean": caffe.mean_source(mean)})
    if devices is not None:
        placed = AlexNet(config.model, devices=devices)
        placed.load_state_dict(model.state_dict())
        model = placed.eval()
    model.weights = record
    return model
