"""Evaluate a trained net as the paper did (§4.1, §6): top-1 and top-5 error on the centre
224 patch, and with the softmax outputs of ten patches (four corners, centre, and their
reflections) averaged.

    python -m reproduction.evaluate --checkpoint RUN/checkpoint.pt --data DIR
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn

from reproduction.config import DataConfig
from reproduction.data import PackedSet, Stats, average_softmax, eval_batches, num_batches
from reproduction.training.distributed import Distributed, parse_devices  # the same placement rule as training
from reproduction.errors import UserError, run_cli, writable_file
from reproduction.perclass import per_class, plot_confusion
from reproduction.precision import autocast
from reproduction.training.checkpoints import config_of, load_checkpoint, model_from_checkpoint
from reproduction.files import write_json
from reproduction.training.runfolder import evaluation_path, open_data, refuse_run_file

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
                            workers=workers, shard=(rank, world), channels_last=channels_last) for c in streams]
    # Counts and the loss sum stay on the device, read once at the end: a read per batch would
    # make every batch wait for the device.
    counts = loss = None  # (top-1 hits, top-5 hits) int64, and the loss sum in float64
    seen = 0
    try:
        for got in zip(*batches):
            y = got[0][1]
            probs = ensemble_softmax(models, [got[streams.index(c)][0] for c in configs], y.device,
                                     ten_patch=ten_patch, device=device, precision=precision,
                                     channels_last=channels_last)
            best = probs.topk(min(5, probs.shape[1]), dim=1).indices
            if top5 is not None:
                top5.append(best.cpu())
            hits = torch.stack([(best[:, 0] == y).sum(), (best == y[:, None]).any(dim=1).sum()])
            batch_loss = torch.nn.functional.nll_loss(probs.clamp_min(1e-30).log(), y, reduction="sum").double()
            counts = hits if counts is None else counts + hits
            loss = batch_loss if loss is None else loss + batch_loss
            seen += len(y)
    finally:
        for m, was in zip(models, was_training):
            m.train(was)
    return _errors(counts, loss, seen, replicas) | {"patches": 10 if ten_patch else 1, "models": len(models)}


def ensemble_softmax(models: Sequence[nn.Module], inputs: Sequence[Tensor], home: torch.device, *,
                     ten_patch: bool, device: str | torch.device, precision: str, channels_last: bool) -> Tensor:
    """B×classes on `home`: each model's softmax on its input batch (B×10×… with ten_patch),
    averaged over the patches (§4.1), then over the models (§6)."""
    probs = 0
    for m, x in zip(models, inputs):
        views = x.flatten(0, 1) if ten_patch else x
        first = next(m.parameters(), None)  # its first tower's device (none: a parameter-free stand-in)
        views = views.to(first.device if first is not None else device)
        if channels_last:
            views = views.contiguous(memory_format=torch.channels_last)
        with autocast(views.device, precision):
            logits = m(views)
        logits = logits.float().to(home)
        probs = probs + average_softmax(logits.unflatten(0, x.shape[:2]) if ten_patch else logits[:, None])
    return probs / len(models)


def _errors(counts: Tensor | None, loss: Tensor | None, seen: int, replicas: Distributed | None) -> dict:
    """Top-1/top-5 error and mean loss from the device-side sums, added over the ranks."""
    top1, top5_hits = counts.tolist() if counts is not None else (0, 0)
    loss = loss.item() if loss is not None else 0.0
    if replicas is not None:  # integer counts are exact in float64; the loss sum is a float sum
        top1, top5_hits, loss, seen = replicas.sum([top1, top5_hits, loss, seen])
        top1, top5_hits, seen = int(top1), int(top5_hits), int(seen)
    return {"top1_error": 1 - top1 / seen, "top5_error": 1 - top5_hits / seen, "loss": loss / seen,
            "images": seen}


def final_metrics(model: nn.Module, dataset: PackedSet, stats: Stats, config: DataConfig, *,
                  centre: dict | None = None, **kw) -> dict:
    """Both of the paper's test protocols (Table 1: 10 patches; its footnote: centre only).
    centre: the centre-patch result of these same weights on this split, when the caller has it
    (training's last validation), so it is not computed twice."""
    return {"centre": centre or evaluate(model, dataset, stats, config, ten_patch=False, **kw),
            "ten_patch": evaluate(model, dataset, stats, config, ten_patch=True, **kw)}


def class_check(states: Sequence[dict], paths: Sequence[Path], dataset: PackedSet) -> None:
    """Every checkpoint must predict the data's classes, in the data's order: the same number,
    and the same class ids where the checkpoint records them (this project's runs do)."""
    ids = [c["id"] for c in dataset.classes]
    for state, path in zip(states, paths):
        n = state["config"]["model"]["num_classes"]
        if n != len(ids):
            raise ValueError(f"{path} has {n} classes, {dataset.root} has {len(ids)}; every model "
                             "must predict the data's classes")
        if state.get("classes") is not None and list(state["classes"]) != ids:
            raise ValueError(f"{path} was trained on another class list than {dataset.root} "
                             "(the class ids or their order differ); an ensemble averages the "
                             "softmax of one class list")


def model_changes(config) -> dict:
    """How a model differs from the paper's net (fc8's width aside), e.g. {"conv6": True}."""
    import dataclasses
    from reproduction.config import PAPER
    return {k: v for k, v in dataclasses.asdict(config.model).items()
            if k != "num_classes" and v != getattr(PAPER, k)}


def submission_ids(dataset: PackedSet) -> list[int]:
    """Each class's 1-based ILSVRC20xx_ID, which the challenge's submission format uses; a set
    without them (not prepared from an ILSVRC devkit) is refused: its ids would be guesses."""
    missing = [c["id"] for c in dataset.classes if "ilsvrc_id" not in c]
    if missing:
        raise ValueError(f"--predictions needs the challenge's class ids, and {dataset.root / 'manifest.json'} "
                         f"has no ilsvrc_id for {len(missing)} of its {len(dataset.classes)} classes (e.g. "
                         f"{missing[0]}); prepare the set from the ILSVRC devkit (python -m data_prep "
                         f"ilsvrc2010/ilsvrc2012, which records them) or drop --predictions")
    return [int(c["ilsvrc_id"]) for c in dataset.classes]


def write_predictions(path: Path, dataset: PackedSet, top5: Sequence[Tensor], *, batch_size: int) -> str:
    """The challenge's submission format: one line per image in file-name order, its five best
    classes as the dataset's own 1-based ids (ILSVRC20xx_ID), best first. top5: evaluate's
    per-batch top-5 indices, in stored order. Nothing is written unless every image of the split
    was predicted exactly once, in stored order (batch k holding images k·batch_size onwards):
    one skipped image would shift every later line. Returns the id kind."""
    ids = submission_ids(dataset)
    n = len(dataset)
    sizes = [len(b) for b in top5]
    expected = [min(batch_size, n - k * batch_size) for k in range(num_batches(n, batch_size))]
    if sizes != expected:
        raise ValueError(f"predictions for {sum(sizes)} images in {len(sizes)} batches, where the {dataset.split} "
                         f"split of {dataset.root} has {n} images in {len(expected)} batches of {batch_size}: "
                         f"not every image exactly once, in order; nothing written to {path}")
    names_file = dataset.root / f"{dataset.split}.names.txt"
    names = names_file.read_text().splitlines()
    files = [Path(name).name for name in names]
    if len(names) != n or len(set(files)) != n:
        raise ValueError(f"{names_file} has {len(names)} names ({len(set(files))} distinct file names) for the "
                         f"split's {n} images: the lines cannot be put in file-name order; re-prepare the set")
    rows = torch.cat(list(top5))
    order = sorted(range(n), key=lambda i: files[i])
    lines = (" ".join(str(ids[k]) for k in rows[i].tolist()) for i in order)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines))
    return "the manifest's ilsvrc_id"


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, argv)


