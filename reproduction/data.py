"""The loader: packed JPEG sets to the paper's augmented batches on the target device (§2, §4.1).

Reads what `data_prep/` writes (format "alexnet-packed/1"): per split one file of JPEG bytes back
to back (`<split>.jpg.bin`, read through np.memmap), an index of (offset, length, label)
(`<split>.index.npy`), and the training-set statistics (`stats.npz`: the 3×256×256 mean image and
the eigen-decomposition of the 3×3 RGB covariance, both on the 0–255 scale).

Views (§4.1); every view is float32 3×224×224 of mean-centred raw RGB on the 0–255 scale (§2):
- train: a random 224×224 patch of the 256×256 image, reflected with probability 0.5, minus the
  mean, plus PCA lighting. `DataConfig` picks between Krizhevsky's code (cuda-convnet2
  convdata.py, the default) and the literal reading of the text; see `lighting_noise`.
- eval: the centre patch, or the ten patches (four corners, centre, and their reflections),
  N×10×3×224×224, whose softmax outputs `average_softmax` averages.
  Eval views are never scaled by 1/(1 + lighting_std): cuda-convnet2 applies that scale to
  training batches only (its whole colour-noise block is skipped when test=True).

Exact epochs: epoch e visits every image once, in `epoch_order(n, seed, epoch)`; batch k holds
positions [k·B, (k+1)·B) of that order, the last batch may be partial and is kept. Every random
choice (offsets, flips, α) is drawn on the CPU from a generator keyed by (seed, epoch, k), so a run
resumed at `start_batch=k` sees exactly the batches it would have seen, and the CPU path, the CUDA
path and any worker count give the same patches, flips and α.

Replicas (torchrun, see train.py): with `shard=(r, P)` replica r takes the contiguous slice
`shard_range(len(batch), r, P)` of each batch and the draws made for the whole batch, so P
replicas together see exactly the images, patches, flips and α of one process.

CPU path: worker threads read, decode (torchvision.io.decode_jpeg) and augment whole batches.
CUDA path: worker threads read the bytes; the main thread decodes the batch with nvJPEG
(`decode_jpeg(list, device="cuda")`) and augments it with batched tensor ops on a side stream, so
the work for batch k+1 overlaps the training step queued on batch k.
If nvJPEG fails to start (any status torchvision does not handle itself), the CUDA path decodes
on the CPU and copies the batch to the device from then on, and says so once on stderr
(`decoder(device)` names the decoder in use).
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.io import ImageReadMode, decode_jpeg

from reproduction.config import DataConfig
from reproduction.errors import UserError

FORMAT = "alexnet-packed/1"
SIDE = 256  # §2: every image is rescaled to 256 on its shorter side and centre-cropped to 256×256
_ORDER, _AUGMENT = 0, 1  # keys that keep the shuffle's and the augmentation's random streams apart


# ---------------------------------------------------------------------------------------- sets

class UnreadableImages(UserError):
    """The loader met images it cannot decode (a damaged JPEG inside <split>.jpg.bin)."""


def name_undecodable(dataset: "PackedSet", indices: Iterable[int], error: RuntimeError) -> None:
    """After the loader failed with `error` on the images `indices`: raise UnreadableImages
    naming those that cannot be decoded; return (the caller re-raises `error`) if all can."""
    names = (dataset.root / f"{dataset.split}.names.txt").read_text().splitlines()
    bad = []
    for i in indices:
        try:
            decode_jpeg(dataset.encoded([i])[0], mode=ImageReadMode.RGB)
        except RuntimeError:
            bad.append(f"image {i} ({names[i] if i < len(names) else '?'})")
    if bad:
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise UnreadableImages(f"{dataset.root / (dataset.split + '.jpg.bin')}: {', '.join(bad[:5])}{more} cannot be "
                               f"decoded ({str(error).splitlines()[0][:80]}); re-prepare the set from its source "
                               "(python -m data_prep ... --force)") from None


class PackedSet:
    """One split of a packed set. Nothing is read into memory but the index (N×3 int64)."""

    def __init__(self, root: str | os.PathLike, split: str) -> None:
        self.root, self.split = Path(root), split
        manifest_path = self.root / "manifest.json"
        if not manifest_path.is_file():
            raise FileNotFoundError(f"{manifest_path} not found: not a packed set, or its preparation "
                                    "has not finished (the manifest is written last)")
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("format") != FORMAT:
            raise ValueError(f"{manifest_path}: format {manifest.get('format')!r} is not {FORMAT!r}, "
                             "the only packed format this loader reads")
        splits = manifest.get("splits", {})
        if split not in splits:
            raise ValueError(f"{self.root} has no split {split!r}; it has {sorted(splits)}")
        self.manifest = manifest
        self.classes = manifest.get("classes")
        if not isinstance(self.classes, list) or not self.classes:
            raise ValueError(f"{manifest_path}: 'classes' must be a non-empty list")
        self.image_size = int(manifest["image_size"])
        if not 1 <= self.image_size <= SIDE:
            raise ValueError(f"{manifest_path}: image_size {self.image_size} must be in [1, {SIDE}]")

        index = np.load(self.root / f"{split}.index.npy")
        if index.ndim != 2 or index.shape[1] != 3 or index.dtype != np.int64:
            raise ValueError(f"{split}.index.npy must be int64 N×3 (offset, length, label), "
                             f"got {index.dtype} {index.shape}")
        count = splits[split].get("count")
        if count is not None and count != len(index):
            raise ValueError(f"{split}.index.npy has {len(index)} rows, the manifest says {count}")
        offsets, lengths, labels = index.T
        bad = np.flatnonzero((labels < 0) | (labels >= len(self.classes)))
        if bad.size:
            raise ValueError(f"{split} image {bad[0]} has label {labels[bad[0]]}, outside the "
                             f"manifest's {len(self.classes)} classes [0, {len(self.classes) - 1}] "
                             f"({bad.size} such images)")
        path = self.root / f"{split}.jpg.bin"
        # np.memmap refuses empty files; an empty split has nothing to map
        self._bytes = np.memmap(path, dtype=np.uint8, mode="r") if path.stat().st_size else np.zeros(0, np.uint8)
        if len(index) and ((lengths <= 0).any() or (offsets < 0).any()
                           or (offsets + lengths).max() > len(self._bytes)):
            raise ValueError(f"{split}.index.npy points outside {split}.jpg.bin "
                             f"({len(self._bytes)} bytes), or has an empty entry")
        self.offsets, self.lengths = offsets, lengths
        self.labels = torch.from_numpy(labels.copy())

    def __len__(self) -> int:
        return len(self.labels)

    def encoded(self, indices: Tensor | Iterable[int]) -> list[Tensor]:
        """The JPEG bytes of images `indices`, one 1-D uint8 tensor each (copied out of the map)."""
        indices = indices.tolist() if isinstance(indices, Tensor) else indices
        return [torch.from_numpy(np.array(self._bytes[self.offsets[i]:self.offsets[i] + self.lengths[i]]))
                for i in indices]

    def __repr__(self) -> str:
        return (f"PackedSet({str(self.root)!r}, {self.split!r}: {len(self)} images, "
                f"{len(self.classes)} classes, stored at {self.image_size} px)")


@dataclass(frozen=True)
class Stats:
    """Training-set statistics (§2, §4.1), all on the 0–255 scale, RGB."""
    mean: Tensor    # float32 3×256×256: the per-pixel mean image
    eigval: Tensor  # float64 (3,): eigenvalues of the RGB covariance, ascending
    eigvec: Tensor  # float64 3×3: column j is the eigenvector of eigval[j]; rows R, G, B


def load_stats(root: str | os.PathLike) -> Stats:
    """`root`/stats.npz, checked: a 3×256×256 mean, eigval >= 0, orthonormal eigvec."""
    path = Path(root) / "stats.npz"
    with np.load(path) as f:
        mean, eigval, eigvec = f["mean"], f["eigval"], f["eigvec"]
    if mean.shape != (3, SIDE, SIDE):
        raise ValueError(f"{path}: mean must be 3×{SIDE}×{SIDE}, got {mean.shape}")
    if eigval.shape != (3,) or eigvec.shape != (3, 3) or (eigval < 0).any():
        raise ValueError(f"{path}: eigval must be 3 values >= 0 and eigvec 3×3, "
                         f"got {eigval} and shape {eigvec.shape}")
    if not np.allclose(eigvec.T @ eigvec, np.eye(3), atol=1e-4):
        raise ValueError(f"{path}: eigvec is not orthonormal")
    return Stats(torch.from_numpy(mean.astype(np.float32)), torch.from_numpy(eigval.astype(np.float64)),
                 torch.from_numpy(eigvec.astype(np.float64)))


# --------------------------------------------------------------------------------- randomness

def _generator(*keys: int) -> torch.Generator:
    """A CPU generator whose seed mixes `keys` (SeedSequence hashing), so nearby keys give
    unrelated streams. Keys must be integers >= 0."""
    seed = np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(seed))


def epoch_order(n: int, *, seed: int, epoch: int) -> Tensor:
    """The order in which epoch `epoch` visits the n training images: a permutation, so every
    image is used once per epoch. The same for the same (seed, epoch) under one torch version."""
    return torch.randperm(n, generator=_generator(seed, _ORDER, epoch))


@dataclass(frozen=True)
class Draws:
    """The random choices for one training batch, made on the CPU (§4.1)."""
    top: Tensor    # int64 (B,): patch row offset in [0, 256 − crop]
    left: Tensor   # int64 (B,): patch column offset
    flip: Tensor   # bool (B,): horizontal reflection
    alpha: Tensor  # float64 B×3: α_i ~ N(0, lighting_std), one triple per image per use


def draw_train(n: int, config: DataConfig, *, seed: int, epoch: int, batch: int) -> Draws:
    """Draws for batch `batch` of epoch `epoch`. All four are drawn whatever the config, so turning
    one augmentation off leaves the others' draws unchanged."""
    g = _generator(seed, _AUGMENT, epoch, batch)
    # §4.1: all 33×33 offsets of a 224 patch in a 256 image, 0..32 inclusive, as cuda-convnet2's
    # DecoderThread::crop draws them (rand % (border + 1)). The text's "factor of 2048" = 32·32·2
    # counts 32 per axis; the code, which decides what the text leaves loose, has 33.
    offsets = torch.randint(0, SIDE - config.crop + 1, (n, 2), generator=g)
    flip = torch.rand(n, generator=g) < 0.5
    alpha = torch.randn(n, 3, generator=g, dtype=torch.float64) * config.lighting_std
    return Draws(offsets[:, 0], offsets[:, 1], flip & config.flip, alpha)


