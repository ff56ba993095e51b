"""data_prep: the official ILSVRC-2012 layout, §2 geometry, bad files, resume, real sets, §4.1 stats.

Everything is built in tmp_path from the real images in ../shared/data (the `shared_data`
fixture skips with its reason when they are absent); nothing is written into the repo.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import shutil
import signal
import tarfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from data_prep import image, sources
from data_prep.__main__ import build_parser, main
from data_prep.pack import Options, PrepError, prepare, stop_pool

FAST = dict(workers=1, hash_sources=False, constants=None)
# Classes taken from imagenet-sample for the small ILSVRC archive: spread over the sorted
# 1000, so the label (rank among the chosen wnids) differs from labels.txt's index.
PICK = (3, 10, 21, 30, 47, 52, 66, 81, 95)


# ---------------------------------------------------------------- helpers ---------------------

def read_set(out: Path, split: str) -> tuple[np.ndarray, list[str], bytes]:
    index = np.load(out / f"{split}.index.npy")
    names = (out / f"{split}.names.txt").read_text().splitlines()
    return index, names, (out / f"{split}.jpg.bin").read_bytes()


def stored_image(out: Path, split: str, i: int) -> Image.Image:
    index, _, blob = read_set(out, split)
    off, length, _ = index[i]
    img = Image.open(io.BytesIO(blob[off:off + length]))
    assert img.format == "JPEG"
    img.load()
    return img


def sample_images(shared: Path) -> list[tuple[str, str, int]]:
    """(file name, wnid, index in the sorted 1000) for the imagenet-sample images."""
    rows = []
    for line in (shared / "imagenet-sample" / "labels.txt").read_text().splitlines():
        name, idx = line.split("\t")
        rows.append((name, name.split("_")[0], int(idx)))
    return rows


def add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_meta_mat(path_in_tar: str, synsets: list[tuple[int, str, str, int]]) -> bytes:
    """A devkit meta.mat: struct array `synsets` with ILSVRC2012_ID, WNID, words, num_children."""
    import scipy.io
    dt = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")]
    arr = np.zeros((len(synsets), 1), dtype=dt)
    for i, (sid, wnid, words, children) in enumerate(synsets):
        arr[i, 0] = (np.array([[sid]], np.uint16), wnid, words, np.array([[children]], np.uint16))
    buf = io.BytesIO()
    scipy.io.savemat(buf, {"synsets": arr})
    return buf.getvalue()


def build_ilsvrc(shared: Path, root: Path) -> dict:
    """ILSVRC2012_img_train.tar (inner <wnid>.tar), a flat val tar, and a devkit, in root."""
    rows = [sample_images(shared)[i] for i in PICK]
    wnids = sorted(w for _, w, _ in rows)
    src = shared / "imagenet-sample"
    root.mkdir(parents=True)
    with tarfile.open(root / "ILSVRC2012_img_train.tar", "w") as outer:
        for name, wnid, _ in reversed(rows):  # archive order is not sorted: the prep sorts
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as t:
                for k in (2, 1):
                    add_bytes(t, f"{wnid}_{k}.JPEG", (src / name).read_bytes())
            add_bytes(outer, f"{wnid}.tar", inner.getvalue())
    # ILSVRC2012_IDs in an order that is NOT the sorted-wnid order, plus an inner node (id > 1000).
    ids = {w: 900 - 7 * i for i, w in enumerate(reversed(wnids))}
    synsets = [(sid, w, f"words of {w}", 0) for w, sid in ids.items()] + [(1001, "n00001740", "entity", 3)]
    val_order = [rows[i] for i in (4, 0, 7, 2, 8, 1, 6, 3, 5)]  # val file k holds this image
    truth = "".join(f"{ids[w]}\n" for _, w, _ in val_order)
    with tarfile.open(root / "ILSVRC2012_img_val.tar", "w") as t:
        for k, (name, _, _) in enumerate(val_order, start=1):
            add_bytes(t, f"ILSVRC2012_val_{k:08d}.JPEG", (src / name).read_bytes())
    with tarfile.open(root / "ILSVRC2012_devkit_t12.tar.gz", "w:gz") as t:
        add_bytes(t, "ILSVRC2012_devkit_t12/data/meta.mat", write_meta_mat("meta.mat", synsets))
        add_bytes(t, "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt", truth.encode())
    return {"wnids": wnids, "val_wnids": [w for _, w, _ in val_order]}


# ---------------------------------------------------------------- ILSVRC-2012 -----------------

def test_ilsvrc2012_archives_labels(shared_data, tmp_path):
    built = build_ilsvrc(shared_data, tmp_path / "ilsvrc")
    wnids = built["wnids"]
    m = prepare(sources.ilsvrc2012(tmp_path / "ilsvrc"), tmp_path / "out",
                Options(**{**FAST, "workers": 2, "hash_sources": True}))
    assert [c["id"] for c in m["classes"]] == wnids  # index = position in sorted order
    assert m["classes"][0]["name"] == f"words of {wnids[0]}"  # the inner node 1001 was left out
    assert m["image_size"] == 256
    index, names, _ = read_set(tmp_path / "out", "train")
    assert len(names) == 2 * len(wnids)
    for (off, length, label), name in zip(index, names):
        assert wnids[label] == name.split("/")[0]
    assert names[:2] == [f"{wnids[0]}/{wnids[0]}_1.JPEG", f"{wnids[0]}/{wnids[0]}_2.JPEG"]
    vindex, vnames, _ = read_set(tmp_path / "out", "val")
    assert vnames == [f"ILSVRC2012_val_{k:08d}.JPEG" for k in range(1, 10)]
    assert [wnids[label] for label in vindex[:, 2]] == built["val_wnids"]
    assert stored_image(tmp_path / "out", "val", 0).size == (256, 256)
    exp = m["expected_counts"]
    assert exp["checked"] and not exp["match"] and exp["counts"] == {"train": 1_281_167, "val": 50_000}
    assert [s["sha256"] is not None for s in m["sources"]] == [True, True, True]


def test_ilsvrc2012_extracted_tree_matches_archives(shared_data, tmp_path):
    built = build_ilsvrc(shared_data, tmp_path / "ilsvrc")
    tree = tmp_path / "tree"
    src = shared_data / "imagenet-sample"
    for name, wnid, _ in (sample_images(shared_data)[i] for i in PICK):
        for k in (1, 2):
            (tree / "train" / wnid).mkdir(parents=True, exist_ok=True)
            (tree / "train" / wnid / f"{wnid}_{k}.JPEG").write_bytes((src / name).read_bytes())
        (tree / "val" / wnid).mkdir(parents=True)
        (tree / "val" / wnid / "v.JPEG").write_bytes((src / name).read_bytes())
    a = prepare(sources.ilsvrc2012(tmp_path / "ilsvrc"), tmp_path / "a", Options(**FAST))
    b = prepare(sources.ilsvrc2012(tree), tmp_path / "b", Options(**FAST))
    # Same images, same order, same bytes: the two input forms give the same train split.
    assert b["splits"]["train"]["sha256"] == a["splits"]["train"]["sha256"]
    assert [c["id"] for c in b["classes"]] == built["wnids"]
    vindex, vnames, _ = read_set(tmp_path / "b", "val")
    assert [built["wnids"][label] for label in vindex[:, 2]] == [n.split("/")[0] for n in vnames]
    assert b["expected_counts"]["counts"]["train"] == 1_281_167
    # The other common extraction: val/ flat, labelled from the devkit's ground truth.
    flat = tmp_path / "flat"
    shutil.copytree(tree / "train", flat / "train")
    shutil.copy(tmp_path / "ilsvrc" / "ILSVRC2012_devkit_t12.tar.gz", flat)
    with tarfile.open(tmp_path / "ilsvrc" / "ILSVRC2012_img_val.tar") as t:
        t.extractall(flat / "val", filter="data")
    (flat / "val" / "stray.txt").write_text("not an image")
    c = prepare(sources.ilsvrc2012(flat), tmp_path / "flat_out", Options(**FAST))
    flat_labels = read_set(tmp_path / "flat_out", "val")[0][:, 2]
    assert flat_labels.tolist() == read_set(tmp_path / "a", "val")[0][:, 2].tolist()
    assert c["classes"] == a["classes"] and c["skipped"][0]["name"] == "stray.txt"
    with pytest.raises(PrepError, match="differ from the official"):  # --strict-counts
        prepare(sources.ilsvrc2012(tree), tmp_path / "c", Options(**{**FAST, "strict_counts": True}))
    assert not (tmp_path / "c" / "manifest.json").exists()


# ---------------------------------------------------------------- §2 geometry -----------------

def test_resize_center_crop_portrait_keeps_the_middle():
    # 300×600 (w×h): scaled to 256×512, the kept rows 128..383 are the source's rows 150..449.
    a = np.zeros((600, 300, 3), np.uint8)
    a[:150] = (255, 0, 0)
    a[150:450] = (0, 255, 0)
    a[450:] = (0, 0, 255)
    a[290:310, 140:160] = (255, 255, 255)  # a mark at the centre
    out = np.asarray(image.resize_center_crop(Image.fromarray(a), 256, "bicubic")).astype(int)
    assert out.shape == (256, 256, 3)
    assert (out[3:-3, :, 1] > 250).all()          # everything inside is from the green band
    assert (out[[0, -1], :, 1] > 200).all()        # the band's edges are the crop's edges
    explicit = Image.fromarray(a).resize((256, 512), Image.Resampling.BICUBIC).crop((0, 128, 256, 384))
    assert np.array_equal(out, np.asarray(explicit))
    white = np.argwhere(out.min(axis=2) > 200)
    assert np.allclose(white.mean(0), (127.5, 127.5), atol=0.6)  # the mark stays at the centre
    assert 15 <= len(np.unique(white[:, 0])) <= 19               # 20 px × 256/300 ≈ 17 px


def test_resize_center_crop_landscape_and_odd_excess():
    # Already 256 on the short side: no resampling, the crop alone; excess 45 → offset 22.
    a = np.zeros((256, 301, 3), np.uint8)
    a[:, 22] = 200
    a[:, 277] = 100
    a[:, 21] = a[:, 278] = 50
    out = np.asarray(image.resize_center_crop(Image.fromarray(a), 256, "bilinear"))
    assert out.shape == (256, 256, 3)
    assert (out[:, 0] == 200).all() and (out[:, 255] == 100).all() and out[:, 1:255].max() == 0
    # 600×300 (w×h) → 512×256, columns 128..383 kept.
    b = np.zeros((300, 600, 3), np.uint8)
    b[:, 150:450] = 255
    out = np.asarray(image.resize_center_crop(Image.fromarray(b), 256, "bicubic"))
    assert (out[:, 3:-3] > 250).all()


# ---------------------------------------------------------------- bad files -------------------

def reference_jpeg(shared: Path) -> bytes:
    return (shared / "imagenet-sample" / "n01440764_tench.JPEG").read_bytes()


def prep_with(tmp_path: Path, shared: Path, bad_name: str, bad: bytes) -> tuple[dict, Path]:
    """A two-image set: a good JPEG and the bad file; return the manifest and the out dir."""
    d = tmp_path / "set" / "train" / "c0"
    d.mkdir(parents=True)
    (d / "good.JPEG").write_bytes(reference_jpeg(shared))
    (d / bad_name).write_bytes(bad)
    v = tmp_path / "set" / "val" / "c0"  # data_prep refuses a set with an empty val split
    v.mkdir(parents=True)
    (v / "good.JPEG").write_bytes(reference_jpeg(shared))
    out = tmp_path / "out"
    m = prepare(sources.imagefolder(tmp_path / "set"), out, Options(**FAST))
    return m, out


def expected_rgb(shared: Path) -> np.ndarray:
    img = Image.open(io.BytesIO(reference_jpeg(shared))).convert("RGB")
    return np.asarray(image.resize_center_crop(img, 256, "bicubic")).astype(float)


def encoded(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def test_bad_file_cmyk_jpeg_is_converted(shared_data, tmp_path):
    cmyk = Image.open(io.BytesIO(reference_jpeg(shared_data))).convert("CMYK")
    m, out = prep_with(tmp_path, shared_data, "x_cmyk.JPEG", encoded(cmyk, "JPEG"))
    assert m["converted"] == [{"split": "train", "name": "c0/x_cmyk.JPEG", "from": "JPEG CMYK"}]
    img = stored_image(out, "train", 1)
    assert img.mode == "RGB"
    assert np.abs(np.asarray(img, float) - expected_rgb(shared_data)).mean() < 4


def test_bad_file_grayscale_jpeg_is_converted(shared_data, tmp_path):
    gray = Image.open(io.BytesIO(reference_jpeg(shared_data))).convert("L")
    m, out = prep_with(tmp_path, shared_data, "x_gray.JPEG", encoded(gray, "JPEG"))
    assert m["converted"][0]["from"] == "JPEG L"
    a = np.asarray(stored_image(out, "train", 1), float)
    assert a.shape == (256, 256, 3)
    assert np.abs(a[..., 0] - a[..., 1]).max() <= 3 and np.abs(a[..., 1] - a[..., 2]).max() <= 3
    want = np.asarray(image.resize_center_crop(gray, 256, "bicubic"), float)
    assert np.abs(a[..., 1] - want).mean() < 2


def test_bad_file_png_named_jpeg_is_converted(shared_data, tmp_path):
    rgb = Image.open(io.BytesIO(reference_jpeg(shared_data))).convert("RGB")
    m, out = prep_with(tmp_path, shared_data, "x_png.JPEG", encoded(rgb, "PNG"))
    assert m["converted"][0] == {"split": "train", "name": "c0/x_png.JPEG", "from": "PNG RGB"}
    index, _, blob = read_set(out, "train")
    assert blob[index[1, 0]:index[1, 0] + 2] == b"\xff\xd8"  # stored as JPEG now
    assert np.abs(np.asarray(stored_image(out, "train", 1), float) - expected_rgb(shared_data)).mean() < 3  # JPEG q95 loss


def test_bad_file_rgba_png_is_flattened_on_white(shared_data, tmp_path):
    rgba = Image.new("RGBA", (300, 300), (10, 20, 30, 0))  # fully transparent: becomes white
    m, out = prep_with(tmp_path, shared_data, "x_rgba.png", encoded(rgba, "PNG"))
    assert m["converted"][0]["from"] == "PNG RGBA"
    assert np.asarray(stored_image(out, "train", 1)).min() >= 250


def test_bad_file_truncated_jpeg_is_skipped(shared_data, tmp_path):
    data = reference_jpeg(shared_data)
    m, out = prep_with(tmp_path, shared_data, "x_trunc.JPEG", data[: len(data) // 2])
    assert len(m["skipped"]) == 1 and m["skipped"][0]["name"] == "c0/x_trunc.JPEG"
    assert m["skipped"][0]["reason"].startswith("truncated")
    assert m["splits"]["train"]["count"] == 1 and m["splits"]["train"]["records_seen"] == 2


def test_bad_file_corrupt_bytes_are_skipped(shared_data, tmp_path):
    junk = np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    m, _ = prep_with(tmp_path, shared_data, "x_junk.JPEG", junk)
    assert [s["name"] for s in m["skipped"]] == ["c0/x_junk.JPEG"]
    assert "cannot decode" in m["skipped"][0]["reason"]
    # A valid JPEG header followed by garbage fails too, and is listed, not stored.
    assert image.convert(reference_jpeg(shared_data)[:600] + junk, native_size=None, quality=90).skip_reason


def test_bad_file_empty_is_skipped(shared_data, tmp_path):
    m, _ = prep_with(tmp_path, shared_data, "x_empty.JPEG", b"")
    assert m["skipped"] == [{"split": "train", "name": "c0/x_empty.JPEG", "reason": "empty file (0 bytes)"}]
    assert m["splits"]["train"]["count"] == 1


# ---------------------------------------------------------------- resume ----------------------

def sample_folder(shared: Path, root: Path, n: int = 12) -> Path:
    for name, wnid, _ in sample_images(shared)[:n]:
        split = "val" if int(name[1:9]) % 3 == 0 else "train"
        d = root / split / wnid
        d.mkdir(parents=True, exist_ok=True)
        (d / name).write_bytes((shared / "imagenet-sample" / name).read_bytes())
        if split == "val":
            (root / "train" / wnid).mkdir(parents=True, exist_ok=True)
            (root / "train" / wnid / name).write_bytes((shared / "imagenet-sample" / name).read_bytes())
    return root


def outputs(out: Path) -> dict:
    files = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != "manifest.json"}
    with np.load(out / "stats.npz") as z:
        files["stats"] = {k: z[k].tolist() for k in z.files}
    del files["stats.npz"]  # npz zip headers hold timestamps; compare the arrays instead
    return files


def test_interrupted_prep_resumes_without_redoing_chunks(shared_data, tmp_path):
    src = sources.imagefolder(sample_folder(shared_data, tmp_path / "set"))
    opts = Options(**{**FAST, "chunk_size": 2, "keep_work": True})
    clean = prepare(src, tmp_path / "clean", opts)
    n_train_chunks = -(-clean["splits"]["train"]["records_seen"] // 2)
    assert n_train_chunks >= 4

    def crash_after_3(cid: str, done=[]) -> None:
        done.append(cid)
        if len(done) == 3:
            raise KeyboardInterrupt("simulated crash")

    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        prepare(src, out, opts, on_chunk=crash_after_3)
    assert not (out / "manifest.json").exists()  # a crashed prep never looks complete
    assert sorted(p.name for p in (out / ".partial").glob("*.json") if p.name.startswith("train")) == \
        ["train-000000.json", "train-000001.json", "train-000002.json"]
    (out / ".partial" / "train-000003.bin.tmp").write_bytes(b"half-written")  # debris of a crash

    redone: list[str] = []
    resumed = prepare(src, out, opts, on_chunk=redone.append)
    assert "train-000000" not in redone and "train-000002" not in redone
    assert redone[0] == "train-000003" and len(redone) == len(set(redone))
    assert outputs(out) == outputs(tmp_path / "clean")
    assert resumed["splits"] == clean["splits"]
    # Finished: a third run does nothing (and calls no hook); other settings are refused.
    again: list[str] = []
    prepare(src, out, Options(**{**FAST, "chunk_size": 2, "workers": 2}), on_chunk=again.append)
    assert again == []
    with pytest.raises(PrepError, match="complete set made with other settings"):
        prepare(src, out, Options(**{**FAST, "chunk_size": 2, "resample": "lanczos"}))


def _deaf_worker() -> None:
    """A worker that never acts on SIGTERM: what a worker is when the signal lands just before
    it blocks on the pool's queue lock (CPython then never runs the handler)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _stall(folder: str) -> None:
    Path(folder, str(os.getpid())).touch()
    time.sleep(120)