def _main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if len(args.checkpoint) > 1 and args.output is None:
        parser.error("an ensemble's result belongs to no single run: give --output FILE")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    output = _output(args)  # refused now, not after the evaluation (its per-class files too)
    states = [load_checkpoint(p) for p in args.checkpoint]
    dataset, stats = open_data(args.data, [args.split])
    try:
        class_check(states, args.checkpoint, dataset)
        if args.predictions is not None:
            submission_ids(dataset)  # refused before the evaluation, not after it
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(str(e)) from None
    models, configs = [], []
    for state, path in zip(states, args.checkpoint):
        devices = parse_devices(args.device, towers=config_of(state, path).model.towers)
        model, config = model_from_checkpoint(state, devices=devices, path=path)
        models.append(model)
        configs.append(config)
    start, top5 = time.time(), []
    result = _both_protocols(models, configs, dataset, stats, args, top5)
    result |= _provenance(states, configs, dataset, args, seconds=round(time.time() - start, 1))
    result["per_class"] = _write_per_class(top5, dataset, output, len(models))
    if args.predictions is not None:
        try:
            kind = write_predictions(args.predictions, dataset, top5, batch_size=args.batch_size)
        except (ValueError, OSError) as e:
            raise UserError(str(e)) from None
        result["predictions"] = {"path": str(args.predictions), "ids": kind, "patches": 10}
    write_json(output, result)
    print(json.dumps(result, indent=2))
    pairs = result["per_class"]["most_confused"]
    print("most confused (true -> predicted, ten patches): " + ("; ".join(
        f"{p['true']} -> {p['predicted']} {p['images']} ({p['share']:.0%})" for p in pairs) or "none"))
    return 0


