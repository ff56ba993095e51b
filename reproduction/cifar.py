"""The paper's CIFAR-10 experiments with Krizhevsky's own four-layer nets (cuda-convnet).

§3.1, Fig. 1: "A four-layer convolutional neural network with ReLUs (solid line) reaches a 25%
training error rate on CIFAR-10 six times faster than an equivalent network with tanh neurons
(dashed line). The learning rates for each network were chosen independently to make training
as fast as possible. No regularization of any kind was employed."

§3.3: "On CIFAR-10, a four-layer CNN achieved a 13% test error rate without normalization and
11% with normalization."

The nets are cuda-convnet's example layer files, the code the paper's authors released with it:
  layout "18pct"       layers-18pct.cfg: conv 32 5×5 → max pool 3/2 → rnorm → conv 32 5×5 →
                       avg pool 3/2 → rnorm → conv 64 5×5 → avg pool 3/2 → fc 10
  layout "conv-local"  layers-conv-local-13pct.cfg (no normalisation) and -11pct.cfg (cross-map
                       normalisation, n=5, α=0.001, β=0.75): conv 64 5×5 → [norm] → max pool →
                       conv 64 5×5 → [norm] → max pool → local 32 3×3 → local 32 3×3 → fc 10
  (the 13% / 11% names are the paper's §3.3 numbers: that pair is the claim's net).

cuda-convnet's arithmetic is kept: pixels 0-255 minus the training set's mean image, pooling
windows that may overhang the edge (outputsX = ceil((S − 3)/2) + 1), per-layer Gaussian init
(initW), biases 0, and its update v ← μv − wc·ε·w − ε·⟨∂L/∂w⟩ (the paper's §5 form, biases at
2ε and no decay), which is reproduction.optim.PaperSGD with per-layer groups.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import pickle
import tarfile
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torchvision.datasets import CIFAR10
from torchvision.datasets.utils import check_integrity, download_and_extract_archive

from data_prep.pack import sha256_file
from reproduction.config import CifarConfig
from reproduction.data import num_batches
from reproduction.errors import UserError, reading
from reproduction.files import read_json, read_json_file
from reproduction.training.loop import Loop, Options, Task, TrainingStopped, position_text
from reproduction.optim import PaperSGD, fixed_schedule_lr
from reproduction.training.runfolder import RunFolder, environment, git_state, read_metrics
from reproduction.stats import epochs_to, error_curve, mean_sd, sd_to_json

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


# --- the layers cuda-convnet has and torch does not -------------------------------------------

class ResponseNorm(nn.Module):
    """cuda-convnet's two response normalisations, b = a / (1 + α/n^d · Σ a²)^β (its k is 1):
    "crossmap" sums over n adjacent maps (§3.3's form, d = 1); "spatial" (type=rnorm in
    layers-18pct.cfg) over an n×n region of the same map (d = 2). Windows are clipped at the edges."""

    def __init__(self, kind: str, size: int, scale: float, power: float) -> None:
        super().__init__()
        self.kind, self.size, self.scale, self.power = kind, size, scale, power

    def forward(self, x: Tensor) -> Tensor:
        if self.kind == "crossmap":
            return F.local_response_norm(x, self.size, alpha=self.scale, beta=self.power, k=1.0)
        # Zero padding + count_include_pad makes avg_pool the clipped window's sum / n².
        mean_sq = F.avg_pool2d(x * x, self.size, stride=1, padding=self.size // 2, count_include_pad=True)
        return x / (1 + self.scale * mean_sq).pow(self.power)

    def extra_repr(self) -> str:
        return f"{self.kind}, n={self.size}, alpha={self.scale}, beta={self.power}, k=1"


class LocallyConnected(nn.Module):
    """cuda-convnet's type=local: a convolution whose filters are not shared across positions
    (a separate filter bank, and bias, for each output position)."""

    def __init__(self, in_channels: int, out_channels: int, size: int, kernel: int, padding: int) -> None:
        super().__init__()
        self.kernel, self.padding, self.size = kernel, padding, size
        positions = size * size  # stride 1, "same" padding: the output is size×size
        self.weight = nn.Parameter(torch.empty(positions, in_channels * kernel * kernel, out_channels))
        self.bias = nn.Parameter(torch.zeros(out_channels, positions))

    def forward(self, x: Tensor) -> Tensor:
        cols = F.unfold(x, self.kernel, padding=self.padding)          # N × (C·k·k) × P
        y = torch.einsum("ncp,pco->nop", cols, self.weight) + self.bias  # N × O × P
        return y.reshape(x.shape[0], -1, self.size, self.size)


def _pool(kind: str) -> nn.Module:
    # cuda-convnet's outputsX=0 → ceil((S − 3)/2) + 1 windows: the last one may overhang.
    if kind == "max":
        return nn.MaxPool2d(3, 2, ceil_mode=True)
    return nn.AvgPool2d(3, 2, ceil_mode=True)


def _act(name: str) -> nn.Module:
    return nn.ReLU() if name == "relu" else nn.Tanh()


def _norm(c: CifarConfig) -> nn.Module:
    return nn.Identity() if c.norm == "none" else ResponseNorm(c.norm, c.norm_size, c.norm_scale, c.norm_pow)


class Net18pct(nn.Module):
    """layers-18pct.cfg, sizes for 32×32 input (crop=24 gives 24→12→6→3)."""

    def __init__(self, c: CifarConfig) -> None:
        super().__init__()
        s = [c.crop, math.ceil((c.crop - 3) / 2) + 1]
        s += [math.ceil((s[1] - 3) / 2) + 1]
        s += [math.ceil((s[2] - 3) / 2) + 1]
        self.conv1 = nn.Conv2d(3, 32, 5, padding=2)    # 32×32×32
        self.pool1 = _pool("max")                      # 32×16×16 (the neuron sits after the pool)
        self.act1 = _act(c.activation)
        self.norm1 = _norm(c)
        self.conv2 = nn.Conv2d(32, 32, 5, padding=2)   # 32×16×16
        self.act2 = _act(c.activation)
        self.pool2 = _pool("avg")                      # 32×8×8
        self.norm2 = _norm(c)
        self.conv3 = nn.Conv2d(32, 64, 5, padding=2)   # 64×8×8
        self.act3 = _act(c.activation)
        self.pool3 = _pool("avg")                      # 64×4×4
        self.fc10 = nn.Linear(64 * s[3] ** 2, 10)      # 10
        self.init_std = {"conv1": 1e-4, "conv2": 0.01, "conv3": 0.01, "fc10": 0.01}  # initW

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm1(self.act1(self.pool1(self.conv1(x))))
        x = self.norm2(self.pool2(self.act2(self.conv2(x))))
        x = self.pool3(self.act3(self.conv3(x)))
        return self.fc10(x.flatten(1))


class ConvLocalNet(nn.Module):
    """layers-conv-local-11pct.cfg (norm="crossmap") / -13pct.cfg (norm="none"), 24×24 input."""

    def __init__(self, c: CifarConfig) -> None:
        super().__init__()
        s1 = math.ceil((c.crop - 3) / 2) + 1
        s2 = math.ceil((s1 - 3) / 2) + 1
        self.conv1 = nn.Conv2d(3, 64, 5, padding=2)     # 64×24×24
        self.act1 = _act(c.activation)
        self.norm1 = _norm(c)
        self.pool1 = _pool("max")                       # 64×12×12
        self.conv2 = nn.Conv2d(64, 64, 5, padding=2)    # 64×12×12
        self.act2 = _act(c.activation)
        self.norm2 = _norm(c)
        self.pool2 = _pool("max")                       # 64×6×6
        self.local3 = LocallyConnected(64, 32, s2, 3, 1)  # 32×6×6
        self.act3 = _act(c.activation)
        self.local4 = LocallyConnected(32, 32, s2, 3, 1)  # 32×6×6
        self.act4 = _act(c.activation)
        self.fc10 = nn.Linear(32 * s2 * s2, 10)         # 10
        self.init_std = {"conv1": 1e-4, "conv2": 0.01, "local3": 0.04, "local4": 0.04, "fc10": 0.01}

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool1(self.norm1(self.act1(self.conv1(x))))
        x = self.pool2(self.norm2(self.act2(self.conv2(x))))
        x = self.act4(self.local4(self.act3(self.local3(x))))
        return self.fc10(x.flatten(1))


def cifar_net(c: CifarConfig) -> nn.Module:
    """The config's net with cuda-convnet's initialisation (weights ~ N(0, initW²), biases 0)."""
    net = Net18pct(c) if c.layout == "18pct" else ConvLocalNet(c)
    with torch.no_grad():
        for name, std in net.init_std.items():
            layer = getattr(net, name)
            layer.weight.normal_(0.0, std)
            layer.bias.zero_()
    return net


def param_groups(net: nn.Module, c: CifarConfig) -> list[dict]:
    """cuda-convnet's per-layer rates: weights at epsW with their layer's wc, biases at epsB = 2·epsW
    without decay (the layer-params files)."""
    groups = []
    for name in net.init_std:
        layer = getattr(net, name)
        wd = c.weight_decay_conv if name.startswith("conv") else c.weight_decay_top
        groups.append({"params": [layer.weight], "weight_decay": wd, "lr_scale": 1.0})
        groups.append({"params": [layer.bias], "weight_decay": 0.0, "lr_scale": 2.0})
    return groups


def count_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


# --- the data: CIFAR-10's 32×32 pixels, held in memory -----------------------------------------

# ../shared/data/cifar10 beside the checkout: the JPEG tars (see ../shared/data/README.md).
SHARED_CIFAR10 = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"
LAYOUTS = ("train.tar.gz + test.tar.gz of <class>/<name>.jpg (../shared/data/cifar10), or torchvision's "
           f"{CIFAR10.base_folder}/ (data_batch_1..5, test_batch, batches.meta)")


def cifar10_files(root: Path) -> tuple[str, dict[str, list[Path]]] | None:
    """(layout, {"train": files, "test": files}) for the CIFAR-10 under `root`, or None if none:
    "jpeg-tar", ../shared's two tars; or "torchvision", what torchvision.datasets.CIFAR10
    downloads (root may be cifar-10-batches-py/ itself or the folder holding it)."""
    root = Path(root)
    if (root / "train.tar.gz").is_file() and (root / "test.tar.gz").is_file():
        return "jpeg-tar", {"train": [root / "train.tar.gz"], "test": [root / "test.tar.gz"]}
    batches = root / CIFAR10.base_folder if (root / CIFAR10.base_folder).is_dir() else root
    names = [name for name, _ in CIFAR10.train_list + CIFAR10.test_list] + [CIFAR10.meta["filename"]]
    if not any((batches / name).is_file() for name in names):
        return None
    return "torchvision", {"train": [batches / name for name, _ in CIFAR10.train_list],
                           "test": [batches / name for name, _ in CIFAR10.test_list]}


def download_cifar10(root: Path) -> Path:
    """torchvision's CIFAR-10 in root/cifar-10-batches-py: downloaded and extracted with
    torchvision's own helper, checked by its MD5 (170 MB), unless every file is already there
    with torchvision's MD5s."""
    root = Path(root)
    folder = root / CIFAR10.base_folder
    expected = CIFAR10.train_list + CIFAR10.test_list + [[CIFAR10.meta["filename"], CIFAR10.meta["md5"]]]
    if all(check_integrity(str(folder / name), md5) for name, md5 in expected):
        return folder
    print(f"downloading CIFAR-10 with torchvision ({CIFAR10.url}, MD5 {CIFAR10.tgz_md5}) into {root}", flush=True)
    try:
        download_and_extract_archive(CIFAR10.url, str(root), filename=CIFAR10.filename, md5=CIFAR10.tgz_md5)
    except (OSError, RuntimeError, ValueError, tarfile.TarError) as e:  # URLError is an OSError
        raise UserError(f"could not download {CIFAR10.url} into {root} ({e}); put torchvision's "
                        f"{CIFAR10.filename} (MD5 {CIFAR10.tgz_md5}) extracted there, or ../shared/data/cifar10 "
                        "beside the checkout") from None
    return folder