def test_stopping_the_pool_cannot_hang_on_a_worker_that_missed_sigterm(tmp_path):
    pool = multiprocessing.get_context().Pool(2, initializer=_deaf_worker)
    workers = list(pool._pool)
    for _ in workers:
        pool.apply_async(_stall, (str(tmp_path),))
    deadline = time.monotonic() + 30
    while len(list(tmp_path.iterdir())) < 2 and time.monotonic() < deadline:  # both stalled
        time.sleep(0.05)
    start = time.monotonic()
    stop_pool(pool, grace=0.5)  # pool.terminate() alone waits for these two forever
    assert time.monotonic() - start < 10
    assert [p.exitcode for p in workers] == [-signal.SIGKILL] * 2


def test_interrupted_prep_resumes_with_worker_processes(shared_data, tmp_path):
    src = sources.imagefolder(sample_folder(shared_data, tmp_path / "set"))
    opts = Options(**{**FAST, "workers": 2, "chunk_size": 2})

    def crash_after_2(cid: str, done=[]) -> None:
        done.append(cid)
        if len(done) == 2:
            raise KeyboardInterrupt("simulated crash")

    with pytest.raises(KeyboardInterrupt):
        prepare(src, tmp_path / "out", opts, on_chunk=crash_after_2)
    redone: list[str] = []
    prepare(src, tmp_path / "out", opts, on_chunk=redone.append)
    assert not {"train-000000", "train-000001"} & set(redone)
    # A different chunking and a single process give the same bytes.
    prepare(src, tmp_path / "clean", Options(**{**FAST, "chunk_size": 5}))
    assert outputs(tmp_path / "out") == outputs(tmp_path / "clean")