def per_class_paths(output: Path) -> tuple[Path, Path]:
    """Where the per-class table and the confusion figure go: beside the result, named after it."""
    return output.with_name(f"{output.stem}-per-class.json"), output.with_name(f"{output.stem}-confusion.png")


def _write_per_class(top5: list[Tensor], dataset: PackedSet, output: Path, models: int) -> dict:
    """Per-class errors and the confusion matrix (ten patches) into their own files; what the
    result itself keeps: where they are and the most-confused pairs."""
    table, figure = per_class_paths(output)
    per = per_class(top5, dataset.labels, dataset.classes)
    write_json(table, {"protocol": "ten patches (§4.1)", "split": dataset.split, **per})
    plot_confusion(per, figure, f"{dataset.split}: top-1 confusion, ten patches"
                                + (f", ensemble of {models}" if models > 1 else ""))
    return {"table": str(table), "figure": str(figure), "most_confused": per["most_confused"][:5]}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m reproduction.evaluate",
        description="Top-1/top-5 error of a checkpoint on the centre patch and with the ten-patch "
                    "softmax average (§4.1, §6); of an ensemble when several checkpoints are given "
                    "(§6: the models' softmax outputs averaged). Writes the result (default: "
                    "eval-<split>.json beside the checkpoint; a run's own files are never replaced) "
                    "and prints it, and beside it each class's top-1/top-5 error with the confusion "
                    "matrix (<result>-per-class.json) and its figure (<result>-confusion.png).")
    parser.add_argument("--checkpoint", type=Path, nargs="+", required=True, metavar="CHECKPOINT",
                        help="a run's checkpoint.pt; several = an ensemble (the models may differ in "
                             "architecture but must share the data's class list)")
    parser.add_argument("--data", type=Path, required=True, help="a folder prepared by python -m data_prep")
    parser.add_argument("--split", default="val", help="the split to evaluate (default: val)")
    parser.add_argument("--device", default=None,
                        help="cpu, cuda, or two devices 'cuda:0,cuda:1' for the towers (default: the GPU(s) if any)")
    parser.add_argument("--batch-size", type=int, default=128, help="images per batch (default 128)")
    parser.add_argument("--output", type=Path, default=None,
                        help="where to write the result (default: eval-<split>.json beside the checkpoint; "
                             "never a run's own file such as final.json; required for an ensemble)")
    parser.add_argument("--predictions", type=Path, default=None, metavar="FILE",
                        help="also write each image's top-5 classes (ten patches) in the challenge's "
                             "submission format: one line per image in file-name order, five "
                             "1-based ILSVRC20xx_IDs, best first (the set must record them: data_prep "
                             "ilsvrc2010/ilsvrc2012; refused otherwise, and unless every image was "
                             "predicted once)")
    return parser


def _output(args: argparse.Namespace) -> Path:
    """--output (or its default) after checking it and --predictions: writable, neither an input
    nor a file of a run folder that another command wrote, and not the same file."""
    output = evaluation_path(args.checkpoint[0], args.split, args.output)
    table, figure = per_class_paths(output)
    for option, path in (("--output", output), ("--predictions", args.predictions),
                         ("--output (its per-class table)", table), ("--output (its confusion figure)", figure)):
        if path is not None:
            writable_file(path, option, inputs=[*args.checkpoint, args.data])
            refuse_run_file(path, option, "evaluate")
    if args.predictions is not None and os.path.realpath(args.predictions) == os.path.realpath(output):
        raise UserError(f"--predictions {args.predictions} is also the --output file; give each its own file")
    return output


def _both_protocols(models: list[nn.Module], configs: list, dataset: PackedSet, stats: Stats,
                    args: argparse.Namespace, top5: list[Tensor]) -> dict:
    """The centre patch's and the ten patches' result (the latter's top-5 classes into top5)."""
    first = configs[0].train
    kw = dict(batch_size=args.batch_size, device=parse_devices(args.device, towers=1)[0],
              precision=first.precision, channels_last=first.channels_last)
    data_configs = [c.data for c in configs]
    return {"centre": evaluate(models, dataset, stats, data_configs, ten_patch=False, **kw),
            "ten_patch": evaluate(models, dataset, stats, data_configs, ten_patch=True, top5=top5, **kw)}


def _provenance(states: list[dict], configs: list, dataset: PackedSet, args: argparse.Namespace, *,
                seconds: float) -> dict:
    """What was evaluated, on what, and what the report needs to place it in Table 1 / 2."""
    one = len(states) == 1
    return {"checkpoint": str(args.checkpoint[0]) if one else [str(p) for p in args.checkpoint],
            "data": str(args.data), "split": args.split,
            "epochs_trained": states[0]["epoch"] if one else [s["epoch"] for s in states], "seconds": seconds,
            "dataset": dataset.manifest.get("dataset"), "architectures": [model_changes(c) for c in configs]}


if __name__ == "__main__":
    sys.exit(main())
