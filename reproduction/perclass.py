"""Per-class results of an evaluation: each class's top-1/top-5 error, the top-1 confusion
matrix (rows: the true class, columns: the predicted one) and the most-confused pairs, from
the top-5 predictions `evaluate` collects (BVLC/caffe#3052's question: which classes does the
net confuse?). Written by `python -m reproduction.evaluate` beside its result."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

PAIRS = 10  # most-confused pairs named in the summary


def per_class(top5: Sequence[Tensor], labels: Tensor, classes: Sequence[dict]) -> dict:
    """top5: the N×5 predicted classes (best first) of each batch, in stored order; labels: N."""
    pred = torch.cat([t.cpu() for t in top5]).long()
    labels = labels.long()
    if len(pred) != len(labels):
        raise ValueError(f"{len(pred)} predictions for {len(labels)} images: the split was not predicted once")
    n = len(classes)
    confusion = torch.zeros(n, n, dtype=torch.int64)
    confusion.index_put_((labels, pred[:, 0]), torch.ones(len(labels), dtype=torch.int64), accumulate=True)
    images = confusion.sum(1)
    hit5 = torch.zeros(n, dtype=torch.int64).index_add_(0, labels, (pred == labels[:, None]).any(1).long())
    rows = []
    for i, c in enumerate(classes):
        m = int(images[i])
        rows.append({"id": c["id"], "name": c.get("name", c["id"]), "images": m,
                     "top1_error": 1 - int(confusion[i, i]) / m if m else None,
                     "top5_error": 1 - int(hit5[i]) / m if m else None})
    return {"classes": rows, "confusion": confusion.tolist(), "most_confused": most_confused(confusion, classes)}


def most_confused(confusion: Tensor, classes: Sequence[dict], k: int = PAIRS) -> list[dict]:
    """The k largest off-diagonal cells: true class, predicted class, images, share of the true class."""
    off = confusion.clone()
    off.fill_diagonal_(0)
    counts, flat = off.flatten().topk(min(k, off.numel()))
    n, images = len(classes), confusion.sum(1)
    return [{"true": classes[i // n]["id"], "predicted": classes[i % n]["id"], "images": int(c),
             "share": int(c) / int(images[i // n])}
            for c, i in zip(counts.tolist(), flat.tolist()) if c > 0]


def plot_confusion(result: dict, path: Path, title: str) -> None:
    """The row-normalised confusion matrix as an image, readable from 10 to 200 classes: every
    class labelled up to 40 classes, every k-th beyond."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = torch.tensor(result["confusion"], dtype=torch.float64)
    m = m / m.sum(1, keepdim=True).clamp(min=1)
    n = len(m)
    side = min(16.0, max(5.0, n * 0.08 + 3))
    fig, ax = plt.subplots(figsize=(side, side))
    shown = ax.imshow(m.numpy(), cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    step = 1 if n <= 40 else -(-n // 40)
    ticks = list(range(0, n, step))
    names = [result["classes"][i]["id"] for i in ticks]
    ax.set_xticks(ticks, names, rotation=90, fontsize=6 if n > 20 else 8)
    ax.set_yticks(ticks, names, fontsize=6 if n > 20 else 8)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title, fontsize=9)
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