def test_resume_redoes_a_damaged_chunk_and_refuses_other_settings(shared_data, tmp_path):
    src = sources.imagefolder(sample_folder(shared_data, tmp_path / "set"))
    opts = Options(**{**FAST, "chunk_size": 3})
    out = tmp_path / "out"

    def crash(cid: str) -> None:
        if cid == "train-000001":
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError):
        prepare(src, out, opts, on_chunk=crash)
    with open(out / ".partial" / "train-000000.bin", "ab") as f:
        f.write(b"x")  # size no longer matches its marker: the chunk must be redone
    with pytest.raises(PrepError, match="other settings"):
        prepare(src, out, Options(**{**FAST, "chunk_size": 3, "quality": 80}))
    redone: list[str] = []
    prepare(src, out, opts, on_chunk=redone.append)
    assert redone[0] == "train-000000" and "train-000001" not in redone
    m = prepare(src, tmp_path / "clean", opts)
    assert json.loads((out / "manifest.json").read_text())["splits"] == m["splits"]


# ---------------------------------------------------------------- real sets -------------------

def test_cifar10_real_subset(shared_data, tmp_path):
    src = sources.cifar10(shared_data / "cifar10")
    m = prepare(src, tmp_path / "out", Options(**{**FAST, "limit_per_class": 12}))
    assert m["image_size"] == 32 and [c["id"] for c in m["classes"]] == list(sources.CIFAR10_CLASSES)
    assert m["splits"]["train"]["per_class"] == [12] * 10 and m["splits"]["val"]["per_class"] == [12] * 10
    assert m["splits"]["val"]["stored_from"] == "test"
    index, names, blob = read_set(tmp_path / "out", "val")
    assert all(sources.CIFAR10_CLASSES[label] == n.split("/")[0] for (_, _, label), n in zip(index, names))
    # The source JPEGs are 32×32 RGB baseline: stored byte-for-byte, no re-encoding.
    assert m["splits"]["val"]["passthrough"] == 120
    with tarfile.open(shared_data / "cifar10" / "test.tar.gz") as t:
        assert t.extractfile(names[0]).read() == blob[index[0, 0]:index[0, 0] + index[0, 1]]
    assert not m["expected_counts"]["checked"]


