#!/usr/bin/env bash
# Issue 8: the paper's ImageNet ablations and Fig. 3 on real ImageNet images (Tiny-ImageNet, 64 px,
# upsampled to 256 and cut into 224 patches exactly as ILSVRC would be), from the repository root.
#
#   bash results/runs/tiny-imagenet/commands.sh smoke   # the CPU smoke run that was made (10 classes)
#   bash results/runs/tiny-imagenet/commands.sh gpu-prepare   # CPU machine: gpu-carry/ from ../shared/data
#   bash results/runs/tiny-imagenet/commands.sh gpu           # on the lent GPU: the ablations (NOT yet made: no GPU lent)
#   bash results/runs/tiny-imagenet/commands.sh gpu-collect DIR  # CPU machine: the returned runs into results/
#
# gpu: reads only the checkout and the carried gpu-carry/ (../shared does not travel to the GPU
# machine): the first 50 classes (25,000 train / 2,500 val images, 51 MiB packed); paper,
# no_lrn, no_overlap_pool, one_tower, no_pca_lighting, one seed per call (SEEDS, default 0), with
# reproduction/gpu.py's one reduced recipe (10 epochs, ε 0.01 then 0.001 from epoch 8, batch 128,
# the opt-in fast path, recorded in each config.json) and Fig. 3 from the paper run.
# results/gpu/README.md has the exact calls on a lent machine.
set -euo pipefail
mode=${1:?"smoke, gpu-prepare, gpu or gpu-collect DIR"}

if [ "$mode" = smoke ]; then
    DATA=data/tiny-imagenet-10x100
    RUN=results/runs/tiny-imagenet/10x100-cpu-smoke/paper/seed0
    python -m data_prep tiny-imagenet ../shared/data/tiny-imagenet-200 --out "$DATA" \
        --classes 10 --limit-per-class 100 --val-limit-per-class 50
    python -m reproduction.train --experiment paper --data "$DATA" --out "$RUN" --devices cpu \
        --set epochs=2 batch_size=32
    python -m reproduction.visualize filters --checkpoint "$RUN/checkpoint.pt" --out results/runs/tiny-imagenet/fig3-10x100-cpu-smoke.png
    python -m reproduction.report
elif [ "$mode" = gpu-prepare ]; then
    python -m reproduction.gpu prepare
elif [ "$mode" = gpu ]; then
    for seed in ${SEEDS:-0}; do
        python -m reproduction.gpu ablations --seed "$seed"
    done
elif [ "$mode" = gpu-collect ]; then
    python -m reproduction.gpu collect "${2:?the folder where the GPU call returned its OUT files}"
    python -m reproduction.report
else
    echo "mode must be smoke, gpu-prepare, gpu or gpu-collect" >&2
    exit 2
fi
