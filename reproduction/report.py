"""Write results/README.md from the run folders under results/: our numbers beside the paper's
Tables 1 and 2 and its ablation effects, with n seeds, epochs and the run folders behind each.

    python -m reproduction.report [--results results]

A run folder is any folder holding config.json, metrics.jsonl and final.json (as written by
`python -m reproduction.train`); only those text files are meant to be committed, never the
checkpoints beside them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import statistics
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Iterator, Sequence

from reproduction.config import RunConfig, from_dict
from reproduction.errors import run_cli, writable_file
from reproduction.experiments import EXPERIMENTS
from reproduction.stats import epochs_to, mean_sd, sd_from_json, tower_gap, towers_specialise

# Error added by each ablation, as the paper reports it (top-1, top-5; None: not reported).
PAPER_EFFECTS = {
    "no_lrn": ("§3.3", 1.4, 1.2),
    "no_overlap_pool": ("§3.4", 0.4, 0.3),
    "one_tower": ("§3.2", 1.7, 1.2),
    "no_pca_lighting": ("§4.1", "> 1", None),
    "tanh": ("§3.1", None, None),
    "no_dropout": ("§4.2", None, None),
    "lrn_literal": ("§3.3", None, None),
    "augment_literal": ("§4.1", None, None),
    "mean_offset": ("§4.1", None, None),
    "lighting_eigenvalues": ("§4.1", None, None),
    "no_lighting_rescale": ("§4.1", None, None),
    "no_conv2": ("§7", "≈ 2", None),
    "no_conv3": ("§7", "≈ 2", None),
    "no_conv4": ("§7", "≈ 2", None),
    "conv6": ("§6", None, None),  # Table 2's 1 CNN* is 1.7 / 1.6 better, but pre-trained on Fall 2011
}


def find_runs(results: Path) -> list[dict]:
    """Every finished run folder under `results`, with its config, metrics and final numbers."""
    from reproduction.training.runfolder import read_run  # the run folder's one reader (it loads torch: imported here so --help is quick)
    found = []
    for final in sorted(results.rglob("final.json")):
        folder = final.parent
        if not (folder / "config.json").exists():
            continue
        try:
            meta = json.loads((folder / "config.json").read_text())
        except (OSError, ValueError):
            meta = {"config": {"model": None}}  # read_run says what is wrong with it
        if not isinstance(meta, dict) or "model" not in meta.get("config", {}):
            continue  # not an AlexNet run (e.g. the CIFAR-10 four-layer nets)
        run, why = read_run(folder)
        if run is None:  # damaged, unfinished or non-finite: said, never a crash or a result
            print(f"report: left out {folder}: {why}", file=sys.stderr)
            continue
        found.append(run)
    return found


def recipe_changes(meta: dict) -> str:
    """How a run's config differs from its named experiment's (seed and fc8's width aside), e.g.
    "batch_size=32, epochs=3": what makes it a scaled-down or modified version of that run."""
    base = EXPERIMENTS.get(meta["experiment"])
    if base is None:
        return "custom"
    ran = dataclasses.asdict(from_dict(RunConfig, meta["config"]))
    want = dataclasses.asdict(base)
    # stuck_steps only stops a run: a finished run's numbers do not depend on it.
    changes = [f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}"
               for part in ran for k, v in ran[part].items()
               if k not in ("seed", "num_classes", "stuck_steps") and v != want[part][k]]
    return ", ".join(changes) or "none"


def data_label(meta: dict) -> str:
    """The data set with its size, e.g. "cifar10, 10 classes, 4,000 / 500 images": subsets of
    one set are different data."""
    d = meta["data"]
    return (f"{d.get('dataset') or '?'}, {d['classes']} classes, "
            f"{d['train_images']:,} / {d['val_images']:,} images")


def group_runs(found: list[dict]) -> dict[tuple, list[dict]]:
    """(data, experiment, recipe changes) -> runs (one per seed)."""
    groups = defaultdict(list)
    for r in found:
        key = (data_label(r["meta"]), r["meta"]["experiment"], recipe_changes(r["meta"]))
        groups[key].append(r)
    return dict(sorted(groups.items()))


def fmt(mean: float, sd: float) -> str:
    return f"{mean:.2f}" if sd != sd else f"{mean:.2f} ± {sd:.2f}"


def errors(runs: list[dict], protocol: str, which: str) -> list[float]:
    return [100 * r["final"][protocol][f"{which}_error"] for r in runs]


def links(runs: list[dict], base: Path) -> str:
    return ", ".join(f"[{r['folder'].name}]({r['folder'].relative_to(base).as_posix()})" for r in runs)


def epochs_text(run: dict) -> str:
    """A run's epochs, e.g. "3", or "3 (the last on 2,547 of 5,000 images)" where the main job's
    deadline ended its last epoch early."""
    final, last = run["final"], run["final"].get("last_epoch_images")
    if last is None:
        return str(final["epochs"])
    return f"{final['epochs']} (the last on {last:,} of {run['meta']['data']['train_images']:,} images)"


def results_table(groups: dict, base: Path) -> list[str]:
    lines = ["| data (train / val) | experiment | changed from the experiment's config | seeds | epochs "
             "| top-1 (centre) | top-5 (centre) | top-1 (10 patches) | top-5 (10 patches) | chance | runs |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for (dataset, experiment, changes), runs in groups.items():
        cells = [fmt(*mean_sd(errors(runs, p, w))) for p in ("centre", "ten_patch") for w in ("top1", "top5")]
        epochs = "/".join(sorted({epochs_text(r) for r in runs}))
        classes = runs[0]["meta"]["data"]["classes"]
        chance = f"{100 * (1 - 1 / classes):.1f} / {100 * max(0.0, 1 - 5 / classes):.1f}"
        lines.append(f"| {dataset} | {experiment} | {changes} | {len(runs)} | {epochs} | " + " | ".join(cells)
                     + f" | {chance} | {links(runs, base)} |")
    return lines


def ablation_table(groups: dict) -> list[str]:
    """Each ablation minus `paper` on the same data and recipe (centre patch), ± the two groups'
    seed-to-seed sd combined as √(sd_a² + sd_p²)."""
    lines = ["| data | ablation | seeds | Δ top-1 (ours) | Δ top-5 (ours) | Δ top-1 (paper) | Δ top-5 (paper) "
             "| beyond the seed spread? | same direction as the paper? |", "|---|---|---:|---:|---:|---:|---:|---|---|"]
    for (dataset, experiment, changes), runs in groups.items():
        base = groups.get((dataset, "paper", changes))
        if experiment == "paper" or base is None:
            continue
        deltas = []
        for which in ("top1", "top5"):
            (ma, sa), (mp, sp) = mean_sd(errors(runs, "centre", which)), mean_sd(errors(base, "centre", which))
            sd = (sa ** 2 + sp ** 2) ** 0.5
            deltas.append((ma - mp, sd))
        section, p1, p5 = PAPER_EFFECTS.get(experiment, ("", None, None))
        spread = deltas[0][1]
        verdict = "n < 2 seeds" if spread != spread else ("yes" if abs(deltas[0][0]) > 2 * spread else "no")
        show = lambda v: "—" if v is None else (f"+{v}" if isinstance(v, float) else v)
        # The paper reports every effect as added error (> 0); "> 1" counts as positive too.
        direction = "—" if p1 is None else ("yes" if deltas[0][0] > 0 else "no")
        lines.append(f"| {dataset} | {experiment} ({section}) | {len(runs)} vs {len(base)} | "
                     f"{deltas[0][0]:+.2f} ± {deltas[0][1]:.2f} | {deltas[1][0]:+.2f} ± {deltas[1][1]:.2f} | "
                     f"{show(p1)} | {show(p5)} | {verdict} | {direction} |")
    if len(lines) == 2:
        return ["No ablation has been run beside a `paper` run of the same data and recipe yet."]
    return lines


def ten_patch_table(groups: dict) -> list[str]:
    lines = ["| data | experiment | Δ top-1 (centre − 10 patches) | Δ top-5 | paper (ILSVRC-2010) |",
             "|---|---|---:|---:|---|"]
    for (dataset, experiment, changes), runs in groups.items():
        d = [mean_sd([c - t for c, t in zip(errors(runs, "centre", w), errors(runs, "ten_patch", w))])
             for w in ("top1", "top5")]
        lines.append(f"| {dataset} | {experiment} | {fmt(*d[0])} | {fmt(*d[1])} | 1.5 / 1.3 |")
    return lines


def plot_curves(groups: dict, out: Path) -> list[Path]:
    """One PNG per data set: centre-patch val top-1 error (solid) and training error (dashed)
    against epochs, each experiment's seeds averaged."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    written = []
    for dataset in sorted({k[0] for k in groups}):  # one figure per data set and size
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for (d, experiment, changes), runs in groups.items():
            if d != dataset:
                continue
            n = min(len(r["metrics"]) for r in runs)
            if n == 0:
                continue
            epochs_axis = [e + 1 for e in range(n)]
            val = [statistics.fmean(100 * r["metrics"][e]["val_top1_error"] for r in runs) for e in range(n)]
            tr = [statistics.fmean(100 * r["metrics"][e]["train_error"] for r in runs) for e in range(n)]
            label = experiment if changes == "none" else f"{experiment} ({changes})"
            line, = ax.plot(epochs_axis, val, label=f"{label}, n={len(runs)}")
            ax.plot(epochs_axis, tr, "--", color=line.get_color(), alpha=0.6)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel("top-1 error (%)")
        ax.set_title(f"{dataset}\nvalidation top-1 error (solid, centre patch), training error (dashed)",
                     fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        d = next(runs for (label, _, _), runs in groups.items() if label == dataset)[0]["meta"]["data"]
        path = out / f"curves-{d['dataset']}-{d['train_images']}-{d['val_images']}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def write_report(results: Path) -> Path:
    results = Path(results)
    groups = group_runs(find_runs(results))
    ours = table_rows(groups, find_evaluations(results), results)
    lines = ["# Results", "",
             "Written by `python -m reproduction.report` from the run folders below; every number "
             "links to the run folder(s) that produced it (config.json there holds the command, "
             "the resolved config, the git SHA and the device). Errors are in %, mean ± sd over "
             "seeds (sd shown when n ≥ 2).", ""]
    lines += paper_tables(ours)
    lines += ablation_studies(results)
    lines += claims_ledger(groups, ours, results)
    lines += ["", "## Ours", ""]
    if not groups:
        lines += ["No finished runs yet (a run folder needs config.json, metrics.jsonl and final.json)."]
    else:
        lines += ["None of these is ILSVRC: each row names its data set, so compare them with the "
                  "paper's numbers for direction and size only.", "",
                  "Every number is the last epoch's net (final.json). Each run also keeps best.pt, the "
                  "epoch with the lowest centre-patch val top-1 error; val is also the set reported here, "
                  "so a number from best.pt would be optimistic (so are the paper's: its ε was divided "
                  "when the val error stopped improving, and Table 2 reports ILSVRC-2012 val).", ""]
        lines += results_table(groups, results)
        lines += ["", "Made by (each run folder's config.json holds its exact command and config):", ""]
        for (dataset, experiment, changes), runs in groups.items():
            commands = sorted({" ".join(r["meta"]["command"]) for r in runs})
            devices = sorted({", ".join(r["meta"]["environment"]["device_names"]) for r in runs})
            lines.append(f"- {dataset}, `{experiment}`: `{'`, `'.join(commands)}` on {'; '.join(devices)}, "
                         f"torch {runs[0]['meta']['environment']['torch']}, seeds "
                         f"{', '.join(str(r['meta']['seed']) for r in runs)}")
        lines += ["", "### Ablations: error added by each change (centre patch, ours vs the paper's ILSVRC "
                  "numbers)", "", "Δ = ablation − `paper` on the same data and recipe; ± combines the two "
                  "groups' seed-to-seed sd. \"Beyond the seed spread\" means |Δ top-1| > 2 × that sd.", ""]
        lines += ablation_table(groups)
        lines += ["", "### Ten patches vs the centre patch (§4.1)", ""]
        lines += ten_patch_table(groups)
        lines += ["", "### Training curves", ""]
        pngs = plot_curves(groups, results)
        for stale in set(results.glob("curves-*.png")) - set(pngs):  # of run folders since removed
            stale.unlink()
        lines += [f"![{p.stem}]({p.name})" for p in pngs]
    lines += cifar_sections(results)
    lines += filter_sections(results)
    path = results / "README.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def ablation_studies(results: Path) -> list[str]:
    """Each study `python -m reproduction.ablate` wrote under results/: its table, figure and command."""
    lines = []
    for summary in sorted(results.rglob("summary.json")):
        table, study = summary.with_name("table.md"), json.loads(summary.read_text())
        if "rule" not in study or not table.is_file():
            continue  # a CIFAR-10 experiment's summary
        where = summary.parent.relative_to(results)
        lines += [f"## Ablation study: {where}", "", f"`{study['command']}`", "", table.read_text().rstrip(), ""]
        if summary.with_name("curves.png").is_file():
            lines += [f"![validation curves]({where / 'curves.png'})", ""]
    return lines


# --- the CIFAR-10 experiments (python -m reproduction.experiments) and Fig. 3 ------------------

def _pm(values: Sequence[float]) -> str:
    return fmt(*mean_sd(values))


def cifar_sections(results: Path) -> list[str]:
    """§3.1 Fig. 1 and §3.3 on CIFAR-10, from each experiment's summary.json."""
    lines = []
    fig1 = results / "cifar10" / "relu-tanh" / "summary.json"
    if fig1.exists():
        lines += fig1_section(json.loads(fig1.read_text()), fig1.parent.relative_to(results).as_posix())
    lrn = results / "cifar10" / "lrn" / "summary.json"
    if lrn.exists():
        lines += lrn_section(json.loads(lrn.read_text()), lrn.parent.relative_to(results).as_posix())
    return lines


def fig1_section(s: dict, base: str) -> list[str]:
    """§3.1, Fig. 1: epochs to 25% training error with ReLU and tanh, their ratio and the sweep."""
    n = len(next(iter(s["activations"].values()))["runs"])
    lines = ["", "## §3.1, Fig. 1 on CIFAR-10: epochs to 25% training error, ReLU vs tanh", "",
             "Paper: a four-layer CNN with ReLUs reaches 25% training error on CIFAR-10 about six "
             "times faster than the same net with tanh, each at its own best learning rate, without "
             "regularisation. Ours: Krizhevsky's layers-18pct net (conv 32-32-64 + fc 10, "
             "`reproduction/cifar.py`), no weight decay, no augmentation, all 50,000 training images, "
             f"ε per activation from the sweep below, {n} seeds; training error over each fifth of an "
             "epoch, the crossing interpolated.", "",
             "| activation | ε | epochs to 25% (per seed) | mean ± sd | runs |", "|---|---:|---|---:|---|"]
    for name, a in s["activations"].items():
        reached = [r["epochs_to_25"] for r in a["runs"].values()]
        shown = ", ".join(f"{v:.2f}" if v is not None else f"> {r['epochs_run']}"
                          for v, r in zip(reached, a["runs"].values()))
        ok = [v for v in reached if v is not None]
        stat = _pm(ok) if len(ok) == len(reached) else "not all reached"
        runs = ", ".join(f"[seed {k}]({base}/{r['folder']})" for k, r in a["runs"].items())
        lines.append(f"| {name} | {a['lr']:g} | {shown} | {stat} | {runs} |")
    lines += _ratio_line(s.get("ratio", {}))
    lines += _threshold_table(s)
    lines += _sweep_table(s)
    lines += ["", f"![Fig. 1, ours]({base}/fig1.png)", "", f"Made by: `{s['command']}` (CPU; the "
              "run folders' config.json hold the device, versions and git SHA)."]
    return lines


def _ratio_line(r: dict) -> list[str]:
    """tanh's epochs to 25% over ReLU's, per seed and mean ± sd, or why there is none."""
    if "mean" in r:
        bound = "≥ " if r["lower_bound"] else ""
        return ["", f"**tanh / ReLU: {bound}{fmt(r['mean'], sd_from_json(r['sd']) if len(r['per_seed']) > 1 else float('nan'))}× "
                f"(per seed: {', '.join(f'{v:.1f}' for v in r['per_seed'])}; paper: ~6×).** "
                + _verdict_ratio(r)]
    if "note" in r:
        return ["", f"**No ratio: {r['note']}.**"]
    return []


def _sweep_table(s: dict) -> list[str]:
    """The learning-rate sweep that chose each activation's ε."""
    lines = ["", "Learning-rate sweep (seed 0, each ε for the sweep's epochs; the fastest to 25% wins, "
             "else the lowest training error):", "",
             "| activation | ε | epochs to 25% | training error at the end | diverged |", "|---|---:|---:|---:|---|"]
    for name, a in s["activations"].items():
        for w in a["sweep"]:
            reached = "—" if w["epochs_to_25"] is None else f"{w['epochs_to_25']:.2f}"
            lines.append(f"| {name} | {w['lr']:g} | {reached} | {100 * w['train_error']:.1f}% | "
                         f"{'yes' if w['diverged'] else 'no'} |")
    return lines


def lrn_section(s: dict, base: str) -> list[str]:
    """§3.3: test error with and without response normalisation, and their paired difference."""
    lines = ["", "## §3.3 on CIFAR-10: test error with and without response normalisation", "",
             "Paper: a four-layer CNN, 13% test error without normalisation, 11% with. Ours: "
             "Krizhevsky's layers-conv-local-13pct / -11pct nets (conv 64-64, local 32-32, fc 10; "
             "cross-map normalisation n=5, α=0.001, β=0.75, k=1), random 24×24 crops and flips, "
             "centre crop at test, all 50,000 training images, the 10,000 test images.", "",
             "| variant | seeds | epochs | test error % (mean ± sd) | per seed | paper | runs |",
             "|---|---:|---:|---:|---|---:|---|"]
    paper = {"no_norm": "13", "norm": "11"}
    for name, v in s["variants"].items():
        errs = [100 * r["test_error"] for r in v["runs"].values()]
        runs = ", ".join(f"[seed {k}]({base}/{r['folder']})" for k, r in v["runs"].items())
        lines.append(f"| {name} | {len(errs)} | {v['epochs']} | {_pm(errs)} | "
                     f"{', '.join(f'{e:.2f}' for e in errs)} | {paper.get(name, '—')} | {runs} |")
    d = s.get("difference")
    if d:
        lines += _lrn_difference(d)
    return lines + ["", f"Made by: `{s['command']}` (CPU)."]


def _lrn_difference(d: dict) -> list[str]:
    """The paired difference (without − with normalisation) weighed against the seed spread."""
    m, sd = 100 * d["mean"], 100 * sd_from_json(d["sd"])
    if sd != sd:  # one seed: no spread to weigh the difference against
        verdict = "One seed only: no seed-to-seed spread to weigh it against."
    elif abs(m) <= 2 * sd:
        verdict = "Within twice its seed-to-seed sd: at this scale the effect is not clearly apart from seed noise."
    elif m > 0:
        verdict = ("Beyond twice its seed-to-seed sd: normalisation lowers the error, as the paper says "
                   f"({'more' if m > 2 else 'less'} than its 2 points).")
    else:
        verdict = "Beyond twice its seed-to-seed sd, and the other way: normalisation raised the error here."
    wins = sum(v > 0 for v in d["per_seed"])
    return ["", f"**{d['of']}: {m:+.2f}{'' if sd != sd else f' ± {sd:.2f}'} points** (paired by seed; paper: +2; normalisation "
            f"had the lower error in {wins} of {len(d['per_seed'])} seeds). {verdict}"]


def _threshold_table(s: dict) -> list[str]:
    """The same race to higher error levels, which both activations reach within the cap: how
    the ratio grows as the threshold falls."""
    acts = s["activations"]
    if not {"relu", "tanh"} <= set(acts):
        return []
    lines = ["", "The race to other training errors (same runs; epochs, mean ± sd over seeds):", "",
             "| training error | ReLU | tanh | tanh / ReLU |", "|---:|---:|---:|---:|"]
    for threshold in (0.40, 0.35, 0.30, 0.25):
        reached = {name: [epochs_to(r["curve"], threshold) for r in acts[name]["runs"].values()]
                   for name in ("relu", "tanh")}
        if any(v is None for vs in reached.values() for v in vs):
            cells = [_pm(v) if None not in v else "not reached by every seed" for v in reached.values()]
            lines.append(f"| {threshold:.0%} | {cells[0]} | {cells[1]} | — |")
            continue
        ratios = [t / r for r, t in zip(reached["relu"], reached["tanh"])]
        lines.append(f"| {threshold:.0%} | {_pm(reached['relu'])} | {_pm(reached['tanh'])} | {_pm(ratios)}× |")
    return lines


def _verdict_ratio(r: dict) -> str:
    m = r["mean"]
    if r["lower_bound"]:
        return ("tanh runs that never reached 25% count at the epoch cap, so the ratio is a lower bound: "
                "at least the paper's ~6×." if m >= 6 else "tanh runs that never reached 25% count at the "
                "epoch cap, so the ratio is a lower bound (a longer cap would tell whether it reaches ~6×).")
    if m < 1:
        return "Disagrees with the paper: tanh was the faster one here."
    if m < 3:
        return "ReLU is faster, as the paper says, but by well under its ~6×."
    if m <= 9:
        return "Agrees with the paper's ~6× in size."
    return "ReLU is faster, by more than the paper's ~6×."


def json_records(results: Path) -> Iterator[tuple[Path, dict]]:
    """Every readable JSON object under `results`, in path order (unreadable files are passed over)."""
    for path in sorted(results.rglob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict):
            yield path, data


def filter_sections(results: Path) -> list[str]:
    """Fig. 3: each conv1 picture written by `python -m reproduction.visualize filters` under
    results/, with its per-tower colour-specificity scores."""
    found = fig3_records(results)
    if not found:
        return []
    lines = ["", "## Fig. 3: conv1's kernels per tower", "",
             "Colour specificity = the share of a kernel's energy off the grey axis (0: grey, 1: pure "
             "colour contrast; random weights ≈ 0.67). The paper saw tower A (GPU 1) learn largely "
             "colour-agnostic kernels and tower B (GPU 2) largely colour-specific ones, a split that "
             "happens \"independently of any particular random weight initialization (modulo a "
             "renumbering of the GPUs)\" (§6.1): either tower may be the colour-specific one, so a "
             "gap of either sign beyond twice its standard error counts. The ledger above states the "
             "newest record.", "",
             "| picture | checkpoint | epochs | tower A (mean ± sd, n) | tower B | B − A | command |",
             "|---|---|---:|---:|---:|---:|---|"]
    for path, d in found:
        parts = d["per_tower"]
        towers = [f"{t['mean']:.3f} ± {t['sd']:.3f} ({t['n']})" for t in parts] + ["—"]
        gap = "—"
        if len(parts) == 2:
            diff, _ = tower_gap(parts)
            gap = f"{diff:+.3f} ({'beyond' if towers_specialise(parts) else 'within'} 2 s.e.)"
        image = path.with_suffix(".png").relative_to(results).as_posix()
        lines.append(f"| ![]({image}) | `{d['checkpoint']}` | {d.get('epochs_trained')} | {towers[0]} | "
                     f"{towers[1]} | {gap} | `python -m reproduction.visualize filters --checkpoint {d['checkpoint']} "
                     f"--out {d['image']}` |")
    return lines


# --- The paper's tables row by row, and a ledger of its quantitative claims ---------------------

# Table 1 (ILSVRC-2010 test) and Table 2 (ILSVRC-2012: val top-1, val top-5, test top-5), in the
# paper's row order; `kind` says which of our results fills the row (None: another method).
TABLE1 = [("Sparse coding [2]", 47.1, 28.2, None), ("SIFT + FVs [24]", 45.7, 25.7, None),
          ("CNN (ten patches)", 37.5, 17.0, "1"), ("CNN, centre patch only (§6 footnote)", 39.0, 18.3, "1-centre")]
TABLE2 = [("SIFT + FVs [7]", None, None, 26.2, None), ("1 CNN", 40.7, 18.2, None, "1"),
          ("5 CNNs", 38.1, 16.4, 16.4, "n"), ("1 CNN*", 39.0, 16.6, None, "1*"),
          ("7 CNNs*", 36.7, 15.4, 15.3, "n*")]
NOT_RUN = "not yet run"


def find_evaluations(results: Path) -> list[dict]:
    """Every `python -m reproduction.evaluate` result under `results` (one net or an ensemble)."""
    found = []
    for path, d in json_records(results):
        if not {"centre", "ten_patch", "split", "checkpoint"} <= set(d):
            continue
        members = d["checkpoint"] if isinstance(d["checkpoint"], list) else [d["checkpoint"]]
        archs = d.get("architectures") or [{} for _ in members]
        found.append({"path": path, "result": d, "members": members, "dataset": d.get("dataset"),
                      "split": d["split"], "conv6": any(a.get("conv6") for a in archs),
                      "paper_arch": all(not a for a in archs)})
    return found


def _pretraining(meta: dict) -> str:
    """1 CNN*'s pre-training, named from the --init-from checkpoint's run folder when it is there."""
    source = Path(meta["init_from"])
    config = source.parent / "config.json"
    try:
        data = json.loads(config.read_text())["data"]
        return f"pre-trained on {data.get('dataset')} ({data['classes']:,} classes, `{source}`)"
    except (OSError, ValueError, KeyError, TypeError):
        return f"pre-trained: `{source}`"


def _ours(runs_or_eval, base: Path, protocol: str = "ten_patch") -> tuple[str, str, str]:
    """(top-1, top-5, where) for a group of training runs (val, final.json) or one evaluation."""
    if isinstance(runs_or_eval, dict):
        r = runs_or_eval["result"][protocol]
        link = runs_or_eval["path"].relative_to(base).as_posix()
        n = len(runs_or_eval["members"])
        classes = ""
        if isinstance(runs_or_eval["result"].get("per_class"), dict):  # its confusion figure, beside it
            figure = runs_or_eval["path"].with_name(Path(runs_or_eval["result"]["per_class"]["figure"]).name)
            classes = f"; per class: [confusion]({figure.relative_to(base).as_posix()})" if figure.is_file() else ""
        return (f"{100 * r['top1_error']:.2f}", f"{100 * r['top5_error']:.2f}",
                f"{n} net{'s' if n > 1 else ''}, `evaluate` on {runs_or_eval['split']}: [{Path(link).name}]({link})"
                + classes)
    runs = runs_or_eval
    t1, t5 = (fmt(*mean_sd(errors(runs, protocol, w))) for w in ("top1", "top5"))
    return t1, t5, f"{len(runs)} seed(s), final.json on val: {links(runs, base)}"


def table_rows(groups: dict, evaluations: list[dict], base: Path) -> dict[str, tuple[str, str, str]]:
    """Our result for each row of Tables 1 and 2, keyed "t1:<kind>" / "t2:<kind>" (missing: not run).
    Scaled-down recipes are named in the 'where' cell; the first match in sorted order is shown."""
    ours = {}
    for (label, experiment, changes), runs in groups.items():
        meta = runs[0]["meta"]
        model = meta["config"]["model"]
        if meta["data"].get("dataset") != "ilsvrc2012":
            continue
        note = "" if changes == "none" else f" (changed: {changes})"
        if experiment == "paper" and not model.get("conv6"):
            t1, t5, where = _ours(runs, base)
            ours.setdefault("t2:1", (t1, t5, where + note))
        if model.get("conv6") and meta.get("init_from"):
            t1, t5, where = _ours(runs, base)
            ours.setdefault("t2:1*", (t1, t5, f"{where}; {_pretraining(meta)}{note}"))
    for e in evaluations:
        n = len(e["members"])
        if e["dataset"] == "ilsvrc2010" and e["split"] == "test" and n == 1 and e["paper_arch"]:
            ours.setdefault("t1:1", _ours(e, base))
            ours.setdefault("t1:1-centre", _ours(e, base, "centre"))
        if e["dataset"] == "ilsvrc2012" and e["split"] == "val" and n > 1:
            ours.setdefault("t2:n*" if e["conv6"] else "t2:n", _ours(e, base))
    return ours


def paper_tables(ours: dict) -> list[str]:
    how = {"1": "a `paper` run, then `evaluate --split test` on `data_prep ilsvrc2010` data",
           "1-centre": "the same evaluation's centre patch"}
    how2 = {"1": "`train --experiment paper` on `data_prep ilsvrc2012` data",
            "n": "`evaluate --checkpoint A B C D E` (5 paper runs, different seeds)",
            "1*": "`train --experiment conv6` on ImageNet Fall 2011, then `train --init-from` on ILSVRC-2012",
            "n*": "`evaluate --checkpoint` over 5 paper runs and 2 fine-tuned conv6 runs"}
    lines = ["## The paper's tables, row by row", "",
             "Errors in %. A row is filled from a run on the paper's own data set (run folders and "
             "`evaluate` results under results/); otherwise it is marked not yet run, with what would "
             "fill it.", "", "Table 1: ILSVRC-2010 test set.", "",
             "| model | top-1 (paper) | top-5 (paper) | top-1 (ours) | top-5 (ours) | ours: what was run |",
             "|---|---:|---:|---:|---:|---|"]
    for name, p1, p5, kind in TABLE1:
        if kind is None:
            lines.append(f"| {name} | {p1} | {p5} | — | — | another method: quoted, not reproduced |")
            continue
        t1, t5, where = ours.get(f"t1:{kind}", (NOT_RUN, "", f"needs {how[kind]}"))
        lines.append(f"| {name} | {p1} | {p5} | {t1} | {t5} | {where} |")
    lines += ["", "Table 2: ILSVRC-2012 (val: top-1, top-5; test: top-5, from the challenge's server, "
              "whose labels are not public: `evaluate --predictions FILE` writes the submission file). "
              "\\* = pre-trained on ImageNet Fall 2011 with a sixth conv layer (`conv6`), then fine-tuned.", "",
              "| model | top-1 val (paper) | top-5 val (paper) | top-5 test (paper) | top-1 val (ours) "
              "| top-5 val (ours) | ours: what was run |", "|---|---:|---:|---:|---:|---:|---|"]
    show = lambda v: "—" if v is None else v
    for name, p1, p5, test5, kind in TABLE2:
        if kind is None:
            lines.append(f"| {name} | — | — | {test5} | — | — | another method: quoted, not reproduced |")
            continue
        t1, t5, where = ours.get(f"t2:{kind}", (NOT_RUN, "", f"needs {how2[kind]}"))
        lines.append(f"| {name} | {show(p1)} | {show(p5)} | {show(test5)} | {t1} | {t5} | {where} |")
    return lines


def _row_status(ours: dict, key: str, paper: tuple[float, float]) -> tuple[str, str]:
    if key not in ours:
        return NOT_RUN, "—"
    t1, t5, where = ours[key]
    try:
        gap = float(t1.split(" ")[0]) - paper[0]
    except ValueError:
        return f"measured: {t1} / {t5} ({where})", "—"
    found = re.search(r"(\d+) (seed|net)", where)
    n = int(found.group(1)) if found else 1
    if abs(gap) > 1:
        return f"measured: {t1} / {t5} ({where})", f"{'worse' if gap > 0 else 'better'} by {abs(gap):.1f} top-1"
    close = "within 1 point of top-1"
    return f"measured: {t1} / {t5} ({where})", f"agrees ({close})" if n >= 3 else f"{close} (n = {n}: not yet a finding)"


LEDGER_RULE = ("\"agrees\" only where the effect is beyond 2 s.e. of the paired per-seed differences over "
               "n ≥ 3 seeds, with the paper's sign; beyond 2 s.e. with the other sign: \"disagrees\"; "
               "otherwise \"inconclusive\". Runs at chance count for nothing. n is the number of seeds "
               "(or nets) behind the row.")
ABLATION_LINK = "[ablations](#ablations-error-added-by-each-change-centre-patch-ours-vs-the-papers-ilsvrc-numbers)"


def by_rule(diffs: Sequence[float], sign: int) -> tuple[str, str]:
    """(mean ± s.e. text, verdict) of paired differences (points) by LEDGER_RULE; sign: the paper's."""
    n = len(diffs)
    if not n:
        return "", "—"
    m, sd = mean_sd(diffs)
    se = sd / n ** 0.5 if n > 1 else float("nan")
    text = f"{m:+.2f}" + ("" if se != se else f" ± {se:.2f} s.e.")
    if n < 3 or not abs(m) > 2 * se:
        return text, f"inconclusive (n = {n}{', fewer than 3 seeds' if n < 3 else ', within 2 s.e.'})"
    return text, "agrees (beyond 2 s.e.)" if (m > 0) == (sign > 0) else "disagrees (beyond 2 s.e., the other sign)"


def _learning(run: dict) -> bool:
    """A run whose centre top-1 error is below chance: evidence about anything at all."""
    classes = run["meta"]["data"]["classes"]
    return run["final"]["centre"]["top1_error"] < 1 - 1 / classes - 0.005


def claims_ledger(groups: dict, ours: dict, results: Path) -> list[str]:
    """One row per quantitative claim of the paper: its status here, n, a verdict by LEDGER_RULE."""
    rows = []
    for name, p1, p5, kind in TABLE1:
        if kind is not None:
            status, verdict = _row_status(ours, f"t1:{kind}", (p1, p5))
            rows.append((f"Table 1: {name}, ILSVRC-2010 test", f"{p1} / {p5}", status, "0" if status == NOT_RUN else "1",
                         verdict, "[Table 1](#the-papers-tables-row-by-row)"))
    for name, p1, p5, test5, kind in TABLE2:
        if kind is not None:
            status, verdict = _row_status(ours, f"t2:{kind}", (p1, p5))
            rows.append((f"Table 2: {name}, ILSVRC-2012 val", f"{p1} / {p5}", status, "0" if status == NOT_RUN else "1",
                         verdict, "[Table 2](#the-papers-tables-row-by-row)"))
        if test5 is not None and kind is not None:
            rows.append((f"Table 2: {name}, ILSVRC-2012 test top-5", f"{test5}", NOT_RUN + " (test labels are "
                         "withheld by the organisers: needs the evaluation server)", "0", "—", "Table 2"))
    rows += _ten_patch_claims(groups)
    rows += _ablation_claims(groups, results)
    rows += _cifar_claims(results)
    rows += _unmeasured_claims(groups)
    rows += _count_claims()
    lines = ["", "## Ledger of the paper's quantitative claims", "",
             "Every number the paper states about its results, with what this project has measured of it. "
             f"\"Not yet run\" means no run of the needed kind exists under results/. Rule: {LEDGER_RULE}", "",
             "| claim | paper | status here (data, scale) | n | verdict | evidence |", "|---|---|---|---|---|---|"]
    lines += [f"| {' | '.join(r)} |" for r in rows]
    return lines


def _ten_patch_claims(groups: dict) -> list[tuple[str, ...]]:
    """§4.1/§6: ten patches vs the centre patch, paired per run, at-chance runs left out."""
    runs = [r for rs in groups.values() for r in rs if _learning(r)]
    rows = []
    for which, paper in (("top1", 1.5), ("top5", 1.3)):
        diffs = [c - t for r in runs for c, t in zip(errors([r], "centre", which), errors([r], "ten_patch", which))]
        text, verdict = by_rule(diffs, +1)
        status = (f"measured on {len(runs)} run(s) below chance (Tiny-ImageNet and CIFAR-10 subsets, not ILSVRC): "
                  f"centre − ten patches {text}" if runs else NOT_RUN)
        rows.append((f"§4.1/§6: ten patches lower the {which.replace('top', 'top-')} error vs the centre patch",
                     f"{paper}", status, str(len(diffs)), verdict, "[ten patches](#ten-patches-vs-the-centre-patch-41)"))
    return rows


def _ablation_claims(groups: dict, results: Path) -> list[tuple[str, ...]]:
    """Each ablation's effect on ten-patch top-1, paired by seed with `paper` on the same data and recipe."""
    claims = {"no_lrn": "§3.3: response normalisation lowers the error", "no_overlap_pool": "§3.4: overlapping pooling",
              "one_tower": "§3.2: two towers vs one of half the kernels", "no_pca_lighting": "§4.1: PCA lighting",
              "no_conv2": "§7: removing conv2 (any middle layer)", "no_conv3": "§7: removing conv3 (any middle layer)",
              "no_conv4": "§7: removing conv4 (any middle layer)",
              "tanh": "§3.1 on ILSVRC-style photographs (an extension: the paper measured tanh on CIFAR-10 only)"}
    rows = []
    for experiment, claim in claims.items():
        section, p1, p5 = PAPER_EFFECTS.get(experiment, ("§3.1", None, None))
        paper_claim = "no number" if p1 is None else f"+{p1} top-1" + ("" if p5 is None else f" / +{p5} top-5")
        found = [(k, runs) for k, runs in groups.items() if k[1] == experiment and (k[0], "paper", k[2]) in groups]
        if not found:
            rows.append((claim, paper_claim, f"{NOT_RUN} (experiment `{experiment}`)", "0", "—", ABLATION_LINK))
        for (label, _, changes), runs in found:
            base = {r["meta"]["seed"]: r for r in groups[(label, "paper", changes)]}
            pairs = [(r, base[r["meta"]["seed"]]) for r in runs if r["meta"]["seed"] in base]
            learning = [(a, b) for a, b in pairs if _learning(a) and _learning(b)]
            diffs = [errors([a], "ten_patch", "top1")[0] - errors([b], "ten_patch", "top1")[0] for a, b in learning]
            text, verdict = by_rule(diffs, +1)
            at_chance = len(pairs) - len(learning)
            status = (f"measured on {label}: Δ ten-patch top-1 {text}" if diffs else f"measured on {label}") + (
                f"; {at_chance} of {len(pairs)} seed pair(s) at chance, left out" if at_chance else "")
            rows.append((claim, paper_claim, status, str(len(diffs)), verdict if diffs else "no evidence (at chance)",
                         ABLATION_LINK))
    return rows


def _unmeasured_claims(groups: dict) -> list[tuple[str, ...]]:
    dropout = [k for k in groups if k[1] == "no_dropout" and (k[0], "paper", k[2]) in groups]
    return [
        ("§4.2: dropout roughly doubles the iterations needed to converge; without it, substantial overfitting",
         "2× iterations", NOT_RUN if not dropout else f"runs exist on {', '.join(k[0] for k in dropout)}: no "
         "convergence measure computed yet", str(len(dropout)), "—", "experiment `no_dropout`"),
        ("§3.4: overlapping pooling makes the net slightly more difficult to overfit", "qualitative",
         NOT_RUN + " (needs train − val gaps of `paper` and `no_overlap_pool`)", "0", "—", "experiment `no_overlap_pool`"),
        ("§3.2: the two-GPU net takes slightly less time to train than the one-GPU net", "qualitative",
         NOT_RUN + " (needs two GPUs; `one_tower` on one)", "0", "—", "experiment `one_tower`"),
        ("§7: removing any middle conv layer costs about 2 points top-1", "≈ +2 top-1", "see the no_conv2/3/4 "
         "rows above", "—", "—", ABLATION_LINK),
        ("§6: Fall 2009 ImageNet (10,184 classes, 8.9M images), six-conv net", "67.4 / 40.9",
         NOT_RUN + " (that release is not available here)", "0", "—", "—"),
        ("§6: validation and test error differ by no more than 0.1 %", "≤ 0.1", NOT_RUN + " (needs ILSVRC-2012 "
         "test labels)", "0", "—", "—"),
        ("§5: about 90 epochs take five to six days on two GTX 580 3GB GPUs", "5–6 days", NOT_RUN +
         " (no GTX 580; our GPU timings, where run, are in results/benchmarks.md)", "0", "—", "—"),
    ]


def _count_claims() -> list[tuple[str, ...]]:
    """Counts of the net itself: exact, so n is one net and the verdict is arithmetic."""
    from reproduction.model import AlexNet  # torch, only when a report is written (--help stays quick)
    net = AlexNet()
    n = sum(p.numel() for p in net.parameters())
    convs = {name: sum(p.numel() for p in getattr(net, name).parameters()) / n for name in
             ("conv1", "conv2", "conv3", "conv4", "conv5")}
    over = {k: v for k, v in convs.items() if v > 0.01}
    neurons = 96 * 55 * 55 + 256 * 27 * 27 + 384 * 13 * 13 * 2 + 256 * 13 * 13 + 4096 * 2 + 1000
    return [
        ("§1/§3: the net has 60 million parameters", "60 million", f"counted: {n:,} (`python -m reproduction.model`, "
         "tests/test_model.py)", "1 net", "agrees" if round(n / 1e6) in (60, 61) else "disagrees",
         "[model.py](../reproduction/model.py)"),
        ("§1: each convolutional layer holds no more than 1 % of the parameters", "≤ 1 %", "counted: " + ", ".join(
            f"{k} {100 * v:.2f} %" for k, v in convs.items()), "1 net",
         "disagrees: " + ", ".join(over) + " hold more" if over else "agrees", "[model.py](../reproduction/model.py)"),
        ("Abstract: 650,000 neurons", "650,000", f"counted from Fig. 2's layer outputs: {neurons:,} (Fig. 2's caption "
         "gives 253,440 for conv1, but 96·55·55 = 290,400)", "1 net", "agrees (≈ 650,000)"
         if abs(neurons - 650_000) < 25_000 else "disagrees", "[model.py](../reproduction/model.py)"),
    ]


def _cifar_claims(results: Path) -> list[tuple[str, ...]]:
    rows = []
    fig1 = results / "cifar10" / "relu-tanh" / "summary.json"
    link1 = "[Fig. 1](#31-fig-1-on-cifar-10-epochs-to-25-training-error-relu-vs-tanh)"
    status, verdict, n = NOT_RUN, "—", 0
    if fig1.exists():
        s = json.loads(fig1.read_text())
        r = s.get("ratio", {})
        n = len(next(iter(s["activations"].values()))["runs"])
        cap = s["activations"].get("tanh", {}).get("cap")
        if "mean" in r:
            bound = r["lower_bound"]
            status = (f"measured on CIFAR-10 (50,000 images, layers-18pct net): tanh/ReLU "
                      f"{'≥ ' if bound else ''}{r['mean']:.2f}× per seed's mean"
                      + (f" (a lower bound: tanh did not reach 25 % within its {cap}-epoch cap)" if bound else ""))
            verdict = ("agrees (a lower bound already ≥ 6×)" if bound and r["mean"] >= 6 and n >= 3 else
                       "inconclusive (a lower bound below 6×)" if bound else
                       "disagrees (tanh faster)" if r["mean"] < 1 else f"ratio {r['mean']:.1f}× vs 6×")
        link1 += ", [summary](cifar10/relu-tanh/summary.json)"
    rows.append(("§3.1, Fig. 1: ReLUs reach 25% training error on CIFAR-10 ~6× sooner than tanh", "6×",
                 status, str(n), verdict, link1))
    lrn = results / "cifar10" / "lrn" / "summary.json"
    status, verdict, n, link = NOT_RUN, "—", 0, "[§3.3](#33-on-cifar-10-test-error-with-and-without-response-normalisation)"
    if lrn.exists():
        s = json.loads(lrn.read_text())
        d = s.get("difference")
        epochs = sorted({v["epochs"] for v in s["variants"].values()})
        if d:
            text, verdict = by_rule([100 * x for x in d["per_seed"]], +1)
            n = len(d["per_seed"])
            verdict += f"; at {'/'.join(map(str, epochs))} of ~470 epochs the size is not comparable"
            status = (f"measured on CIFAR-10 (conv-local nets, {'/'.join(map(str, epochs))} epochs of the "
                      f"paper's ~470): no_norm − norm test error {text} points")
        link += ", [summary](cifar10/lrn/summary.json)"
    rows.append(("§3.3: response normalisation, 13% → 11% test error on CIFAR-10", "−2 points", status, str(n),
                 verdict, link))
    rows.append(_fig3_claim(results))
    return rows


def _fig3_claim(results: Path) -> tuple[str, ...]:
    """§6.1: the towers specialise in every run; each net (seed) is one observation, and a split
    counts where that net's tower gap is beyond 2 s.e. over its 48 kernels, in either order."""
    nets = {}
    for path, d in fig3_records(results):
        if len(d["per_tower"]) == 2:
            nets[str(d.get("checkpoint", path))] = d["per_tower"]
    for summary in results.rglob("summary.json"):
        study = json.loads(summary.read_text())
        for seed, towers in (study.get("fig3") or {}).items():
            if towers and len(towers) == 2:
                nets[f"{summary.parent.name} paper seed {seed}"] = towers
    link = "[Fig. 3](#fig-3-conv1s-kernels-per-tower)"
    if not nets:
        return ("§6.1, Fig. 3: one tower's conv1 colour-agnostic, the other's colour-specific", "every run",
                NOT_RUN, "0", "—", link)
    split = sum(towers_specialise(t) for t in nets.values())
    n = len(nets)
    verdict = ("agrees (every net splits)" if split == n and n >= 3 else
               f"inconclusive ({split} of {n} nets split{', fewer than 3' if n < 3 else ''})")
    return ("§6.1, Fig. 3: one tower's conv1 colour-agnostic, the other's colour-specific (\"modulo a renumbering "
            "of the GPUs\")", "every run", f"measured: {split} of {n} trained nets split beyond 2 s.e. of their "
            "kernels (small subsets, few epochs)", str(n), verdict, link)


def fig3_records(results: Path) -> list[tuple[Path, dict]]:
    """Every conv1 record written by `python -m reproduction.visualize filters` under `results`."""
    return [(path, d) for path, d in json_records(results) if "per_tower" in d and "kernel_shape" in d]


def newest(records: list[tuple[Path, dict]]) -> tuple[Path, dict]:
    """The record filed last (filed_at), ties to the longer-trained net: the ledger states one
    result per claim, and an older smoke run must not stand for a newer run."""
    return max(records, key=lambda r: (filed_at(r[0]), r[1].get("epochs_trained") or 0, str(r[0])))


def filed_at(path: Path) -> float:
    """When a record was filed: the time of the last commit that touched it when git holds it
    unchanged (a checkout resets every file's mtime), else its mtime (a record written but not
    yet committed, or no git at all: it is the newest)."""
    def git(*args: str) -> str:
        try:
            out = subprocess.run(["git", *args, "--", path.name], cwd=path.parent, capture_output=True,
                                 text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return ""
        return out.stdout.strip() if out.returncode == 0 else ""

    committed = git("log", "-1", "--format=%ct")
    if committed and not git("status", "--porcelain"):
        return float(committed)
    return path.stat().st_mtime


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, argv)


def _main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reproduction.report",
                                     description="Write RESULTS/README.md (and curve PNGs) from the run "
                                                 "folders under RESULTS, beside the paper's numbers.")
    parser.add_argument("--results", type=Path, default=Path("results"), help="the results folder (default: results)")
    args = parser.parse_args(argv)
    if not args.results.is_dir():
        parser.error(f"{args.results} is not a folder")
    writable_file(args.results / "README.md", "--results")  # before the work, not at its last write
    print(f"wrote {write_report(args.results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
