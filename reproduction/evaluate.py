"""Evaluate a trained net as the paper did (§4.1, §6): top-1 and top-5 error on the centre
224 patch, and with the softmax outputs of ten patches (four corners, centre, and their
reflections) averaged.

    python -m reproduction.evaluate --checkpoint RUN/checkpoint.pt --data DIR
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn

from reproduction.config import DataConfig
from reproduction.data import PackedSet, Stats, average_softmax, eval_batches, load_stats
from reproduction.distributed import Distributed
from reproduction.runs import load_checkpoint, model_from_checkpoint, write_json


def autocast(device: torch.device, precision: str):
    """bf16 autocast when asked for (opt-in, not the paper's arithmetic); else nothing."""
    if precision == "bf16":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(model: nn.Module | Sequence[nn.Module], dataset: PackedSet, stats: Stats,
             config: DataConfig | Sequence[DataConfig], *, ten_patch: bool, batch_size: int = 128,
             device: str | torch.device = "cpu", precision: str = "fp32", channels_last: bool = False,
             workers: int | None = None, replicas: Distributed | None = None,
             top5: list[Tensor] | None = None) -> dict:
    """Top-1/top-5 error over the whole split (every image exactly once). With ten_patch, the
    prediction is the average of the ten patches' softmax outputs (§4.1); else the centre patch.

    A sequence of models (with one DataConfig each, or one for all) is an ensemble, as §6
    averaged "the predictions of five similar CNNs": each model's softmax, averaged over its
    patches, then averaged over the models. Each model reads its input on its first tower's
    device. top5: a list that receives each batch's top-5 class indices (N×5, stored order).

    replicas (a Distributed, under torchrun): each rank evaluates every world-th batch and
    the counts and loss sums are added over the ranks, so every rank returns the whole split's
    result. Every rank must call it."""
    models = [model] if isinstance(model, nn.Module) else list(model)
    configs = [config] * len(models) if isinstance(config, DataConfig) else list(config)
    if not models or len(configs) != len(models):
        raise ValueError(f"{len(models)} model(s) and {len(configs)} data config(s): give one each, or one for all")
    rank, world = (0, 1) if replicas is None else (replicas.rank, replicas.world)
    was_training = [m.training for m in models]
    for m in models:
        m.eval()
    # Models that read their input the same way share one stream of batches.
    streams = list(dict.fromkeys(configs))
    batches = [eval_batches(dataset, stats, c, batch_size=batch_size, device=device, ten_patch=ten_patch,
                            workers=workers, shard=(rank, world)) for c in streams]
    top1 = top5_hits = seen = 0
    loss = 0.0
    try:
        for got in zip(*batches):
            y = got[0][1]
            probs = 0
            for m, c in zip(models, configs):
                x = got[streams.index(c)][0]
                views = x.flatten(0, 1) if ten_patch else x
                views = views.to(next(m.parameters()).device)
                if channels_last:
                    views = views.contiguous(memory_format=torch.channels_last)
                with autocast(views.device, precision):
                    logits = m(views)
                logits = logits.float().to(y.device)
                probs = probs + average_softmax(logits.unflatten(0, x.shape[:2]) if ten_patch else logits[:, None])
            probs = probs / len(models)
            best = probs.topk(min(5, probs.shape[1]), dim=1).indices
            if top5 is not None:
                top5.append(best.cpu())
            top1 += (best[:, 0] == y).sum().item()
            top5_hits += (best == y[:, None]).any(dim=1).sum().item()
            loss += torch.nn.functional.nll_loss(probs.clamp_min(1e-30).log(), y, reduction="sum").item()
            seen += len(y)
    finally:
        for m, was in zip(models, was_training):
            m.train(was)
    if replicas is not None:  # integer counts are exact in float64; the loss sum is a float sum
        top1, top5_hits, loss, seen = replicas.sum([top1, top5_hits, loss, seen])
        top1, top5_hits, seen = int(top1), int(top5_hits), int(seen)
    return {"top1_error": 1 - top1 / seen, "top5_error": 1 - top5_hits / seen, "loss": loss / seen,
            "images": seen, "patches": 10 if ten_patch else 1, "models": len(models)}


def final_metrics(model: nn.Module, dataset: PackedSet, stats: Stats, config: DataConfig, **kw) -> dict:
    """Both of the paper's test protocols (Table 1: 10 patches; its footnote: centre only)."""
    return {"centre": evaluate(model, dataset, stats, config, ten_patch=False, **kw),
            "ten_patch": evaluate(model, dataset, stats, config, ten_patch=True, **kw)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m reproduction.evaluate",
        description="Top-1/top-5 error of a checkpoint on the centre patch and with the ten-patch "
                    "softmax average (§4.1, §6). Writes the result (default: final.json beside the "
                    "checkpoint) and prints it.")
    parser.add_argument("--checkpoint", type=Path, required=True, help="a run's checkpoint.pt")
    parser.add_argument("--data", type=Path, required=True, help="a folder prepared by python -m data_prep")
    parser.add_argument("--split", default="val", help="the split to evaluate (default: val)")
    parser.add_argument("--device", default=None,
                        help="cpu, cuda, or two devices 'cuda:0,cuda:1' for the towers (default: the GPU(s) if any)")
    parser.add_argument("--batch-size", type=int, default=128, help="images per batch (default 128)")
    parser.add_argument("--output", type=Path, default=None,
                        help="where to write the result (default: final.json beside the checkpoint; give "
                             "another name, e.g. test.json, for a split other than the run's val)")
    args = parser.parse_args(argv)

    from reproduction.train import parse_devices  # the same placement rule as training
    state = load_checkpoint(args.checkpoint)
    config_devices = parse_devices(args.device, towers=state["config"]["model"]["towers"])
    model, config = model_from_checkpoint(state, devices=config_devices)
    dataset, stats = PackedSet(args.data, args.split), load_stats(args.data)
    if len(dataset.classes) != config.model.num_classes:
        parser.error(f"the checkpoint has {config.model.num_classes} classes, {args.data} has "
                     f"{len(dataset.classes)}")
    start = time.time()
    result = final_metrics(model, dataset, stats, config.data, batch_size=args.batch_size,
                           device=config_devices[0], precision=config.train.precision,
                           channels_last=config.train.channels_last)
    result |= {"checkpoint": str(args.checkpoint), "data": str(args.data), "split": args.split,
               "epochs_trained": state["epoch"], "seconds": round(time.time() - start, 1)}
    write_json(args.output or args.checkpoint.parent / "final.json", result)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