def find_cifar10(work: Path) -> Path:
    """../shared/data/cifar10 when it is beside the checkout, else torchvision's CIFAR-10 in
    work/downloads, downloaded on first use (python -m reproduction and reproduction.experiments)."""
    if cifar10_files(SHARED_CIFAR10) is not None:
        return SHARED_CIFAR10
    print(f"{SHARED_CIFAR10} not found: using torchvision's CIFAR-10 in {Path(work) / 'downloads'}", flush=True)
    return download_cifar10(Path(work) / "downloads")


def cifar10_source(data: Path | None, work: Path, *, download: bool) -> Path:
    """The folder reproduction.experiments reads: --data as given (with --download, torchvision's
    copy fetched into it unless already there), or by default find_cifar10(work)."""
    if data is None:
        return find_cifar10(work)
    data = Path(data)
    found = cifar10_files(data)
    if download and (found is None or found[0] == "torchvision"):
        top = data.parent if data.name == CIFAR10.base_folder else data
        return download_cifar10(top)
    if found is None:
        raise UserError(f"CIFAR-10 not found in {data}: expected {LAYOUTS}; pass --download to fetch "
                        "torchvision's copy into it, or leave out --data (../shared/data/cifar10, else a download)")
    return data


def load_cifar10(root: Path, cache: Path | None = None, *, per_class: int | None = None) -> dict:
    """{"train": (uint8 N×3×32×32, int64 N), "test": (...)} from either layout of cifar10_files,
    decoded once and cached as .npz. per_class keeps the first n images of each class of each
    split (for quick runs and tests). The tars hold JPEG copies of the images, torchvision's
    batches the original pixels: the two sources are not bit-identical, and the cache tells
    them apart."""
    root = Path(root)
    found = cifar10_files(root)
    if found is None:
        raise UserError(f"CIFAR-10 not found in {root}: expected {LAYOUTS}; "
                        "torchvision.datasets.CIFAR10(root, download=True) downloads the second")
    layout, files = found
    missing = [str(p) for ps in files.values() for p in ps if not p.is_file()]
    if layout == "torchvision" and not (files["test"][0].parent / CIFAR10.meta["filename"]).is_file():
        missing.append(str(files["test"][0].parent / CIFAR10.meta["filename"]))
    if missing:
        raise UserError(f"CIFAR-10 incomplete: missing {', '.join(missing)} (expected {LAYOUTS}); "
                        "download it again or pass the complete folder")
    # The cache is keyed by its source (the files' paths and contents): other data rebuilds it.
    if layout == "jpeg-tar":  # the key the tars have always had: existing caches stay valid
        source = {s: _identity(ps[0]) for s, ps in files.items()}
    else:
        source = {"layout": layout, **{s: [_identity(p) for p in ps] for s, ps in files.items()}}
    key = json.dumps(source, sort_keys=True)
    data = _read_cache(cache, key, files) if cache is not None else None
    if data is None:
        if layout == "jpeg-tar":
            data = {split: _read_tar(paths[0], per_class) for split, paths in files.items()}
        else:
            _check_label_names(files["test"][0].parent / CIFAR10.meta["filename"])
            data = {split: _read_batches(paths) for split, paths in files.items()}
        if cache is not None and per_class is None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            partial = cache.with_name(cache.name + ".partial")  # renamed when whole: no torn cache
            with open(partial, "wb") as f:
                np.savez(f, source=np.array(key), **{f"{s}_{k}": v for s, (x, y) in data.items()
                                                     for k, v in (("x", x), ("y", y))})
            partial.replace(cache)
    if per_class is not None:
        data = {s: _first_per_class(x, y, per_class) for s, (x, y) in data.items()}
    return {s: (torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y)) for s, (x, y) in data.items()}