def test_tiny_imagenet_real_subset(shared_data, tmp_path):
    src = sources.tiny_imagenet(shared_data / "tiny-imagenet-200")
    assert len(src.classes) == 200  # the 2 extra classes of val_annotations.txt are not classes
    m = prepare(src, tmp_path / "out", Options(**{**FAST, "num_classes": 3, "limit_per_class": 15}))
    wnids = (shared_data / "tiny-imagenet-200" / "wnids.txt").read_text().split()[:3]
    assert [c["id"] for c in m["classes"]] == wnids and m["image_size"] == 64
    assert m["classes"][0]["name"] == "goldfish, Carassius auratus"
    for split in ("train", "val"):
        index, names, _ = read_set(tmp_path / "out", split)
        assert m["splits"][split]["per_class"] == [15, 15, 15]
        assert all(wnids[label] == n.split("/")[0] for (_, _, label), n in zip(index, names))
    assert stored_image(tmp_path / "out", "train", 0).size == (64, 64)


def test_fashion_mnist_real_full(shared_data, tmp_path):
    src = sources.fashion_mnist(shared_data / "fashion-mnist")
    m = prepare(src, tmp_path / "out", Options(**{**FAST, "workers": 2}))
    assert m["image_size"] == 28 and m["classes"][9]["name"] == "Ankle boot"
    assert m["splits"]["train"]["per_class"] == [766, 873, 828, 832, 787, 819, 836, 841, 816, 828]
    assert m["splits"]["val"]["per_class"] == [3, 7, 6, 5, 5, 4, 5, 7, 4, 4]
    # shared/ holds a part of the official 60,000 / 10,000: a recorded mismatch, not a crash.
    assert m["expected_counts"]["checked"] and not m["expected_counts"]["match"]
    img = stored_image(tmp_path / "out", "val", 0)
    assert img.mode == "RGB" and img.size == (28, 28)
    want = np.asarray(src.records("val").__next__().read(), float)
    assert np.abs(np.asarray(img, float)[..., 0] - want).mean() < 3
    assert abs(m["stats"]["channel_mean_rgb"][0] - 72.78) < 0.05  # README: train mean 72.78
    with np.load(tmp_path / "out" / "stats.npz") as z:  # grayscale: rank-1 covariance, no λ < 0
        assert (z["eigval"] >= 0).all() and np.allclose(z["eigvec"].T @ z["eigvec"], np.eye(3))


