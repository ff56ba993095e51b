#!/usr/bin/env bash
# The Fashion-MNIST run (issue 10, part 1), from the repository root: every step, in order.
# Reduced CPU run: 200 train + 50 held-out images per class (2,000 / 500) of the 8,226 real
# training images in ../shared/data/fashion-mnist, batch 32, 3 epochs; the 50 official test
# images are evaluated at the end with the training set's statistics.
set -euo pipefail
SRC=../shared/data/fashion-mnist

# 1. Hold out the last 100 training images of each class (in file order) as an ImageFolder
#    val/ split. data_prep's fashion-mnist source stores the official test split as val, so a
#    train/val split of the train images needs this step (a data_prep --holdout option would
#    replace it). Grey 28×28 PNGs; data_prep turns them into 3 equal RGB channels.
python - "$SRC" data/fashion-mnist-folder <<'PY'
import sys
from pathlib import Path
import numpy as np
import torchvision
src, out = sys.argv[1], Path(sys.argv[2])
ds = torchvision.datasets.FashionMNIST(src, train=True, download=False)
labels = ds.targets.numpy()
for c, name in enumerate(ds.classes):
    folder = f"{c}-{name.replace('/', '-').replace(' ', '_')}"   # sorts as the label order
    idx = np.flatnonzero(labels == c)
    for split, part in (("train", idx[:-100]), ("val", idx[-100:])):
        d = out / split / folder
        d.mkdir(parents=True, exist_ok=True)
        for i in part:
            ds[int(i)][0].save(d / f"{i:05d}.png")
print(f"{len(labels)} train images -> {out}: train {len(labels) - 1000}, val (held out) 1000")
PY

# 2. Pack a 200/50-per-class subset (stats from its own 2,000 train images), and the 50 test images.
python -m data_prep imagefolder data/fashion-mnist-folder --native-size 28 --name fashion-mnist-holdout \
    --limit-per-class 200 --val-limit-per-class 50 --out data/fashion-mnist-200x50
python -m data_prep fashion-mnist "$SRC" --out data/fashion-mnist

# 3. Train experiment fashion_mnist, scaled down for the CPU (batch 32, 3 epochs).
python -m reproduction.train --experiment fashion_mnist --data data/fashion-mnist-200x50 \
    --out runs/fashion-mnist-200x50/fashion_mnist-cpu/seed0 --devices cpu --workers 1 \
    --set batch_size=32 epochs=3

# 4. The 50 official test images, centre patch and ten patches, with the training set's mean
#    (writes test.json beside final.json; `reproduction.evaluate` would overwrite final.json).
python - <<'PY'
import json
from pathlib import Path
from reproduction.data import PackedSet, load_stats
from reproduction.evaluate import final_metrics
from reproduction.runs import load_checkpoint, model_from_checkpoint, write_json
run = Path("runs/fashion-mnist-200x50/fashion_mnist-cpu/seed0")
model, config = model_from_checkpoint(load_checkpoint(run / "checkpoint.pt"))
test = PackedSet("data/fashion-mnist", "val")   # the official test images (stored as val)
result = final_metrics(model, test, load_stats("data/fashion-mnist-200x50"), config.data, batch_size=32, workers=1)
result |= {"data": "data/fashion-mnist (val = the first 50 official test images)", "stats": "data/fashion-mnist-200x50"}
write_json(run / "test.json", result)
print(json.dumps(result, indent=2))
PY

# 5. Keep the text files (never checkpoint.pt).
mkdir -p results/runs/fashion-mnist-200x50/fashion_mnist-cpu/seed0
cp runs/fashion-mnist-200x50/fashion_mnist-cpu/seed0/{config.json,metrics.jsonl,final.json,test.json} \
   results/runs/fashion-mnist-200x50/fashion_mnist-cpu/seed0/
