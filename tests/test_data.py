"""The loader (reproduction/data.py): the §4.1 train and test views, PCA lighting, mean
subtraction, exact and resumable epochs, the packed format's checks, and CPU/CUDA agreement.

Every set here is packed inside the test by `pack_set` (tests/packing.py: the data_prep contract,
JPEG via PIL).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from packing import EIGVAL, EIGVEC, encode, pack_set  # tests/packing.py: the data_prep contract
from reproduction.config import DataConfig
from reproduction.data import (PackedSet, Stats, average_softmax, crop_patches, draw_train,
                               epoch_order, eval_batches, lighting_noise, load_stats, num_batches,
                               ten_patch_offsets, train_batches, upsample, view_batch)

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities")

NONE = DataConfig(lighting="none")


# ------------------------------------------------------------------------------------ helpers

def coordinate_image(size: int = 256) -> np.ndarray:
    """R = row, G = column, B = 128: every pixel says where it is."""
    r, c = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    return np.stack([r, c, np.full_like(r, 128)], axis=-1).astype(np.uint8)


def constant_image(rgb, size: int = 256) -> np.ndarray:
    return np.broadcast_to(np.array(rgb, np.uint8), (size, size, 3)).copy()


def expected_patch(top: int, left: int, flip: bool, crop: int = 224) -> tuple[np.ndarray, np.ndarray]:
    """The rows and columns of the source image that a patch's pixels show."""
    rows = top + np.arange(crop)
    cols = left + (np.arange(crop)[::-1] if flip else np.arange(crop))
    return rows, cols


@pytest.fixture(scope="module")
def coord_set(tmp_path_factory):
    items = [(coordinate_image(), 0)] * 6
    root = pack_set(tmp_path_factory.mktemp("coord"), {"train": items, "val": items}, num_classes=1)
    return PackedSet(root, "train"), load_stats(root)


@pytest.fixture(scope="module")
def numbered_set(tmp_path_factory):
    """37 images, image i has label i (so a batch's labels say which images it holds)."""
    items = [(constant_image((7 * i % 256, 100, 200 - 5 * i)), i) for i in range(37)]
    root = pack_set(tmp_path_factory.mktemp("numbered"), {"train": items}, num_classes=37)
    return PackedSet(root, "train"), load_stats(root)


# --------------------------------------------------------------------------- views (§4.1)

def test_crop_patches_cut_and_reflect_exactly():
    r, c = torch.meshgrid(torch.arange(256.0), torch.arange(256.0), indexing="ij")
    images = torch.stack([r, c, r * 0]).expand(4, 3, 256, 256)
    top, left, flip = torch.tensor([0, 32, 5, 16]), torch.tensor([32, 0, 27, 16]), torch.tensor([False, True, True, False])
    out = crop_patches(images, top, left, flip, 224)
    assert out.shape == (4, 3, 224, 224)
    for i in range(4):
        rows, cols = expected_patch(int(top[i]), int(left[i]), bool(flip[i]))
        assert torch.equal(out[i, 0], torch.tensor(rows, dtype=torch.float32)[:, None].expand(224, 224))
        assert torch.equal(out[i, 1], torch.tensor(cols.copy(), dtype=torch.float32)[None, :].expand(224, 224))
    # the reflection of a patch is the patch read right to left
    assert torch.equal(out[1], crop_patches(images[:1], top[1:2], left[1:2], torch.tensor([False]), 224)[0].flip(-1))


def test_ten_patch_offsets_are_the_corners_the_centre_and_their_reflections():
    five = [(0, 0), (0, 32), (32, 0), (32, 32), (16, 16)]
    assert ten_patch_offsets(224) == [(t, l, False) for t, l in five] + [(t, l, True) for t, l in five]


def test_ten_patch_views_show_the_right_pixels(coord_set):
    dataset, stats = coord_set
    (x, y), = list(eval_batches(dataset, stats, NONE, batch_size=8, ten_patch=True, workers=0))
    assert x.shape == (6, 10, 3, 224, 224) and x.dtype == torch.float32 and y.tolist() == [0] * 6
    for v, (top, left, flip) in enumerate(ten_patch_offsets(224)):
        rows, cols = expected_patch(top, left, flip)
        assert (x[:, v, 0] - torch.tensor(rows, dtype=torch.float32)[:, None]).abs().max() <= 4  # JPEG: a level or three
        assert (x[:, v, 1] - torch.tensor(cols.copy(), dtype=torch.float32)[None, :]).abs().max() <= 4
    (centre, _), = list(eval_batches(dataset, stats, NONE, batch_size=8, workers=0))
    assert torch.equal(centre, x[:, 4])