def test_holdout_carves_val_out_of_train_and_keeps_the_test_split(shared_data, tmp_path):
    src = sources.fashion_mnist(shared_data / "fashion-mnist")
    m = prepare(src, tmp_path / "out", Options(**{**FAST, "holdout": 3, "limit_per_class": 4}))
    names = {s: (tmp_path / "out" / f"{s}.names.txt").read_text().split() for s in ("train", "val", "test")}
    labels = {s: np.load(tmp_path / "out" / f"{s}.index.npy")[:, 2] for s in names}
    assert m["splits"]["val"]["per_class"] == [3] * 10 and m["splits"]["train"]["per_class"] == [4] * 10
    assert m["splits"]["test"]["per_class"] == [3, 4, 4, 4, 4, 4, 4, 4, 4, 4]  # the official test images
    assert not set(names["val"]) & set(names["train"])
    first = {}  # val = the first 3 training images of each class, in the source's order
    for r in src.records("train"):
        first.setdefault(r.label, [])
        if len(first[r.label]) < 3:
            first[r.label].append(r.name)
    assert sorted(names["val"]) == sorted(n for ns in first.values() for n in ns)
    assert set(labels["val"].tolist()) == set(range(10))
    assert all(n.startswith("test/") for n in names["test"])
    assert m["splits"]["val"]["stored_from"].startswith("train, the first 3")
    assert not m["expected_counts"]["checked"]  # a subset: nothing to compare with the official counts


