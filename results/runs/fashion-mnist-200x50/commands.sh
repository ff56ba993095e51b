#!/usr/bin/env bash
# The Fashion-MNIST run (the d2l tutorial's setting), from the repository root, every step.
# A reduced CPU run on the real partial Fashion-MNIST in ../shared/data/fashion-mnist (8,226
# training and 50 test images): the first 100 training images of each class are held out as
# val (50 of them kept), 200 of the rest per class train the net (batch 32, 3 epochs), and the
# 50 official test images are evaluated at the end as split `test`.
set -euo pipefail
RUN=results/runs/fashion-mnist-200x50/fashion_mnist-cpu/seed0

python -m data_prep fashion-mnist ../shared/data/fashion-mnist --out data/fashion-mnist-holdout \
    --holdout 100 --limit-per-class 200 --val-limit-per-class 50
python -m reproduction.train --experiment fashion_mnist --data data/fashion-mnist-holdout --out "$RUN" \
    --devices cpu --set batch_size=32 epochs=3
python -m reproduction.evaluate --checkpoint "$RUN/checkpoint.pt" --data data/fashion-mnist-holdout \
    --split test --device cpu --output "$RUN/test.json"