def lighting_noise(alpha: Tensor, stats: Stats, config: DataConfig) -> Tensor:
    """§4.1's colour shift [p1 p2 p3]·[α1λ1 α2λ2 α3λ3]ᵀ per image (B×3, 0–255 units).

    "code" (cuda-convnet2 convdata.py): λ_i replaced by σ_i = √λ_i of the 0–255 covariance, i.e.
    (z ⊙ σ)·Vᵀ·0.1. "paper": λ_i the eigenvalues of the covariance of pixels scaled to [0, 1]
    (λ/255²), the shift added on that scale, so 255·V(α ⊙ λ/255²) = V(α ⊙ λ/255) in 0–255 units.
    Either way `view_batch` then scales the whole image by 1/(1 + lighting_std) when
    `lighting_rescale` is set (cuda-convnet2's habit; the text has no rescaling).
    """
    if config.lighting == "code":
        # DEVIATION(§4.1): the text says eigenvalues; Krizhevsky's code scales by √λ on 0–255.
        return (alpha * stats.eigval.sqrt()) @ stats.eigvec.T
    if config.lighting == "paper":
        return (alpha * stats.eigval / 255.0) @ stats.eigvec.T
    return torch.zeros_like(alpha)


# --------------------------------------------------------------------------------------- views

def crop_patches(images: Tensor, top: Tensor, left: Tensor, flip: Tensor, size: int,
                 channels_last: bool = False) -> Tensor:
    """Patch i = images[i] cut size×size at (top[i], left[i]), reflected left-right where flip[i].
    Pure selection (two gathers), so it is exact and identical on every device.
    images: N×C×H×W, or C×H×W shared by every patch (the mean image). channels_last: the
    patches are gathered in N×H×W×C memory (what the fast step wants), the same values."""
    d, n = images.device, len(top)
    if images.dim() == 3:
        images = images.expand(n, *images.shape)
    ar = torch.arange(size, device=d)
    rows = top.to(d)[:, None] + ar                                            # N×size
    cols = left.to(d)[:, None] + torch.where(flip.to(d)[:, None], ar.flip(0), ar)
    c, w = images.shape[1], images.shape[3]
    if channels_last:  # the same gathers over an N×H×W×C view
        x = torch.gather(images.permute(0, 2, 3, 1), 1, rows[:, :, None, None].expand(n, size, w, c))
        return torch.gather(x, 2, cols[:, None, :, None].expand(n, size, size, c)).permute(0, 3, 1, 2)
    x = torch.gather(images, 2, rows[:, None, :, None].expand(n, c, size, w))
    return torch.gather(x, 3, cols[:, None, None, :].expand(n, c, size, size))