def build_tiny_zip(shared: Path, path: Path, wnids_keep: int = 3, per_class: int = 4) -> list[str]:
    """The official tiny-imagenet-200.zip layout, from the first images of the real shard."""
    by_wnid: dict[str, list[tuple[str, bytes]]] = {}
    with tarfile.open(shared / "tiny-imagenet-200" / "train-00.tar.gz", "r|gz") as t:
        for m in t:
            wnid = m.name.split("/")[0]
            if len(by_wnid) == wnids_keep and wnid not in by_wnid:
                break
            if len(by_wnid.setdefault(wnid, [])) < per_class:
                by_wnid[wnid].append((Path(m.name).name, t.extractfile(m).read()))
    wnids = sorted(by_wnid)
    top = "tiny-imagenet-200/"
    ann = []
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(top + "wnids.txt", "".join(w + "\n" for w in reversed(wnids)))  # not sorted
        z.writestr(top + "words.txt", "".join(f"{w}\tname {w}\n" for w in wnids) + "n0\tother\n")
        for w in wnids:
            z.writestr(f"{top}train/{w}/{w}_boxes.txt", "")
            for name, data in by_wnid[w][:-1]:
                z.writestr(f"{top}train/{w}/images/{name}", data)
            z.writestr(f"{top}val/images/val_{len(ann)}.JPEG", by_wnid[w][-1][1])
            ann.append(f"val_{len(ann)}.JPEG\t{w}\t0\t0\t63\t63\n")
        z.writestr(f"{top}val/images/val_{len(ann)}.JPEG", by_wnid[wnids[0]][0][1])
        ann.append(f"val_{len(ann)}.JPEG\tn99999999\t0\t0\t63\t63\n")  # a class not in wnids.txt
        z.writestr(top + "val/val_annotations.txt", "".join(ann))
    return wnids


