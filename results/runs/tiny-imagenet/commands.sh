#!/usr/bin/env bash
# Issue 8: the paper's ImageNet ablations and Fig. 3 on real ImageNet images (Tiny-ImageNet, 64 px,
# upsampled to 256 and cut into 224 patches exactly as ILSVRC would be), from the repository root.
#
#   bash results/runs/tiny-imagenet/commands.sh smoke   # the CPU smoke run that was made (10 classes)
#   bash results/runs/tiny-imagenet/commands.sh gpu     # the planned GPU runs (NOT yet made: no GPU lent)
#
# gpu: the first 50 classes (25,000 train / 2,500 val images, ~55 MB packed, so it travels to the
# lent GPU machine in one call); six experiments × 2 seeds, the paper's recipe (batch 128, §5's
# SGD, ε 0.01 ÷10 on plateau) with the same epoch count for all; the opt-in fast path, recorded
# in each config.json. Measure one run first and set EPOCHS so the 12 fit the device budget.
set -euo pipefail
mode=${1:?"smoke or gpu"}

if [ "$mode" = smoke ]; then
    DATA=data/tiny-imagenet-10x100
    RUN=results/runs/tiny-imagenet/10x100-cpu-smoke/paper/seed0
    python -m data_prep tiny-imagenet ../shared/data/tiny-imagenet-200 --out "$DATA" \
        --classes 10 --limit-per-class 100 --val-limit-per-class 50
    python -m reproduction.train --experiment paper --data "$DATA" --out "$RUN" --devices cpu \
        --set epochs=2 batch_size=32
    python -m reproduction.visualize filters --checkpoint "$RUN/checkpoint.pt" --out results/runs/tiny-imagenet/fig3-10x100-cpu-smoke.png
    python -m reproduction.report
elif [ "$mode" = gpu ]; then
    DATA=data/tiny-imagenet-50
    EPOCHS=${EPOCHS:-15}
    FAST="precision=bf16 channels_last=True fused_lrn=True"
    python -m data_prep tiny-imagenet ../shared/data/tiny-imagenet-200 --out "$DATA" --classes 50
    for seed in 0 1; do
        for exp in paper no_lrn no_overlap_pool one_tower no_pca_lighting tanh; do
            python -m reproduction.train --experiment "$exp" --data "$DATA" \
                --out "results/runs/tiny-imagenet/50-classes/$exp/seed$seed" --set seed=$seed epochs=$EPOCHS $FAST
        done
        python -m reproduction.visualize filters --checkpoint "results/runs/tiny-imagenet/50-classes/paper/seed$seed/checkpoint.pt" \
            --out "results/runs/tiny-imagenet/fig3-50-classes-paper-seed$seed.png"
    done
    python -m reproduction.visualize neighbours --checkpoint results/runs/tiny-imagenet/50-classes/paper/seed0/checkpoint.pt \
        --data "$DATA" --out results/runs/tiny-imagenet/fig4-50-classes-paper-seed0.png
    python -m reproduction.report
fi
