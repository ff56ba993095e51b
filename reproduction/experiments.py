"""The paper's run and its ablations, each as its difference from the paper's config.

Each comment gives the effect the paper reports (ILSVRC top-1/top-5 error, percentage points).
The training loop reads only the resolved config; it never sees these names.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import replace
from pathlib import Path
from typing import Sequence

from reproduction.config import CifarConfig, RunConfig, override
from reproduction.errors import run_cli

PAPER_RUN = RunConfig()

EXPERIMENTS: dict[str, RunConfig] = {
    "paper": PAPER_RUN,
    # §3.3: response normalisation lowers the error by 1.4 / 1.2.
    "no_lrn": override(PAPER_RUN, {"lrn": "none"}),
    # §3.3's formula read literally: α multiplies the sum itself (5× the code's normalisation).
    "lrn_literal": override(PAPER_RUN, {"lrn": "paper"}),
    # §3.1 measured ReLU vs tanh only on CIFAR-10 (Fig. 1: 6× fewer epochs to 25% training
    # error; that experiment is cifar-relu-tanh below). This ILSVRC run has no number in the
    # paper to compare with: an extension, the paper's "could not have experimented with such
    # large neural networks" claim made concrete.
    "tanh": override(PAPER_RUN, {"activation": "tanh"}),
    # §3.4: overlapping pooling (z=3, s=2) beats z=2, s=2 by 0.4 / 0.3.
    "no_overlap_pool": override(PAPER_RUN, {"pool_kernel": 2}),
    # §3.2: two towers beat one tower of half the kernels in conv1-conv4 by 1.7 / 1.2.
    "one_tower": override(PAPER_RUN, {"towers": 1}),
    # §4.1: PCA lighting lowers top-1 error by over 1.
    "no_pca_lighting": override(PAPER_RUN, {"lighting": "none"}),
    # §4.1 read literally, one change at a time (the paper reports no effect for any of them;
    # each is where the text and cuda-convnet2 part ways): the mean image at the patch's offset
    # rather than its centre patch; the eigenvalues λ of [0, 1] pixels rather than √λ on 0–255;
    # no ×1/(1 + 0.1) after the colour noise. augment_literal makes all three.
    "mean_offset": override(PAPER_RUN, {"mean": "offset"}),
    "lighting_eigenvalues": override(PAPER_RUN, {"lighting": "paper"}),
    "no_lighting_rescale": override(PAPER_RUN, {"lighting_rescale": False}),
    "augment_literal": override(PAPER_RUN, {"mean": "offset", "lighting": "paper", "lighting_rescale": False}),
    # §4.2: without dropout the net overfits substantially; dropout roughly doubles the
    # iterations needed to converge.
    "no_dropout": override(PAPER_RUN, {"dropout": 0.0}),
    # §7: "removing any of the middle layers results in a loss of about 2% for the top-1
    # performance of the network" (conv2, conv3 or conv4; how the next layer adapts: model.py).
    "no_conv2": override(PAPER_RUN, {"remove_conv": "conv2"}),
    "no_conv3": override(PAPER_RUN, {"remove_conv": "conv3"}),
    "no_conv4": override(PAPER_RUN, {"remove_conv": "conv4"}),
    # §6, Table 2's 1 CNN*: a sixth conv layer over pool5 (sizes chosen: model.py, DEVIATION(§6)),
    # trained on ImageNet Fall 2011 (15M images, 22K classes) then fine-tuned on ILSVRC-2012
    # with --init-from: 39.0 / 16.6 top-1/top-5 val error vs 40.7 / 18.2 for 1 CNN. Without the
    # pre-training the paper gives no number for it.
    "conv6": override(PAPER_RUN, {"conv6": True}),
    # d2l's Fashion-MNIST chapter (28 px grey → 3 equal channels by data_prep, upsampled; 10 epochs; ≈0.89 test
    # accuracy on 60,000 images); biases 0.1 (Caffe's) as the paper's 1 sits at chance for epochs (PAPER-SPEC §10).
    "fashion_mnist": override(PAPER_RUN, {"epochs": 10, "init_bias": 0.1}),
}


# --- The paper's CIFAR-10 experiments (reproduction/cifar.py), as diffs from layers-18pct ------

CIFAR_18PCT = CifarConfig()  # cuda-convnet's layers-18pct.cfg + layer-params-18pct.cfg

# §3.1, Fig. 1: ReLUs reach 25% training error ~6× sooner than tanh. "No regularization of any
# kind": no weight decay, no augmentation (18pct has none); ε per activation from a sweep.
FIG1 = replace(CIFAR_18PCT, weight_decay_conv=0.0, weight_decay_top=0.0, epochs=40, drop_epochs=(),
               stop_below=0.25)

# §3.3: "a four-layer CNN achieved a 13% test error rate without normalization and 11% with".
# layers-conv-local-11pct.cfg (cross-map normalisation) and its twin -13pct.cfg (none), trained
# on random 24×24 crops with flips; their layer-params decay only local3, local4 and fc10, and
# state the schedule: ~450 epochs at ε = 0.001, then 10 at ε/10 and 10 at ε/100.
CONV_LOCAL_11PCT = replace(CIFAR_18PCT, layout="conv-local", norm="crossmap", norm_size=5, norm_scale=0.001,
                           crop=24, flip=True, weight_decay_conv=0.0, weight_decay_top=0.004,
                           epochs=470, drop_epochs=(450, 460))
CONV_LOCAL_13PCT = replace(CONV_LOCAL_11PCT, norm="none")

CIFAR_EXPERIMENTS: dict[str, dict[str, CifarConfig]] = {
    "cifar-relu-tanh": {"relu": FIG1, "tanh": replace(FIG1, activation="tanh")},
    "cifar-lrn": {"no_norm": CONV_LOCAL_13PCT, "norm": CONV_LOCAL_11PCT},
}


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, argv)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m reproduction.experiments",
        description="Run one of the paper's CIFAR-10 experiments end to end: read CIFAR-10, train "
                    "every variant and seed into run folders, write summary.json and (Fig. 1) the "
                    "figure under --out; python -m reproduction.report puts them in results/README.md "
                    "beside the paper's numbers. Finished runs are reused and an interrupted one "
                    "resumes from its checkpoint: the same command again continues the experiment. "
                    "CIFAR-10 is read from ../shared/data/cifar10 when it is beside the checkout, else from torchvision's copy in data/downloads/, which is "
                    "downloaded (170 MB, checked by torchvision's MD5) the first time. The ILSVRC "
                    "ablations run with python -m reproduction.train.")
    parser.add_argument("experiment", choices=sorted(CIFAR_EXPERIMENTS),
                        help="cifar-relu-tanh: §3.1 Fig. 1 (epochs to 25%% training error, ReLU vs tanh); "
                             "cifar-lrn: §3.3 (test error with and without response normalisation)")
    parser.add_argument("--data", type=Path, default=None,
                        help="a CIFAR-10 folder: train.tar.gz + test.tar.gz of <class>/<name>.jpg (as "
                             "../shared/data/cifar10), or torchvision's cifar-10-batches-py/ (data_batch_1..5, "
                             "test_batch, batches.meta) or the folder holding it (default: ../shared/data/cifar10, "
                             "else torchvision's in WORK/downloads, downloaded on first use)")
    parser.add_argument("--download", action="store_true",
                        help="with --data: download torchvision's CIFAR-10 into that folder unless it is already "
                             "there with torchvision's MD5s (torchvision.datasets.CIFAR10's URL and checksum)")
    parser.add_argument("--work", type=Path, default=None,
                        help="where the decoded CIFAR-10 cache (cifar10-native.npz) and a download go "
                             "(default: data/, not in git)")
    parser.add_argument("--out", type=Path, default=None,
                        help="where the run folders, summary.json and (cifar-relu-tanh) fig1.png go "
                             "(default: runs/cifar10/<experiment>, not in git; the committed evidence was "
                             "made with --out results/cifar10/<experiment>)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds to train (default: 0 1 2)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="override CifarConfig fields in every variant, e.g. epochs=10 drop_epochs=8,9 "
                             "(a tuple is its items and commas: parentheses are shell syntax)")
    parser.add_argument("--per-class", type=int, default=None,
                        help="use only the first N images of each class of each split (quick runs, tests)")
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.001, 0.003, 0.01, 0.03, 0.1],
                        help="cifar-relu-tanh: the learning rates ε swept per activation")
    parser.add_argument("--sweep-epochs", type=int, default=2, help="cifar-relu-tanh: epochs per sweep run")
    return parser


def _main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    for name, bad, want in (("--seeds", min(args.seeds) < 0, "seeds >= 0"),
                            ("--per-class", args.per_class is not None and args.per_class < 1, "at least 1 image"),
                            ("--lrs", min(args.lrs) <= 0, "learning rates > 0"),
                            ("--sweep-epochs", args.sweep_epochs < 1, "at least 1 epoch")):
        if bad:
            parser.error(f"{name}: give {want}")

    root = Path(__file__).resolve().parents[1]
    out = args.out or root / "runs" / "cifar10" / args.experiment.removeprefix("cifar-")
    work = args.work or root / "data"
    try:
        configs = {name: override(c, args.set) for name, c in CIFAR_EXPERIMENTS[args.experiment].items()}
    except ValueError as e:
        parser.error(str(e))
    # torch loads here, not when this module is imported: --help, and the report's import of
    # EXPERIMENTS, stay quick.
    from reproduction import cifar
    from reproduction.files import write_json
    source = cifar.cifar10_source(args.data, work, download=args.download)
    data = cifar.load_cifar10(source, work / "cifar10-native.npz", per_class=args.per_class)
    layout = cifar.cifar10_files(source)[0]
    print(f"CIFAR-10 ({layout} layout) from {source}: {len(data['train'][1]):,} training / "
          f"{len(data['test'][1]):,} test images")
    command = "python -m reproduction.experiments " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    meta = {"command": command, "per_class": args.per_class, "source": {"layout": layout, "path": str(source)}}
    if args.experiment == "cifar-relu-tanh":
        summary = cifar.relu_tanh(configs, data, out, seeds=args.seeds, lrs=args.lrs,
                                  sweep_epochs=args.sweep_epochs, meta=meta)
    else:
        summary = cifar.response_norm(configs, data, out, seeds=args.seeds, meta=meta)
    write_json(out / "summary.json", summary)
    print(f"wrote {out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