def test_tiny_imagenet_official_zip_and_folder(shared_data, tmp_path):
    wnids = build_tiny_zip(shared_data, tmp_path / "tiny.zip")
    m = prepare(sources.tiny_imagenet(tmp_path / "tiny.zip"), tmp_path / "a", Options(**FAST))
    assert [c["id"] for c in m["classes"]] == wnids and m["classes"][1]["name"] == f"name {wnids[1]}"
    assert m["splits"]["train"]["per_class"] == [3, 3, 3] and m["splits"]["val"]["per_class"] == [1, 1, 1]
    index, names, _ = read_set(tmp_path / "a", "train")
    assert all(wnids[label] == n.split("/")[0] for (_, _, label), n in zip(index, names))
    vindex, vnames, _ = read_set(tmp_path / "a", "val")
    assert vnames == ["images/val_0.JPEG", "images/val_1.JPEG", "images/val_2.JPEG"]
    assert vindex[:, 2].tolist() == [0, 1, 2]
    assert [s["name"] for s in m["skipped"]] == ["images/val_3.JPEG"]  # listed with its reason
    with zipfile.ZipFile(tmp_path / "tiny.zip") as z:
        z.extractall(tmp_path / "x")
    b = prepare(sources.tiny_imagenet(tmp_path / "x"), tmp_path / "b", Options(**FAST))
    assert b["splits"] == m["splits"]


def test_cifar10_torchvision_pickles(tmp_path):
    import pickle
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    rng = np.random.default_rng(2)
    for name, n in [*((f"data_batch_{i}", 2) for i in range(1, 6)), ("test_batch", 3)]:
        smooth = (np.add.outer(np.arange(32) * 3, np.arange(32) * 4)[None, None]       # JPEG-friendly
                  + np.arange(3)[None, :, None, None] * 30 + rng.integers(0, 50, (n, 1, 1, 1)))
        batch = {b"data": np.clip(smooth, 0, 255).astype(np.uint8).reshape(n, 3072),
                 b"labels": [int(x) for x in rng.integers(0, 10, n)],
                 b"filenames": [f"img_{name}_{k}.png".encode() for k in range(n)]}
        (d / name).write_bytes(pickle.dumps(batch))
    m = prepare(sources.cifar10(tmp_path), tmp_path / "out", Options(**FAST))
    assert m["splits"]["train"]["count"] == 10 and m["splits"]["val"]["count"] == 3
    index, names, _ = read_set(tmp_path / "out", "train")
    first = pickle.loads((d / "data_batch_1").read_bytes())
    assert names[0] == "data_batch_1/img_data_batch_1_0.png" and index[0, 2] == first[b"labels"][0]
    want = first[b"data"][0].reshape(3, 32, 32).transpose(1, 2, 0).astype(float)  # CHW rows → HWC
    assert np.abs(np.asarray(stored_image(tmp_path / "out", "train", 0), float) - want).mean() < 2


@pytest.mark.parametrize("name,make,counts", [
    ("cifar10", lambda d: sources.cifar10(d / "cifar10"), {"train": 50_000, "val": 10_000}),
    ("tiny-imagenet", lambda d: sources.tiny_imagenet(d / "tiny-imagenet-200"), {"train": 100_000, "val": 10_000}),
])
def test_real_sources_have_the_official_counts(shared_data, name, make, counts):
    """Every record of the full sets, counted without decoding (the prep counts the same way)."""
    src = make(shared_data)
    seen = {s: sum(1 for r in src.records(s) if r.skip is None) for s in ("train", "val")}
    assert seen == counts == src.expected_counts


# ---------------------------------------------------------------- §4.1 statistics -------------

