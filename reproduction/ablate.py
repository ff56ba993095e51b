"""The paper's ablations as one study: every experiment × seed trained with one recipe, then one
table of what the seeds support.

    python -m reproduction.ablate paper no_lrn tanh --data DIR --seeds 0 1 2 --out DIR [--set k=v ...]

Each run trains into OUT/runs/<experiment>/seed<seed> with the same --set changes and the same
epochs (never cut by a time budget, so the variants are comparable). A finished run with the
same config is reused and an interrupted one resumed, so the command can be run again after
any stop. OUT/summary.json and OUT/table.md hold, per experiment, the mean ± sd over seeds of
the centre-patch and ten-patch top-1/top-5 error, the difference from `paper` paired by seed
with its standard error, and a verdict by one rule (VERDICT_RULE); OUT/curves.png draws the
validation curves (mean over seeds, band from the lowest to the highest seed); Fig. 3's
colour-specificity per tower is given for every `paper` seed.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Sequence

from reproduction.config import RunConfig, override
from reproduction.errors import UserError, run_cli
from reproduction.experiments import EXPERIMENTS

VERDICT_RULE = ("|Δ| > 2 s.e. of the seeds' paired differences, over at least 3 seeds: a measured effect, its "
                "sign set against the paper's; otherwise inconclusive at this scale; a variant at chance is no "
                "evidence either way")
# The sign the paper reports for each ablation on ILSVRC top-1 (+: the ablation raises the error).
PAPER_SIGN = {"no_lrn": (+1, "§3.3: +1.4 / +1.2"), "no_overlap_pool": (+1, "§3.4: +0.4 / +0.3"),
              "one_tower": (+1, "§3.2: +1.7 / +1.2"), "no_pca_lighting": (+1, "§4.1: over +1 top-1"),
              "no_conv2": (+1, "§7: about +2 top-1"), "no_conv3": (+1, "§7: about +2 top-1"),
              "no_conv4": (+1, "§7: about +2 top-1"),
              "tanh": (+1, "no ILSVRC number; §3.1 (CIFAR-10): tanh learns ~6× slower")}


def run_config(experiment: str, changes: Sequence[str], seed: int, classes: int) -> RunConfig:
    return override(override(EXPERIMENTS[experiment], list(changes)), {"seed": seed, "num_classes": classes})


def train_one(experiment: str, config: RunConfig, data: Path, folder: Path) -> str:
    """Reuse, resume or start one run; returns what was done."""
    from reproduction.training.checkpoints import config_dict
    from reproduction.files import read_json
    from reproduction.train import train
    if (folder / "final.json").is_file():
        if read_json(folder / "config.json").get("config") != json.loads(json.dumps(config_dict(config))):
            raise UserError(f"{folder} holds a finished run of another config (another --set or data); "
                            "give another --out, or delete that folder")
        return "reused"
    resume = (folder / "checkpoint.pt").is_file()
    train(config, data, folder, experiment=experiment, resume=resume,
          command=["python", "-m", "reproduction.ablate", *sys.argv[1:]])
    return "resumed" if resume else "trained"


def fig3(folder: Path) -> list[dict] | None:
    """conv1's colour-specificity per tower (Fig. 3) of a run's final weights, if they are here."""
    from reproduction.training.checkpoints import load_checkpoint
    from reproduction.visualize import colour_specificity, filters_summary
    path = folder / "checkpoint.pt"
    if not path.is_file():
        return None
    state = load_checkpoint(path)
    weights = state["model"]["conv1.weight"]
    return filters_summary(colour_specificity(weights), state["config"]["model"]["towers"])


def summarise(experiments: Sequence[str], seeds: Sequence[int], out: Path, command: str) -> dict:
    from reproduction.files import read_json
    from reproduction.training.runfolder import read_metrics
    from reproduction.stats import mean_sd, sd_to_json
    runs = {e: {s: out / "runs" / e / f"seed{s}" for s in seeds} for e in experiments}
    finals = {e: {s: read_json(f / "final.json") for s, f in r.items()} for e, r in runs.items()}
    meta = read_json(runs[experiments[0]][seeds[0]] / "config.json")
    classes = meta["data"]["classes"]
    chance = 1 - 1 / classes
    summary = {"command": command, "rule": VERDICT_RULE, "seeds": list(seeds),
               "scale": {k: meta["data"][k] for k in ("dataset", "classes", "train_images", "val_images")}
               | {"epochs": meta["config"]["train"]["epochs"], "batch_size": meta["config"]["train"]["batch_size"],
                  "path": meta["data"]["path"]}, "chance_top1": chance, "experiments": {}}
    for e in experiments:
        row = {"runs": {s: str(f.relative_to(out)) for s, f in runs[e].items()}}
        for protocol in ("centre", "ten_patch"):
            for k in ("top1_error", "top5_error"):
                m, sd = mean_sd([finals[e][s][protocol][k] for s in seeds])
                row[f"{protocol}_{k}"] = {"mean": m, "sd": sd_to_json(sd)}
        row["curves"] = {s: [r["val_top1_error"] for r in read_metrics(f)] for s, f in runs[e].items()}
        if e != "paper" and "paper" in experiments:
            row["vs_paper"] = {k: _paired(finals[e], finals["paper"], seeds, k) for k in ("top1_error", "top5_error")}
            row["verdict"] = verdict(e, row, chance, len(seeds))
        summary["experiments"][e] = row
    if "paper" in experiments:
        summary["fig3"] = {s: fig3(runs["paper"][s]) for s in seeds}
    return summary


def _paired(a: dict, b: dict, seeds: Sequence[int], key: str) -> dict:
    from reproduction.stats import mean_sd, sd_to_json
    diffs = [a[s]["ten_patch"][key] - b[s]["ten_patch"][key] for s in seeds]
    m, sd = mean_sd(diffs)
    se = sd / math.sqrt(len(diffs)) if len(diffs) > 1 else float("nan")
    return {"per_seed": diffs, "mean": m, "se": sd_to_json(se), "protocol": "ten_patch"}


def verdict(experiment: str, row: dict, chance: float, n: int) -> str:
    d = row["vs_paper"]["top1_error"]
    if row["ten_patch_top1_error"]["mean"] >= chance - 0.005:
        return "at chance: no evidence either way"
    if n < 3 or d["se"] is None or abs(d["mean"]) <= 2 * d["se"]:
        return "inconclusive at this scale"
    sign, paper = PAPER_SIGN.get(experiment, (0, "no number in the paper"))
    said = f"measured: top-1 {'+' if d['mean'] > 0 else '−'}{abs(100 * d['mean']):.1f} points"
    if sign == 0:
        return f"{said} ({paper})"
    return f"{said}, {'the paper' if (d['mean'] > 0) == (sign > 0) else 'the opposite of the paper'}'s sign ({paper})"


def table(summary: dict) -> str:
    def pm(cell: dict) -> str:
        sd = cell["sd"]
        return f"{100 * cell['mean']:.1f}" + ("" if sd is None else f" ± {100 * sd:.1f}")

    def delta(d: dict) -> str:
        return f"{100 * d['mean']:+.1f}" + ("" if d["se"] is None else f" ± {100 * d['se']:.1f}")
    s = summary["scale"]
    lines = [f"Scale: {s['dataset']}, {s['classes']} classes, {s['train_images']:,} training / {s['val_images']:,} "
             f"val images, {s['epochs']} epochs at batch {s['batch_size']}; seeds {summary['seeds']} "
             f"(n = {len(summary['seeds'])}); chance {100 * summary['chance_top1']:.1f} % top-1. "
             f"Errors in %, mean ± sd over seeds; Δ vs paper (ten patches) paired by seed, ± its s.e.",
             f"Verdict rule: {summary['rule']}.", "",
             "| experiment | n | centre top-1 | centre top-5 | ten-patch top-1 | ten-patch top-5 | Δ top-1 | Δ top-5 "
             "| verdict |", "|---|---|---|---|---|---|---|---|---|"]
    for e, r in summary["experiments"].items():
        vs = r.get("vs_paper")
        lines.append(f"| {e} | {len(r['runs'])} | {pm(r['centre_top1_error'])} | {pm(r['centre_top5_error'])} | "
                     f"{pm(r['ten_patch_top1_error'])} | {pm(r['ten_patch_top5_error'])} | "
                     f"{delta(vs['top1_error']) if vs else '–'} | {delta(vs['top5_error']) if vs else '–'} | "
                     f"{r.get('verdict', 'the reference')} |")
    if summary.get("fig3"):
        lines += ["", "Fig. 3, conv1 colour-specificity per tower (0 grey, 1 pure colour), each `paper` seed: "
                  + "; ".join(f"seed {s}: " + ", ".join(f"{t['tower']} {t['mean']:.3f} ± {t['sd']:.3f}" for t in towers)
                              for s, towers in summary["fig3"].items() if towers)]
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path) -> None:
    """Validation top-1 error (centre patch) per epoch: the mean over seeds, band min–max."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for e, r in summary["experiments"].items():
        curves = list(r["curves"].values())
        length = min(map(len, curves))
        x = range(1, length + 1)
        cols = [[c[i] * 100 for c in curves] for i in range(length)]
        ax.plot(x, [sum(c) / len(c) for c in cols], marker="o", label=f"{e} (n = {len(curves)})")
        ax.fill_between(x, [min(c) for c in cols], [max(c) for c in cols], alpha=0.2)
    ax.axhline(100 * summary["chance_top1"], color="grey", ls=":", lw=0.8, label="chance")
    ax.set_xlabel("epoch")
    ax.set_ylabel("val top-1 error, centre patch (%)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, argv)


def _main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reproduction.ablate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiments", nargs="+", choices=sorted(EXPERIMENTS), metavar="EXPERIMENT",
                        help="experiments of reproduction/experiments.py, e.g. paper no_lrn tanh (include paper "
                             "for the differences and verdicts)")
    parser.add_argument("--data", type=Path, required=True, help="a folder prepared by python -m data_prep")
    parser.add_argument("--out", type=Path, required=True, help="the study's folder (runs, summary, table, figure)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default 0 1 2)")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="the one recipe of every run, e.g. epochs=3 batch_size=32 fused_lrn=True")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if any(s < 0 for s in args.seeds) or len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds {args.seeds}: give distinct integers >= 0")
    experiments = list(dict.fromkeys(args.experiments))
    from reproduction.training.runfolder import open_data
    classes = len(open_data(args.data)[0].classes)
    try:
        configs = {(e, s): run_config(e, args.set, s, classes) for s in args.seeds for e in experiments}
    except ValueError as e:
        parser.error(f"--set: {e}")
    began, trained = time.time(), 0
    for i, ((e, s), config) in enumerate(configs.items()):
        print(f"study: run {i + 1}/{len(configs)}: {e} seed {s}", flush=True)
        done = train_one(e, config, args.data, args.out / "runs" / e / f"seed{s}")
        trained += done != "reused"
        left = len(configs) - i - 1
        eta = (time.time() - began) / trained * left if trained else 0.0
        print(f"study: {e} seed {s} {done}; {left} run(s) left" + (f", ETA {eta / 60:.0f} min" if left and trained else ""),
              flush=True)
    from reproduction.files import write_json
    summary = summarise(experiments, args.seeds, args.out, "python -m reproduction.ablate " + " ".join(argv))
    write_json(args.out / "summary.json", summary)
    (args.out / "table.md").write_text(table(summary))
    plot(summary, args.out / "curves.png")
    print(table(summary) + f"\nwrote {args.out / 'summary.json'}, {args.out / 'table.md'}, {args.out / 'curves.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