def test_random_offsets_are_uniform_over_the_33_positions_and_flips_half():
    n = 33 * 400
    d = draw_train(n, DataConfig(), seed=3, epoch=0, batch=0)
    for offsets in (d.top, d.left):
        counts = torch.bincount(offsets, minlength=33)
        assert len(counts) == 33 and offsets.min() == 0 and offsets.max() == 32
        assert (counts - 400).abs().max() < 100  # ±25%: 5 standard deviations of a count
    assert abs(d.flip.double().mean().item() - 0.5) < 0.02  # 4.6 standard deviations
    no_flip = draw_train(n, DataConfig(flip=False), seed=3, epoch=0, batch=0)
    assert not no_flip.flip.any() and torch.equal(no_flip.top, d.top) and torch.equal(no_flip.alpha, d.alpha)


def test_train_views_follow_the_draws(coord_set):
    dataset, stats = coord_set
    batches = list(train_batches(dataset, stats, NONE, batch_size=4, seed=1, epoch=2, workers=0))
    assert [len(y) for _, y in batches] == [4, 2]  # the last, partial batch is kept
    assert batches[0][0].shape == (4, 3, 224, 224)
    assert batches[0][0].dtype == torch.float32 and batches[0][1].dtype == torch.int64
    for k, (x, _) in enumerate(batches):
        d = draw_train(len(x), NONE, seed=1, epoch=2, batch=k)
        for i in range(len(x)):
            rows, cols = expected_patch(int(d.top[i]), int(d.left[i]), bool(d.flip[i]))
            assert (x[i, 0] - torch.tensor(rows, dtype=torch.float32)[:, None]).abs().max() <= 4
            assert (x[i, 1] - torch.tensor(cols.copy(), dtype=torch.float32)[None, :]).abs().max() <= 4


# ------------------------------------------------------------------ mean and lighting (§2, §4.1)

@pytest.mark.parametrize("form", ["centre", "offset"])
def test_mean_subtraction_centre_patch_or_at_the_offset(tmp_path, form):
    r, c = np.meshgrid(np.arange(256.0), np.arange(256.0), indexing="ij")
    mean = np.stack([r / 2, c / 2, r * 0])  # the mean image says where it is
    root = pack_set(tmp_path, {"train": [(constant_image((200, 200, 200)), 0)] * 8}, num_classes=1, mean=mean)
    config = DataConfig(mean=form, lighting="none")
    (x, _), = list(train_batches(PackedSet(root, "train"), load_stats(root), config, batch_size=8,
                                 seed=0, epoch=0, workers=0))
    d = draw_train(8, config, seed=0, epoch=0, batch=0)
    assert len(set(d.top.tolist())) > 1  # the offsets differ, so the two forms differ
    for i in range(8):
        if form == "centre":  # cuda-convnet2: the centre patch of the mean, never reflected
            rows, cols = expected_patch(16, 16, False)
        else:
            rows, cols = expected_patch(int(d.top[i]), int(d.left[i]), bool(d.flip[i]))
        assert (x[i, 0] - (200 - torch.tensor(rows / 2, dtype=torch.float32)[:, None])).abs().max() <= 1
        assert (x[i, 1] - (200 - torch.tensor(cols / 2, dtype=torch.float32)[None, :])).abs().max() <= 1
        assert x[i, 2].sub(200).abs().max() <= 1


def _stats() -> Stats:
    return Stats(torch.zeros(3, 256, 256), torch.from_numpy(EIGVAL), torch.from_numpy(EIGVEC))