def ten_patch_offsets(crop: int) -> list[tuple[int, int, bool]]:
    """§4.1 test views as (top, left, flip): the four corners, the centre, then their reflections."""
    m = SIDE - crop
    five = [(0, 0), (0, m), (m, 0), (m, m), (m // 2, m // 2)]
    return [(t, l, f) for f in (False, True) for t, l in five]


def upsample(images: Tensor) -> Tensor:
    """Images stored below 256 px → float 256×256; 256 px images are returned as they are."""
    if images.shape[-1] == SIDE:
        return images
    # DEVIATION(§2): the paper's images are at least 256 px; small sets are stored at native size
    # and upsampled here
    return F.interpolate(images.float(), size=(SIDE, SIDE), mode="bilinear", align_corners=False,
                         antialias=False)


def view_batch(images: Tensor, mean: Tensor, config: DataConfig, top: Tensor, left: Tensor,
               flip: Tensor, noise: Tensor | None = None, channels_last: bool = False) -> Tensor:
    """Decoded images N×3×S×S (uint8, or float from `upsample`) → float32 N×3×crop×crop views at
    (top, left, flip), mean-centred, with lighting `noise` (N×3, 0–255 units) added when given;
    in channels_last memory if asked (the values do not change)."""
    x = crop_patches(upsample(images), top, left, flip, config.crop, channels_last).float()
    if config.mean == "centre":
        # cuda-convnet2 subtracts the mean image's centre patch whatever the patch's offset
        # (and after the reflection); §2 does not say which part of the mean a patch gets.
        m = (SIDE - config.crop) // 2
        x -= mean[:, m:m + config.crop, m:m + config.crop]
    else:  # "offset": the 256×256 mean subtracted first, then cut and reflected with the image
        x -= crop_patches(mean, top, left, flip, config.crop)
    if noise is not None and config.lighting != "none":
        x += noise.to(x.device, torch.float32)[:, :, None, None]
        if config.lighting_rescale:
            # DEVIATION(§4.1): not in the text; cuda-convnet2 scales noisy training images by
            # 1/(1 + 0.1) "so that the overall scale of the training data doesn't become too
            # different from the test data". Test images are not scaled (as in its code).
            x *= 1.0 / (1.0 + config.lighting_std)
    return x


def average_softmax(logits: Tensor) -> Tensor:
    """§4.1: average the softmax outputs over views. logits N×V×C → probabilities N×C.
    For ten-patch batches: average_softmax(model(x.flatten(0, 1)).unflatten(0, x.shape[:2]))."""
    return logits.float().softmax(dim=-1).mean(dim=1)


# ------------------------------------------------------------------------------------ batches

def num_batches(n: int, batch_size: int) -> int:
    """Batches per pass over n images; the last, partial batch is kept."""
    return math.ceil(n / batch_size)


def shard_range(n: int, rank: int, world: int) -> tuple[int, int]:
    """Replica `rank`'s part [start, stop) of a batch of n images split between `world`
    replicas: contiguous, the first n mod world replicas one image more (torch.tensor_split's
    rule). A replica's part is empty when n < world (the end of an epoch)."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside [0, {world})")
    size, extra = divmod(n, world)
    start = rank * size + min(rank, extra)
    return start, start + size + (rank < extra)


def train_batches(dataset: PackedSet, stats: Stats, config: DataConfig, *, batch_size: int,
                  seed: int, epoch: int, device: str | torch.device = "cpu", start_batch: int = 0,
                  workers: int | None = None, shard: tuple[int, int] = (0, 1),
                  channels_last: bool = False) -> Iterator[tuple[Tensor, Tensor]]:
    """Epoch `epoch` as (images B×3×crop×crop float32, labels B int64) on `device`, from batch
    `start_batch` on (resume). workers: threads (None: `default_workers(device)`; 0: none);
    results do not depend on it. shard=(rank, world): this replica's slice of every batch
    (`shard_range`), with the draws the whole batch gets; batch_size is the global batch.
    channels_last: the images in channels_last memory, made so by the workers (same values)."""
    _check_args(dataset, batch_size, workers, seed=seed, epoch=epoch)
    rank, world = shard
    shard_range(0, rank, world)  # checks the shard
    n = num_batches(len(dataset), batch_size)
    if not 0 <= start_batch <= n:
        raise ValueError(f"start_batch {start_batch} outside [0, {n}] for {len(dataset)} images "
                         f"in batches of {batch_size}")
    order = epoch_order(len(dataset), seed=seed, epoch=epoch)

    def plan(k: int):
        idx = order[k * batch_size:(k + 1) * batch_size]
        d = draw_train(len(idx), config, seed=seed, epoch=epoch, batch=k)  # for the whole batch
        part = slice(*shard_range(len(idx), rank, world))  # then sliced, never redrawn
        noise = lighting_noise(d.alpha, stats, config).float()
        return idx[part], [dict(top=d.top[part], left=d.left[part], flip=d.flip[part], noise=noise[part])]

    return _deliver(dataset, stats, config, map(plan, range(start_batch, n)), device, workers, channels_last)


def eval_batches(dataset: PackedSet, stats: Stats, config: DataConfig, *, batch_size: int,
                 device: str | torch.device = "cpu", ten_patch: bool = False,
                 workers: int | None = None, shard: tuple[int, int] = (0, 1),
                 channels_last: bool = False) -> Iterator[tuple[Tensor, Tensor]]:
    """The split in stored order as (images, labels): images B×3×crop×crop (the centre patch), or
    B×10×3×crop×crop with ten_patch (views in `ten_patch_offsets` order; with channels_last,
    flattened to (B·10)×3×crop×crop it is channels_last). batch_size counts images;
    no lighting and no 1/(1 + lighting_std) scale (cuda-convnet2 applies both to training only).
    shard=(rank, world): batches k ≡ rank (mod world) only, so replicas together see every image
    once, in the batches one process would form."""
    _check_args(dataset, batch_size, workers)
    rank, world = shard
    shard_range(0, rank, world)  # checks the shard
    offsets = ten_patch_offsets(config.crop)
    offsets = offsets if ten_patch else offsets[4:5]

    def plan(k: int):
        idx = torch.arange(k * batch_size, min((k + 1) * batch_size, len(dataset)))
        full = lambda v: torch.full((len(idx),), v)
        return idx, [dict(top=full(t), left=full(l), flip=full(f)) for t, l, f in offsets]

    plans = map(plan, range(rank, num_batches(len(dataset), batch_size), world))
    return _deliver(dataset, stats, config, plans, device, workers, channels_last)


def default_workers(device: str | torch.device = "cuda") -> int:
    """Loader threads when none are asked for. For a GPU step: one per core, at most 8. For a
    CPU step the loader shares the cores with it: one thread per 4 cores (at least one), since
    a batch of 64-256 px JPEGs takes a few % of a CPU step to build and more threads only take
    cores from the step's own (its intra-op threads)."""
    cores = os.cpu_count() or 1
    return max(1, cores // 4) if torch.device(device).type == "cpu" else min(8, cores)


def _check_args(dataset: PackedSet, batch_size: int, workers: int | None, **keys: int) -> None:
    if not isinstance(dataset, PackedSet):
        raise TypeError(f"dataset must be a PackedSet, got {type(dataset).__name__}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if workers is not None and workers < 0:
        raise ValueError(f"workers must be >= 0 (0: no threads), got {workers}")
    for name, value in keys.items():
        if not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {value!r}")


_CPU_DECODE: dict[torch.device, str] = {}  # CUDA devices whose nvJPEG failed: why (see _decode)


def decoder(device: str | torch.device) -> str:
    """Which decoder this process's batches for `device` use: for bench headers and records."""
    device = torch.device(device)
    if device.type == "cpu":
        return "CPU (libjpeg-turbo)"
    why = _CPU_DECODE.get(device)
    return "nvJPEG" if why is None else f"CPU + copy (nvJPEG failed: {why})"


def _decode(data: list[Tensor], idx: Tensor, size: int, device: torch.device) -> Tensor:
    if device.type != "cpu":
        if device not in _CPU_DECODE:
            try:
                return _stacked(decode_jpeg(data, mode=ImageReadMode.RGB, device=device), idx, size)
            except RuntimeError as e:
                # torchvision leaves the hardware decoder for the default one only on status
                # ARCH_MISMATCH; any other status at nvJPEG's start (a library it cannot load, no
                # free engine) raises, and every loader would die with it. The same bytes decoded
                # on the CPU tell the cases apart: a corrupt image fails there too, with its error.
                images = _decode(data, idx, size, torch.device("cpu"))
                why = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
                _CPU_DECODE[device] = why
                print(f"warning: nvJPEG failed on {device} ({why}); decoding on the CPU and copying "
                      "each batch to the device from now on (slower: loader numbers are not nvJPEG's)",
                      file=sys.stderr, flush=True)
                return images.to(device)
        return _decode(data, idx, size, torch.device("cpu")).to(device)
    return _stacked(decode_jpeg(data, mode=ImageReadMode.RGB), idx, size)


def _stacked(images: list[Tensor], idx: Tensor, size: int) -> Tensor:
    for i, image in zip(idx.tolist(), images):
        if image.shape != (3, size, size):
            raise ValueError(f"image {i} decodes to {tuple(image.shape)}, not the manifest's "
                             f"3×{size}×{size}")
    # The CPU decoder returns channel-last pixels seen as 3×H×W: stacking them as they lie is a
    # plain copy (3× faster than a transposing one); the batch is a B×3×H×W view of B×H×W×3.
    # The views are cut by gathers, so the layout changes no value (on CUDA it costs nothing).
    return torch.stack([image.permute(1, 2, 0) for image in images]).permute(0, 3, 1, 2)


def _deliver(dataset: PackedSet, stats: Stats, config: DataConfig, plans: Iterator, device,
             workers: int | None, channels_last: bool = False) -> Iterator[tuple[Tensor, Tensor]]:
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda, got {device}")
    workers = default_workers(device) if workers is None else workers
    mean = stats.mean.to(device)

    def build(data: list[Tensor], idx: Tensor, views: list[dict]) -> tuple[Tensor, Tensor]:
        if not len(idx):  # a replica's empty part of a short last batch
            patches = (3, config.crop, config.crop) if len(views) == 1 else (len(views), 3, config.crop, config.crop)
            return torch.zeros(0, *patches, device=device), dataset.labels[idx].to(device)
        images = upsample(_decode(data, idx, dataset.image_size, device))  # once for all views
        out = [view_batch(images, mean, config, **v, channels_last=channels_last) for v in views]
        if len(out) == 1:
            images = out[0]
        elif channels_last:  # B×10×crop×crop×3 memory, so that flatten(0, 1) is channels_last
            images = torch.stack([o.permute(0, 2, 3, 1) for o in out], dim=1).permute(0, 1, 4, 2, 3)
        else:
            images = torch.stack(out, dim=1)  # B×10×3×crop×crop
        return images, dataset.labels[idx].to(device)

    if device.type == "cpu":  # the workers do everything
        return _prefetch(lambda p: build(dataset.encoded(p[0]), *p), plans, workers)
    # CUDA: the workers read bytes; the main thread decodes and augments on a side stream
    side = _SideStream(device)
    hosts = _prefetch(lambda p: (dataset.encoded(p[0]), *p), plans, workers)
    return (side.run(lambda: build(*h)) for h in hosts)


def _prefetch(fn: Callable, items: Iterator, workers: int) -> Iterator:
    """map(fn, items) in order, with up to 2·workers calls running ahead on threads."""
    if workers == 0:
        yield from map(fn, items)
        return
    pool, pending = ThreadPoolExecutor(workers, initializer=_one_thread_per_worker), deque()
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _one_thread_per_worker() -> None:
    # The workers already use every core; intra-op threads on top of them oversubscribe, and on
    # the 2-core test machine OpenMP then stalls batches for up to a second. With OpenMP (the
    # release builds) this setting belongs to the calling thread, so the trainer keeps its own.
    if "OpenMP" in torch.__config__.parallel_info():
        torch.set_num_threads(1)


class _SideStream:
    """Runs batch building on a side CUDA stream; the consumer's stream waits for it only when it
    uses the batch, so building batch k+1 overlaps the compute queued on batch k."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.stream = device, torch.cuda.Stream(device)
        self.stream.wait_stream(torch.cuda.current_stream(device))  # the mean image is resident

    def run(self, build: Callable[[], tuple[Tensor, ...]]) -> tuple[Tensor, ...]:
        # nvJPEG's hardware decoder writes its outputs without waiting for work queued on the
        # stream, and the caching allocator may hand it a block freed on this stream that such
        # work still reads (pytorch/vision PR 9606): drain the stream on the host first.
        # Kept on purpose (an event was considered instead): a stream.wait_event orders only
        # kernels queued after it, which is exactly what the hardware decoder ignores, so only a
        # host-side wait keeps it off the previous batch's freed temporaries. The wait is for the
        # previous batch's augmentation alone (the step runs on the consumer stream), queued a
        # step earlier; the host still runs one batch ahead of the device.
        self.stream.synchronize()
        with torch.cuda.stream(self.stream):
            out = build()
        consumer = torch.cuda.current_stream(self.device)
        consumer.wait_stream(self.stream)
        for t in out:
            t.record_stream(consumer)  # freed by the consumer: not reused before its work is done
        return out