def _identity(path: Path) -> dict:
    return {"path": str(path.resolve()), "sha256": sha256_file(path)}


def _read_cache(cache: Path, key: str, splits) -> dict | None:
    """The cached arrays when the cache was made from these very files, else None (rebuild)."""
    if not cache.is_file():
        return None
    try:
        with np.load(cache) as z:
            if "source" not in z.files or str(z["source"]) != key:
                print(f"{cache} was made from other CIFAR-10 files: rebuilding it")
                return None
            return {s: (z[f"{s}_x"], z[f"{s}_y"]) for s in splits}
    except (OSError, ValueError, KeyError, EOFError):
        print(f"{cache} is unreadable: rebuilding it")
        return None


def _read_tar(path: Path, per_class: int | None) -> tuple[np.ndarray, np.ndarray]:
    index = {name: i for i, name in enumerate(CLASSES)}
    images, labels, counts = [], [], [0] * len(CLASSES)
    advice = "expected CIFAR-10's <class>/<name>.jpg tar (../shared/data/cifar10)"
    with reading(path, "CIFAR-10 tar.gz", advice), tarfile.open(path, "r|gz") as tar:
        for member in tar:
            cls = member.name.split("/")[0]
            if not member.isfile() or cls not in index:
                continue
            if per_class is not None and counts[index[cls]] >= per_class:
                continue  # decode only what a subset keeps
            counts[index[cls]] += 1
            with Image.open(io.BytesIO(tar.extractfile(member).read())) as im:
                images.append(np.asarray(im.convert("RGB"), np.uint8).transpose(2, 0, 1))
            labels.append(index[cls])
    if not images:
        raise UserError(f"{path}: no CIFAR-10 images in it; {advice}")
    return np.stack(images), np.asarray(labels, np.int64)