@pytest.mark.parametrize("form", ["code", "paper"])
def test_lighting_noise_has_mean_zero_and_the_configured_covariance(form):
    config, n = DataConfig(lighting=form), 100_000
    alpha = draw_train(n, config, seed=5, epoch=0, batch=0).alpha
    noise = lighting_noise(alpha, _stats(), config).numpy()
    # code: 0.1²·V diag(σ²) Vᵀ (σ² = λ on 0–255); paper: 0.1²·V diag((λ/255)²) Vᵀ in 0–255 units
    scale = EIGVAL if form == "code" else (EIGVAL / 255) ** 2
    expected = 0.01 * EIGVEC @ np.diag(scale) @ EIGVEC.T
    sd = np.sqrt(np.diag(expected))
    assert (np.abs(noise.mean(0)) < 5 * sd / np.sqrt(n)).all()
    cov = np.cov(noise, rowvar=False)
    assert np.linalg.norm(cov - expected) < 0.03 * np.linalg.norm(expected)
    wrong_v = 0.01 * EIGVEC.T @ np.diag(scale) @ EIGVEC  # what a transposed V would give
    assert np.linalg.norm(cov - wrong_v) > 0.2 * np.linalg.norm(expected)


def test_code_lighting_is_added_to_the_centred_image_then_scaled_by_1_over_1_1(numbered_set):
    dataset, stats = numbered_set
    config = DataConfig()
    assert config.lighting == "code" and config.lighting_std == 0.1
    order = epoch_order(len(dataset), seed=9, epoch=0)
    (x, y), *_ = list(train_batches(dataset, stats, config, batch_size=16, seed=9, epoch=0, workers=0))
    d = draw_train(16, config, seed=9, epoch=0, batch=0)
    noise = lighting_noise(d.alpha, stats, config).float()
    colours = torch.tensor([[7 * i % 256, 100, 200 - 5 * i] for i in order[:16].tolist()], dtype=torch.float32)
    expected = (colours + noise) / 1.1  # the mean image is zero in this set
    assert (x.mean(dim=(2, 3)) - expected).abs().max() < 1.5  # JPEG: ±1 on a constant
    assert x.std(dim=(2, 3)).max() < 1.0  # the shift is the same for every pixel of an image


def test_eval_views_have_no_lighting_and_no_rescaling(numbered_set):
    dataset, stats = numbered_set
    (x, y), *_ = list(eval_batches(dataset, stats, DataConfig(), batch_size=16, workers=0))
    colours = torch.tensor([[7 * i % 256, 100, 200 - 5 * i] for i in y.tolist()], dtype=torch.float32)
    assert (x.mean(dim=(2, 3)) - colours).abs().max() < 1.5


def test_eval_visits_the_split_once_in_stored_order(numbered_set):
    dataset, stats = numbered_set
    for ten_patch in (False, True):
        batches = list(eval_batches(dataset, stats, NONE, batch_size=16, ten_patch=ten_patch, workers=2))
        assert [len(y) for _, y in batches] == [16, 16, 5]
        assert torch.cat([y for _, y in batches]).tolist() == list(range(37))
        assert batches[-1][0].shape == ((5, 10, 3, 224, 224) if ten_patch else (5, 3, 224, 224))


def test_average_softmax_matches_a_hand_computation():
    logits = torch.tensor([[[0.0, math.log(3)], [math.log(2), 0.0]]])  # one image, two views
    # view 1: softmax = [1/4, 3/4]; view 2: [2/3, 1/3]; average [11/24, 13/24]
    assert torch.allclose(average_softmax(logits), torch.tensor([[11 / 24, 13 / 24]]))
    x = torch.randn(5, 10, 7)
    probs = average_softmax(x)
    assert probs.shape == (5, 7) and torch.allclose(probs.sum(-1), torch.ones(5))


# ------------------------------------------------------------------------ epochs and resuming

def _epoch(dataset, stats, **kwargs):
    args = dict(batch_size=8, seed=11, epoch=0, workers=0) | kwargs
    return list(train_batches(dataset, stats, DataConfig(), **args))


def test_same_seed_and_epoch_give_the_same_batches_whatever_the_workers(numbered_set):
    a, b = _epoch(*numbered_set), _epoch(*numbered_set, workers=2)
    assert len(a) == num_batches(37, 8) == 5
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(ya, yb) and torch.equal(xa, xb)


def test_every_image_once_per_epoch_and_a_new_order_each_epoch(numbered_set):
    orders = []
    for epoch in (0, 1):
        labels = torch.cat([y for _, y in _epoch(*numbered_set, epoch=epoch)])
        assert sorted(labels.tolist()) == list(range(37))
        orders.append(labels.tolist())
    assert orders[0] != orders[1]
    assert orders[0] == epoch_order(37, seed=11, epoch=0).tolist()
    assert orders[0] != epoch_order(37, seed=12, epoch=0).tolist()


