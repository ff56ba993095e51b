"""Test helper: write a packed set exactly as data_prep does (the "alexnet-packed/1" contract)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from reproduction.data import FORMAT

# A non-symmetric orthonormal V (so a transposed V shows) and ImageNet-like σ = √λ = 20, 50, 120.
EIGVEC = np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))[0]
EIGVAL = np.array([400.0, 2500.0, 14400.0])


def encode(image: np.ndarray, quality: int = 100) -> bytes:
    """H×W×3 uint8 → JPEG bytes; 4:4:4 so colour survives to within a level or two."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "JPEG", quality=quality, subsampling=0)
    return buf.getvalue()


def pack_set(root: Path, splits: dict[str, list[tuple[np.ndarray | bytes, int]]], *, num_classes: int,
             mean: np.ndarray | None = None, eigval: np.ndarray = EIGVAL, eigvec: np.ndarray = EIGVEC,
             quality: int = 100, fmt: str = FORMAT) -> Path:
    """Write a packed set as data_prep does: per split the bytes, the index, the names; then
    stats.npz; the manifest last. Items are (H×W×3 uint8 image or JPEG bytes, label)."""
    root.mkdir(parents=True, exist_ok=True)
    sizes, counts = set(), {}
    for split, items in splits.items():
        blobs = [b if isinstance(b, bytes) else encode(b, quality) for b, _ in items]
        sizes |= {Image.open(io.BytesIO(b)).size[0] for b in blobs}
        lengths = np.array([len(b) for b in blobs], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        labels = np.array([label for _, label in items], dtype=np.int64)
        (root / f"{split}.jpg.bin").write_bytes(b"".join(blobs))
        np.save(root / f"{split}.index.npy", np.stack([offsets, lengths, labels], axis=1))
        (root / f"{split}.names.txt").write_text("".join(f"{split}_{i}.JPEG\n" for i in range(len(items))))
        counts[split] = {"count": len(items), "per_class": np.bincount(labels, minlength=num_classes).tolist()}
    assert len(sizes) == 1, "one stored size per set"
    mean = np.zeros((3, 256, 256), np.float32) if mean is None else mean.astype(np.float32)
    cov = eigvec @ np.diag(eigval) @ eigvec.T
    np.savez(root / "stats.npz", mean=mean, rgb_cov=cov, eigval=eigval, eigvec=eigvec, count=1, source="test")
    manifest = {"format": fmt, "dataset": "test", "image_size": sizes.pop(), "jpeg_quality": quality,
                "classes": [{"index": i, "id": f"c{i}", "name": f"class {i}"} for i in range(num_classes)],
                "splits": counts, "stats": "stats.npz", "skipped": [], "settings": {}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def colour_set(root: Path, *, train: int, val: int, seed: int) -> Path:
    """A tiny 4-class set of 32×32 images whose colour says the class (upsampled to 256 at
    load, §2): image i has label i mod 4; the train images are drawn first, then the val ones."""
    rng = np.random.default_rng(seed)
    colours = [(200, 40, 40), (40, 200, 40), (40, 40, 200), (200, 200, 40)]

    def image(label):
        noise = rng.integers(-30, 30, size=(32, 32, 3))
        return np.clip(np.array(colours[label]) + noise, 0, 255).astype(np.uint8)

    train_items = [(image(i % 4), i % 4) for i in range(train)]
    val_items = [(image(i % 4), i % 4) for i in range(val)]
    return pack_set(root, {"train": train_items, "val": val_items}, num_classes=4,
                    mean=np.full((3, 256, 256), 120.0))