BATCH_ADVICE = (f"expected torchvision's {CIFAR10.base_folder}/ (download it again: its MD5s are in "
                "torchvision.datasets.CIFAR10)")


def _unpickle(path: Path, what: str) -> dict:
    with reading(path, what, BATCH_ADVICE), open(path, "rb") as f:
        batch = pickle.load(f, encoding="latin1")  # Python 2 pickles of dicts (as torchvision reads them)
    if not isinstance(batch, dict):
        raise UserError(f"{path} is not a {what} (a {type(batch).__name__}, not a dict); {BATCH_ADVICE}")
    return batch


def _field(batch: dict, name: str):
    """A batch's entry under its str key (the official Python 2 files) or bytes key (bytes-keyed
    pickles written from Python 3)."""
    return batch[name] if name in batch else batch[name.encode()]


def _check_label_names(meta: Path) -> None:
    """batches.meta's class names in CIFAR-10's order: the labels mean what CLASSES says."""
    try:
        names = [n.decode() if isinstance(n, bytes) else n for n in _field(_unpickle(meta, "CIFAR-10 batches.meta"),
                                                                           "label_names")]
    except (KeyError, TypeError):
        names = None
    if names is None or tuple(names) != CLASSES:
        raise UserError(f"{meta}: label_names {names} are not CIFAR-10's {list(CLASSES)}; {BATCH_ADVICE}")