def test_resuming_at_start_batch_gives_the_rest_of_the_epoch(numbered_set):
    full = _epoch(*numbered_set, epoch=3)
    resumed = _epoch(*numbered_set, epoch=3, start_batch=2)
    assert len(resumed) == len(full) - 2
    for (xa, ya), (xb, yb) in zip(full[2:], resumed):
        assert torch.equal(ya, yb) and torch.equal(xa, xb)
    with pytest.raises(ValueError, match="start_batch"):
        _epoch(*numbered_set, start_batch=6)


# ---------------------------------------------------------------------- the packed format

def test_labels_outside_the_manifest_classes_are_refused(tmp_path):
    root = pack_set(tmp_path, {"train": [(constant_image((1, 2, 3), 32), 0), (constant_image((1, 2, 3), 32), 3)]},
                    num_classes=3)
    with pytest.raises(ValueError, match=r"image 1 has label 3, outside the manifest's 3 classes"):
        PackedSet(root, "train")


def test_wrong_format_missing_manifest_and_unknown_split_are_refused(tmp_path):
    items = {"train": [(constant_image((1, 2, 3), 32), 0)]}
    root = pack_set(tmp_path / "old", items, num_classes=1, fmt="alexnet-packed/0")
    with pytest.raises(ValueError, match="format 'alexnet-packed/0' is not 'alexnet-packed/1'"):
        PackedSet(root, "train")
    root = pack_set(tmp_path / "ok", items, num_classes=1)
    with pytest.raises(ValueError, match=r"no split 'val'; it has \['train'\]"):
        PackedSet(root, "val")
    (root / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match="the manifest is written last"):
        PackedSet(root, "train")


def test_small_images_are_upsampled_bilinearly_to_256(tmp_path):
    ramp = coordinate_image(32) * np.array([8, 8, 1], np.uint8)  # R = 8·row, G = 8·column
    root = pack_set(tmp_path, {"val": [(ramp, 0)]}, num_classes=1)
    dataset = PackedSet(root, "val")
    assert dataset.image_size == 32
    (x, _), = list(eval_batches(dataset, load_stats(root), NONE, batch_size=1, workers=0))
    assert x.shape == (1, 3, 224, 224)
    # the reference: the decoded 32 px image through F.interpolate, then the centre patch
    decoded = decode_jpeg(dataset.encoded([0])[0], mode=ImageReadMode.RGB).float()[None]
    ref = F.interpolate(decoded, size=(256, 256), mode="bilinear", align_corners=False)[..., 16:240, 16:240]
    assert torch.allclose(x, ref, atol=1e-4)
    # and what it means: output column X shows input column (X + 0.5)/8 − 0.5, i.e. G ≈ X − 3.5
    cols = torch.arange(16, 240, dtype=torch.float32)
    assert (x[0, 1, 100] - (cols - 3.5)).abs().max() < 2.5
    stored_at_256 = torch.zeros(2, 3, 256, 256, dtype=torch.uint8)
    assert upsample(stored_at_256) is stored_at_256  # 256 px sets are not resampled


def test_data_config_rejects_unknown_forms():
    with pytest.raises(ValueError, match="'code', 'paper' or 'none'"):
        DataConfig(lighting="fancy")
    with pytest.raises(ValueError, match="'centre' or 'offset'"):
        DataConfig(mean="center")
    with pytest.raises(ValueError, match=r"an integer in \[1, 256\]"):
        DataConfig(crop=257)


def test_bench_data_prints_a_table(coord_set, capsys):
    from reproduction.bench import main
    assert main(["data", "--data", str(coord_set[0].root), "--batch-size", "4", "--batches", "2"]) == 0
    out = capsys.readouterr().out
    assert "torch " + torch.__version__ in out and "images/s" in out
    rows = [line for line in out.splitlines() if line.startswith(("train", "eval"))]
    assert len(rows) == 3 and all(float(r.split()[-2]) > 0 for r in rows)


# --------------------------------------------------------------------------- CUDA (marked gpu)