def test_stats_match_numpy_on_a_synthetic_set(tmp_path):
    rng = np.random.default_rng(1)
    imgs = [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(7)]
    imgs[0][..., 2] = imgs[0][..., 0] // 2  # correlated channels
    for i, a in enumerate(imgs):
        (tmp_path / "set" / "train" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(a).save(tmp_path / "set" / "train" / f"c{i % 2}" / f"{i}.png")
    (tmp_path / "set" / "val" / "c0").mkdir(parents=True)  # a val image: an empty val split is refused
    Image.fromarray(imgs[0]).save(tmp_path / "set" / "val" / "c0" / "v.png")
    src = sources.imagefolder(tmp_path / "set", native_size=8)
    prepare(src, tmp_path / "out", Options(**FAST))
    with np.load(tmp_path / "out" / "stats.npz") as z:
        got = {k: z[k] for k in z.files}
    stack = np.stack(imgs).astype(np.float64)                       # (N, 8, 8, 3)
    each_up = F.interpolate(torch.from_numpy(stack.transpose(0, 3, 1, 2)), size=256, mode="bilinear",
                            align_corners=False, antialias=False).mean(0).numpy()
    assert got["mean"].dtype == np.float32 and got["mean"].shape == (3, 256, 256)
    assert np.allclose(got["mean"], each_up, atol=1e-3)  # upsampling the mean = mean of upsampled
    pixels = stack.reshape(-1, 3)
    assert np.allclose(got["rgb_cov"], np.cov(pixels.T, bias=True), rtol=1e-10)
    assert (np.diff(got["eigval"]) > 0).all()
    assert np.allclose(got["rgb_cov"] @ got["eigvec"], got["eigvec"] * got["eigval"])
    assert int(got["count"]) == 7 and str(got["source"]) == "computed"


def test_stats_mean_image_at_256(shared_data, tmp_path):
    root = sample_folder(shared_data, tmp_path / "set", n=5)
    prepare(sources.imagefolder(root), tmp_path / "out", Options(**FAST))
    files = sorted((root / "train").rglob("*.JPEG"))
    arrays = [np.asarray(image.resize_center_crop(Image.open(f).convert("RGB"), 256, "bicubic"), float)
              for f in files]
    with np.load(tmp_path / "out" / "stats.npz") as z:
        assert np.allclose(z["mean"], np.mean(arrays, 0).transpose(2, 0, 1), atol=1e-3)
        assert int(z["count"]) == len(files)


def test_stats_cuda_convnet2_constants(shared_data, tmp_path):
    constants = shared_data / "constants" / "cuda_convnet2_imagenet_meta.npz"
    root = sample_folder(shared_data, tmp_path / "set", n=3)
    m = prepare(sources.imagefolder(root), tmp_path / "out",
                Options(**{**FAST, "stats": "cuda-convnet2", "constants": constants}))
    with np.load(constants) as c, np.load(tmp_path / "out" / "stats.npz") as z:
        assert np.array_equal(z["mean"], c["data_mean"].reshape(3, 256, 256))
        assert np.allclose(np.sqrt(z["eigval"]), c["color_pca_stdevs"])
        assert np.allclose(z["eigvec"], c["color_pca_eigvecs"])
        assert np.allclose(z["rgb_cov"] @ z["eigvec"], z["eigvec"] * z["eigval"])
        assert str(z["source"]) == "cuda-convnet2"
    assert m["stats"]["channel_mean_rgb"] == pytest.approx([127.30, 119.72, 104.91], abs=0.01)
    assert m["stats"]["sqrt_eigval"] == pytest.approx([19.72, 37.09, 121.78], abs=0.01)
    assert "vs_krizhevsky" in m["stats"] and (tmp_path / "out" / "stats.computed.npz").is_file()


# ---------------------------------------------------------------- CLI -------------------------

def test_cli_help_explains_every_option_and_runs(shared_data, tmp_path, capsys):
    sub = build_parser()._subparsers._group_actions[0].choices["cifar10"]
    for action in sub._actions:
        assert action.help, f"option {action.option_strings or action.dest} has no help"
    rc = main(["cifar10", str(shared_data / "cifar10"), "--out", str(tmp_path / "c"),
               "--limit-per-class", "2", "--workers", "1", "--no-hash"])
    assert rc == 0 and (tmp_path / "c" / "manifest.json").is_file()
    assert "train (from train): 20 images" in capsys.readouterr().out
    assert main(["cifar10", str(tmp_path / "missing"), "--out", str(tmp_path / "d")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_a_complete_set_is_checked_against_its_files(shared_data, tmp_path):
    """A hand-edited manifest (a count its index does not hold) or a cut bytes file is not
    taken for a complete set; the untouched set still is."""
    m, out = prep_with(tmp_path, shared_data, "also.JPEG", reference_jpeg(shared_data))
    source = sources.imagefolder(tmp_path / "set")
    assert prepare(source, out, Options(**FAST)) == m  # complete: nothing to do
    edited = json.loads((out / "manifest.json").read_text())
    edited["splits"]["val"]["count"] = 999
    (out / "manifest.json").write_text(json.dumps(edited))
    with pytest.raises(PrepError, match="val: the manifest says 999 images, val.index.npy holds 1"):
        prepare(source, out, Options(**FAST))
    (out / "manifest.json").write_text(json.dumps(m))
    with open(out / "train.jpg.bin", "r+b") as f:
        f.truncate(100)
    with pytest.raises(PrepError, match="train.jpg.bin holds 100 bytes"):
        prepare(source, out, Options(**FAST))


def test_a_second_prepare_into_a_folder_being_written_is_refused(shared_data, tmp_path):
    import fcntl
    out = tmp_path / "out"
    out.mkdir()
    fd = os.open(out, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # as a first data_prep holds it while it writes
    try:
        with pytest.raises(PrepError, match="being prepared by another process"):
            prep_with(tmp_path, shared_data, "also.JPEG", reference_jpeg(shared_data))
    finally:
        os.close(fd)
    assert list(out.iterdir()) == []


def test_a_class_folder_whose_name_is_not_utf8_is_refused(shared_data, tmp_path):
    """Its images could not be listed in names.txt: it would become a class with no images."""
    for split in ("train", "val"):
        for cls in (b"good", b"bad\xff"):
            folder = os.path.join(os.fsencode(tmp_path / "set" / split), cls)
            os.makedirs(folder)
            with open(os.path.join(folder, b"0.JPEG"), "wb") as f:
                f.write(reference_jpeg(shared_data))
    with pytest.raises(PrepError, match=r"not valid UTF-8: bad\\xff; rename them"):
        prepare(sources.imagefolder(tmp_path / "set"), tmp_path / "out", Options(**FAST))
    assert not (tmp_path / "out").exists()