def _read_batches(paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """The pixels and labels of torchvision's batch files, in file order."""
    images, labels = [], []
    for path in paths:
        batch = _unpickle(path, "CIFAR-10 batch")
        try:  # each row holds the red, then green, then blue 32×32 plane: already C×H×W
            x = np.asarray(_field(batch, "data"), np.uint8).reshape(-1, 3, 32, 32)
            y = np.asarray(_field(batch, "labels"), np.int64)
        except (KeyError, ValueError, TypeError) as e:
            raise UserError(f"{path} is not a CIFAR-10 batch ({type(e).__name__}: {e}); {BATCH_ADVICE}") from None
        if len(x) != len(y) or not len(y) or y.min() < 0 or y.max() >= len(CLASSES):
            raise UserError(f"{path}: {len(x)} images, {len(y)} labels in 0-9 expected; {BATCH_ADVICE}")
        images.append(x)
        labels.append(y)
    return np.concatenate(images), np.concatenate(labels)


def _first_per_class(x: np.ndarray, y: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    keep = np.concatenate([np.flatnonzero(y == c)[:n] for c in range(len(CLASSES))])
    keep.sort()
    return x[keep], y[keep]


def batches(images: Tensor, labels: Tensor, mean: Tensor, c: CifarConfig, epoch: int, *,
            train: bool, start: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
    """One epoch of float batches from batch `start`: mean image subtracted (0-255 scale, as
    cuda-convnet's CIFAR provider); with crop=24 a random crop (train) or the centre crop (test)
    of image and mean, and with flip a random mirror while training. Every draw is keyed by
    (seed, epoch), so a resumed epoch sees the batches it would have seen."""
    # DEVIATION(§3.1, §3.3): cuda-convnet visits its five fixed 10,000-image batch files in order; we
    # shuffle the whole training set each epoch (keyed by the seed), as §5's SGD assumes.
    g = torch.Generator().manual_seed(c.seed * 1_000_003 + epoch)
    n = len(labels)
    order = torch.randperm(n, generator=g) if train else torch.arange(n)
    border = 32 - c.crop
    if train and border:
        offsets = torch.randint(0, border + 1, (n, 2), generator=g)
    else:
        offsets = torch.full((n, 2), border // 2)
    flips = torch.rand(n, generator=g) < 0.5 if (train and c.flip) else torch.zeros(n, dtype=torch.bool)
    centre = mean[:, border // 2:border // 2 + c.crop, border // 2:border // 2 + c.crop]
    return _views(images, labels, centre, order, offsets, flips, c, start)


def _views(images, labels, centre, order, offsets, flips, c, start) -> Iterator[tuple[Tensor, Tensor]]:
    border = 32 - c.crop  # all random draws are made before the first batch: batches are a pure function of them
    for first in range(start * c.batch_size, len(labels), c.batch_size):
        idx = order[first:first + c.batch_size]
        x = images[idx].float()
        if border:
            rows = offsets[idx, 0, None] + torch.arange(c.crop)
            cols = offsets[idx, 1, None] + torch.arange(c.crop)
            x = x[torch.arange(len(idx))[:, None, None, None], torch.arange(3)[None, :, None, None],
                  rows[:, None, :, None], cols[:, None, None, :]]
        x = x - centre
        flip = flips[idx]
        if flip.any():
            x[flip] = x[flip].flip(-1)
        yield x.contiguous(memory_format=torch.channels_last), labels[idx]


# --- training: Krizhevsky's nets through the one loop (loop.py) ------------------------------

PARTS = 5  # training error is recorded for each fifth of an epoch, so Fig. 1's crossing is resolved


def _task(c: CifarConfig, net: nn.Module, optimiser: PaperSGD, data: dict, resume_with: str) -> Task:
    """A CIFAR-10 net as the loop's task: cuda-convnet's batches, the test error after each
    epoch, ε from the fixed schedule, and Fig. 1's stop at `stop_below` training error."""
    train_x, train_y = data["train"]
    mean = train_x.float().mean(0)

    def stop(rows: list[dict]) -> str | None:
        reached = c.stop_below and min(rows[-1]["train_error_parts"], default=1.0) <= c.stop_below
        return f"after epoch {len(rows)}: training error reached {c.stop_below:.0%} (stop_below)" if reached else None

    def finish(rows: list[dict]) -> dict:
        last = rows[-1]
        return {"train_error": last["train_error"], "test_error": last["test_error"], "diverged": False,
                "epochs_to_25": epochs_to(error_curve(rows), 0.25)}

    return Task(model=net, step_fn=net, optimizer=optimiser, images=len(train_y), classes=len(CLASSES),
                batches=lambda epoch, start: batches(train_x, train_y, mean, c, epoch, train=True, start=start),
                validate=lambda: {"test_error": evaluate_cifar(net, data["test"], mean, c)},
                lr=lambda rows: fixed_schedule_lr(len(rows), c.lr, c.drop_epochs), finish=finish,
                state={"config": config_json(c), "net": "cifar10"}, stop=stop, error_parts=PARTS,
                describe=lambda val: f"test error {val['test_error']:.4f}", resume_with=resume_with)


def config_json(c: CifarConfig) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(c)))  # as config.json holds it (tuples -> lists)


def run(out: Path, c: CifarConfig, data: dict, meta: dict, *, log: Callable[[str], None] = print) -> tuple[list[dict], dict]:
    """Train `c` into the run folder `out` (config.json, metrics.jsonl one line per epoch,
    checkpoint.pt, final.json) through the one loop; returns its rows and final.json. A finished
    run of the same config is reused and an interrupted one resumed from its checkpoint, so a
    rerun of the experiment command picks up where it stopped. A loss that diverges ends the run
    with final.json's "diverged": the learning-rate sweep tries rates that do."""
    config, recorded = config_json(c), _recorded_config(out)
    if recorded not in (None, config):
        raise UserError(f"{out} holds a run of another config ({out / 'config.json'}); give another --out, "
                        "or delete that folder to train this config there")
    if (out / "final.json").exists():
        log(f"{out}: finished already, reused")
        return read_metrics(out), read_json(out / "final.json")
    torch.manual_seed(c.seed)  # the initial weights
    net = cifar_net(c).to(memory_format=torch.channels_last)
    optimiser = PaperSGD(param_groups(net, c), lr=c.lr, momentum=c.momentum)
    identity = {"dataset": "cifar10", "train_images": len(data["train"][1]), "test_images": len(data["test"][1]),
                "path": meta.get("source", {}).get("path")}
    with RunFolder(out) as folder:
        if folder.checkpoint.exists():
            position, history = _resume(folder, net, optimiser, identity, meta, log)
        else:
            position, history = None, []
            folder.create(restart=True)
            folder.start({"experiment": meta.get("experiment", "cifar"), "config": config, **meta, "git": git_state(),
                          "environment": environment([torch.device("cpu")]), "data": identity})
            log(f"{out}: {c.layout} {c.activation} norm={c.norm} lr={c.lr:g} seed={c.seed}")
        # No stop at chance (stuck_steps past the run): a CIFAR curve runs to its cap, as cuda-convnet's.
        options = Options(batch_size=c.batch_size, epochs=c.epochs, seed=c.seed, channels_last=True,
                          stuck_steps=c.epochs * num_batches(len(data["train"][1]), c.batch_size) + 1)
        loop = Loop(_task(c, net, optimiser, data, meta.get("command") or "the same command"), options, folder,
                    position=position, history=history, log=log)
        try:
            final = loop.run()
        except TrainingStopped as e:
            final = _diverged(folder, loop, str(e), log)
    return read_metrics(out), final


def _recorded_config(out: Path) -> dict | None:
    if not (out / "config.json").is_file():
        return None
    meta = read_json_file(out / "config.json", "run record (config.json)",
                          "the run folder is damaged: delete it to train this run again, or give another --out")
    return meta.get("config") if isinstance(meta, dict) else None


def _resume(folder: RunFolder, net: nn.Module, optimiser: PaperSGD, identity: dict, meta: dict,
            log: Callable[[str], None]) -> tuple[dict, list[dict]]:
    """Continue the folder's run from its checkpoint (same config: run() checked)."""
    state, recorded, _ = folder.open_for_resume()
    position = state["position"]
    folder.check_resume(recorded, 0, 0, position, identity)
    with reading(folder.checkpoint, "checkpoint of this CIFAR-10 net", "delete the run folder to train it afresh"):
        net.load_state_dict(state["model"])
        optimiser.load_state_dict(state["optimizer"])
    entry = {"at": position_text(position), "git": git_state(), "command": meta.get("command")}
    history = folder.resumed(recorded, recorded["config"], position["epoch"], entry)
    log(f"{folder.path}: resumed at {position_text(position)}")
    return position, history


def _diverged(folder: RunFolder, loop: Loop, why: str, log: Callable[[str], None]) -> dict:
    """The loss or the weights became non-finite: the run ends here, recorded as diverged."""
    log(f"  stopped: {why}")
    rows = loop.history
    final = {"epochs": loop.position["epoch"], "steps": loop.position["step"],
             "train_error": rows[-1]["train_error"] if rows else None, "test_error": None,
             "diverged": True, "epochs_to_25": None, "stopped": why}
    folder.finish(final)
    return final


@torch.no_grad()
def evaluate_cifar(net: nn.Module, split: tuple[Tensor, Tensor], mean: Tensor, c: CifarConfig) -> float:
    """Top-1 error on a split (the centre crop when crop=24)."""
    net.eval()
    wrong = total = 0
    for x, y in batches(*split, mean, c, 0, train=False):
        wrong += int((net(x).argmax(1) != y).sum())
        total += len(y)
    net.train()
    return wrong / total


# --- the two experiments: run folders, the learning-rate sweep, summaries, Fig. 1 --------------

def sweep_score(rows: Sequence[dict], final: dict) -> tuple:
    """Order for "as fast as possible" (§3.1): runs reaching 25% training error sooner first,
    then the rest by their last training error; diverged runs last."""
    if final["diverged"]:
        return (2, math.inf)
    reached = epochs_to(error_curve(rows), 0.25)
    return (0, reached) if reached is not None else (1, rows[-1]["train_error"])


def relu_tanh(configs: dict[str, CifarConfig], data: dict, out: Path, *, seeds: Sequence[int],
              lrs: Sequence[float], sweep_epochs: int, meta: dict, log: Callable[[str], None] = print) -> dict:
    """Fig. 1: per activation, pick ε from `lrs` by a short sweep (seed 0, `sweep_epochs`
    epochs), then train every seed at it until 25% training error (or the config's epochs)."""
    meta = meta | {"experiment": "cifar-relu-tanh"}
    summary = {**meta, "threshold": 0.25, "activations": {}}
    for name, base in configs.items():
        sweep = []
        for lr in lrs:
            c = dataclasses.replace(base, lr=lr, epochs=sweep_epochs, seed=0)
            rows, final = run(out / "sweep" / f"{name}-lr{lr:g}", c, data, meta, log=log)
            sweep.append({"lr": lr, "epochs_to_25": final["epochs_to_25"], "train_error": final["train_error"],
                          "diverged": final["diverged"], "score": sweep_score(rows, final)})
        best = min(sweep, key=lambda s: s["score"])["lr"]
        log(f"{name}: ε = {best:g} chosen from {', '.join(f'{s:g}' for s in lrs)}")
        runs = {}
        for seed in seeds:
            folder = out / "runs" / name / f"seed{seed}"
            rows, _ = run(folder, dataclasses.replace(base, lr=best, seed=seed), data, meta, log=log)
            runs[seed] = {"folder": str(folder.relative_to(out)), "epochs_run": len(rows),
                          "epochs_to_25": epochs_to(error_curve(rows), 0.25), "curve": error_curve(rows)}
        for s in sweep:
            s.pop("score")
        summary["activations"][name] = {"lr": best, "sweep": sweep, "runs": runs, "cap": base.epochs}
    summary["ratio"] = _ratio(summary["activations"], seeds)
    plot_fig1(summary, out / "fig1.png")
    return summary


def _ratio(acts: dict, seeds: Sequence[int]) -> dict:
    """tanh's epochs to 25% over ReLU's, per seed (paired by seed) and as mean ± sd; a tanh run
    that never got there gives a lower bound (its epoch cap)."""
    relu, tanh = acts.get("relu"), acts.get("tanh")
    if not relu or not tanh:
        return {}
    per_seed, bound = [], False
    for s in seeds:
        r, t = relu["runs"][s]["epochs_to_25"], tanh["runs"][s]["epochs_to_25"]
        if r is None:
            return {"note": f"ReLU seed {s} never reached 25%: no ratio"}
        if t is None:
            t, bound = tanh["runs"][s]["epochs_run"], True
        per_seed.append(t / r)
    m, sd = mean_sd(per_seed)
    return {"per_seed": per_seed, "mean": m, "sd": sd_to_json(sd), "lower_bound": bound}


def response_norm(configs: dict[str, CifarConfig], data: dict, out: Path, *, seeds: Sequence[int],
                  meta: dict, log: Callable[[str], None] = print) -> dict:
    """§3.3 on CIFAR-10: the same net with and without response normalisation, every seed;
    final test error of each and the difference (paired by seed)."""
    meta = meta | {"experiment": "cifar-lrn"}
    summary = {**meta, "variants": {}}
    for name, c in configs.items():
        runs = {}
        for seed in seeds:
            folder = out / "runs" / name / f"seed{seed}"
            rows, _ = run(folder, dataclasses.replace(c, seed=seed), data, meta, log=log)
            runs[seed] = {"folder": str(folder.relative_to(out)), "test_error": rows[-1]["test_error"],
                          "train_error": rows[-1]["train_error"], "epochs_run": len(rows)}
        errors = [r["test_error"] for r in runs.values()]
        m, sd = mean_sd(errors)
        summary["variants"][name] = {"runs": runs, "test_error_mean": m, "test_error_sd": sd_to_json(sd),
                                     "epochs": c.epochs}
    names = list(configs)
    if len(names) == 2:
        a, b = (summary["variants"][n]["runs"] for n in names)
        diffs = [a[s]["test_error"] - b[s]["test_error"] for s in seeds]
        m, sd = mean_sd(diffs)
        summary["difference"] = {"of": f"{names[0]} − {names[1]}", "per_seed": diffs, "mean": m,
                              "sd": sd_to_json(sd)}
    return summary


def plot_fig1(summary: dict, path: Path) -> None:
    """Training error against epochs as the paper drew it: ReLU solid, tanh dashed (one line
    per seed), with the 25% line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    for name, act in summary["activations"].items():
        for i, run in enumerate(act["runs"].values()):
            x, y = zip(*([(0.0, 0.9)] + [tuple(p) for p in run["curve"]]))
            ax.plot(x, y, "-" if name == "relu" else "--", color="k" if name == "relu" else "tab:blue",
                    lw=1, label=f"{name} (ε = {act['lr']:g})" if i == 0 else None)
    ax.axhline(summary["threshold"], color="grey", lw=0.8, ls=":")
    ax.set_xlabel("Epochs")
    ax.set_ylabel("Training error rate")
    ax.set_ylim(0, 0.8)
    ax.legend()
    ax.set_title(f"CIFAR-10, four-layer net, {len(next(iter(summary['activations'].values()))['runs'])} seeds")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