@pytest.fixture(scope="module")
def natural_set(tmp_path_factory):
    from conftest import data_dirs, find_data  # the checkout's gpu-bundle/ on a GPU machine
    folder = find_data("imagenet-sample")
    files = sorted(folder.glob("*.JPEG"))[:24] if folder else []
    if not files:
        pytest.skip(f"real images (imagenet-sample/*.JPEG) not found in {', '.join(map(str, data_dirs()))}")
    items = []
    for i, f in enumerate(files):  # §2: shorter side to 256, then the central 256×256
        im = Image.open(f).convert("RGB")
        s = 256 / min(im.size)
        im = im.resize((max(256, round(im.width * s)), max(256, round(im.height * s))), Image.BILINEAR)
        l, t = (im.width - 256) // 2, (im.height - 256) // 2
        items.append((encode(np.asarray(im.crop((l, t, l + 256, t + 256))), quality=95), i))
    root = pack_set(tmp_path_factory.mktemp("natural"), {"train": items}, num_classes=len(items))
    return PackedSet(root, "train"), load_stats(root)


@pytest.mark.gpu
def test_cuda_augmentation_equals_cpu_augmentation_on_the_same_pixels(natural_set):
    dataset, stats = natural_set
    images = torch.stack(decode_jpeg(dataset.encoded(range(8)), mode=ImageReadMode.RGB))
    small = F.interpolate(images.float(), size=(64, 64)).round().to(torch.uint8)  # the upsampling path
    d = draw_train(8, DataConfig(), seed=0, epoch=0, batch=0)
    noise = lighting_noise(d.alpha, stats, DataConfig()).float()
    for config in (DataConfig(), DataConfig(mean="offset", lighting="paper")):
        for x in (images, small):
            cpu = view_batch(x, stats.mean, config, d.top, d.left, d.flip, noise)
            gpu = view_batch(x.cuda(), stats.mean.cuda(), config, d.top, d.left, d.flip, noise)
            assert torch.allclose(cpu, gpu.cpu(), atol=1e-3)


@pytest.mark.gpu
def test_cpu_and_cuda_paths_deliver_the_same_batches(natural_set):
    # Tolerance: libjpeg-turbo and nvJPEG differ (chroma upsampling, IDCT rounding); torchvision's
    # own CPU/CUDA decode test allows a mean |difference| of 2 levels per image, and so does this
    # one per image and view. A wrong patch, reflection or α differs by tens of levels here.
    dataset, stats = natural_set
    for kwargs in (dict(seed=4, epoch=1), dict(seed=4, epoch=1, start_batch=1)):
        cpu = list(train_batches(dataset, stats, DataConfig(), batch_size=10, device="cpu", **kwargs))
        gpu = list(train_batches(dataset, stats, DataConfig(), batch_size=10, device="cuda", **kwargs))
        assert len(cpu) == len(gpu)
        for (xc, yc), (xg, yg) in zip(cpu, gpu):
            assert xg.device.type == "cuda" and torch.equal(yc, yg.cpu())
            assert (xc - xg.cpu()).abs().mean(dim=(1, 2, 3)).max() < 2
    cpu = list(eval_batches(dataset, stats, DataConfig(), batch_size=10, device="cpu", ten_patch=True))
    gpu = list(eval_batches(dataset, stats, DataConfig(), batch_size=10, device="cuda", ten_patch=True))
    for (xc, yc), (xg, yg) in zip(cpu, gpu):
        assert xg.shape == xc.shape and torch.equal(yc, yg.cpu())
        assert (xc - xg.cpu()).abs().mean(dim=(2, 3, 4)).max() < 2


def test_channels_last_batches_hold_the_same_values(coord_set):
    """channels_last=True (what the fast step asks for) changes the memory layout only: the
    same training views (lighting on), centre patches and ten patches, value for value."""
    dataset, stats = coord_set
    config = DataConfig()
    for plain, fast in [
            (train_batches(dataset, stats, config, batch_size=4, seed=3, epoch=1, workers=0),
             train_batches(dataset, stats, config, batch_size=4, seed=3, epoch=1, workers=0, channels_last=True)),
            (eval_batches(dataset, stats, config, batch_size=4, workers=0),
             eval_batches(dataset, stats, config, batch_size=4, workers=0, channels_last=True)),
            (eval_batches(dataset, stats, config, batch_size=4, workers=0, ten_patch=True),
             eval_batches(dataset, stats, config, batch_size=4, workers=0, ten_patch=True, channels_last=True))]:
        for (xa, ya), (xb, yb) in zip(plain, fast):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
            views = xb.flatten(0, 1) if xb.dim() == 5 else xb
            assert views.is_contiguous(memory_format=torch.channels_last) and not views.is_contiguous()
