"""report: Tables 1 and 2 row by row from ILSVRC runs and evaluations, and the claims ledger.

Run folders and evaluation files are written by hand in the formats train.py and evaluate.py
write, so the report is tested without training anything.
"""

from __future__ import annotations

import json
from pathlib import Path

from reproduction.training import checkpoints
from reproduction.config import RunConfig, override
from reproduction.report import write_report


def fake_run(folder: Path, *, dataset: str, experiment: str, top1: float, seed: int = 0,
             changes: dict | None = None, init_from: str | None = None, classes: int = 1000) -> Path:
    config = override(RunConfig(), {"seed": seed, "num_classes": classes, **(changes or {})})
    folder.mkdir(parents=True)
    meta = {"experiment": experiment, "config": checkpoints.config_dict(config), "command": ["python", "-m", "x"],
            "environment": {"device_names": ["test GPU"], "torch": "t"}, "seed": seed, "init_from": init_from,
            "data": {"path": "d", "dataset": dataset, "classes": classes, "train_images": 10, "val_images": 5}}
    result = {"top1_error": top1, "top5_error": top1 / 2, "loss": 1.0, "images": 5}
    final = {"centre": {**result, "top1_error": top1 + 0.02, "patches": 1}, "ten_patch": {**result, "patches": 10},
             "experiment": experiment, "epochs": 90, "steps": 900, "seed": seed}
    (folder / "config.json").write_text(json.dumps(meta))
    (folder / "final.json").write_text(json.dumps(final))
    (folder / "metrics.jsonl").write_text(json.dumps({"epoch": 0, "val_top1_error": top1, "train_error": top1}) + "\n")
    return folder


def fake_eval(path: Path, *, dataset: str, split: str, members: list[str], top1: float,
              archs: list[dict] | None = None) -> None:
    r = {"top1_error": top1, "top5_error": top1 / 2, "loss": 1.0, "images": 5}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"centre": {**r, "top1_error": top1 + 0.015}, "ten_patch": r, "split": split,
                                "checkpoint": members if len(members) > 1 else members[0], "dataset": dataset,
                                "architectures": archs or [{} for _ in members]}))


def row(text: str, start: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(start))


def test_tables_and_ledger_rows_fill_from_ilsvrc_runs(tmp_path):
    results = tmp_path / "results"
    fake_run(results / "runs/i12/paper/seed0", dataset="ilsvrc2012", experiment="paper", top1=0.41)
    fake_run(results / "runs/i12/paper/seed1", dataset="ilsvrc2012", experiment="paper", top1=0.43, seed=1)
    pre = fake_run(results / "runs/fall/conv6", dataset="fall2011", experiment="conv6", top1=0.7,
                   changes={"conv6": True}, classes=21841)
    fake_run(results / "runs/i12/conv6-ft", dataset="ilsvrc2012", experiment="conv6", top1=0.385,
             changes={"conv6": True}, init_from=str(pre / "checkpoint.pt"))
    fake_run(results / "runs/i12/no_conv3/seed0", dataset="ilsvrc2012", experiment="no_conv3", top1=0.44,
             changes={"remove_conv": "conv3"})
    fake_run(results / "runs/i12/no_conv3/seed1", dataset="ilsvrc2012", experiment="no_conv3", top1=0.45, seed=1,
             changes={"remove_conv": "conv3"})
    fake_eval(results / "ens/five.json", dataset="ilsvrc2012", split="val", members=[f"m{k}" for k in range(5)], top1=0.38)
    fake_eval(results / "ens/seven.json", dataset="ilsvrc2012", split="val", members=[f"m{k}" for k in range(7)],
              top1=0.37, archs=[{}] * 5 + [{"conv6": True}] * 2)
    fake_eval(results / "runs/i10/eval-test.json", dataset="ilsvrc2010", split="test", members=["c"], top1=0.376)
    fake_eval(results / "runs/i10/eval-val.json", dataset="ilsvrc2010", split="val", members=["c"], top1=0.5)
    text = write_report(results).read_text()

    t1 = row(text, "| CNN (ten patches) |")
    assert "| 37.5 | 17.0 | 37.60 | 18.80 |" in t1 and "(runs/i10/eval-test.json)" in t1  # test, not val
    assert "| 39.0 | 18.3 | 39.10 |" in row(text, "| CNN, centre patch only")
    one = row(text, "| 1 CNN |")
    assert "| 40.7 | 18.2 | — | 42.00 ± 1.41 | 21.00 ± 0.71 |" in one and "2 seed(s)" in one
    assert "| 38.1 | 16.4 | 16.4 | 38.00 | 19.00 | 5 nets" in row(text, "| 5 CNNs |")
    assert "| 36.7 | 15.4 | 15.3 | 37.00 |" in row(text, "| 7 CNNs* |") and "7 nets" in row(text, "| 7 CNNs* |")
    star = row(text, "| 1 CNN* |")
    assert "| 38.50 |" in star and "pre-trained on fall2011 (21,841 classes" in star
    assert "| another method: quoted, not reproduced |" in row(text, "| SIFT + FVs [24] |")
    # The ledger: measured rows with a verdict, and the §7 depth claim from the no_conv3 runs.
    assert "measured: 37.60 / 18.80" in row(text, "| Table 1: CNN (ten patches)")
    assert "| within 1 point of top-1 (n = 1: not yet a finding) |" in row(text, "| Table 1: CNN (ten patches)")
    assert "worse by 1.3 top-1" in row(text, "| Table 2: 1 CNN,")
    depth = row(text, "| §7: removing conv3")
    assert "Δ ten-patch top-1 +2.50 ± 0.50 s.e." in depth and "inconclusive (n = 2, fewer than 3 seeds)" in depth
    assert "not yet run (experiment `no_conv2`)" in row(text, "| §7: removing conv2")
    assert "counted: 60,965,224" in row(text, "| §1/§3: the net has 60 million parameters")
    assert "disagrees: conv3, conv4 hold more" in row(text, "| §1: each convolutional layer")
    assert "| not yet run |" in row(text, "| §4.2: dropout")


def test_rows_without_runs_say_not_yet_run(tmp_path):
    results = tmp_path / "results"
    fake_run(results / "runs/tiny/paper", dataset="tiny-imagenet", experiment="paper", top1=0.9, classes=10)
    fake_eval(results / "runs/tiny/eval-val.json", dataset="tiny-imagenet", split="val", members=["a", "b"], top1=0.8)
    text = write_report(results).read_text()
    for start in ("| CNN (ten patches) |", "| 1 CNN |", "| 5 CNNs |", "| 1 CNN* |", "| 7 CNNs* |"):
        assert "| not yet run |" in row(text, start), start
    assert "| 37.5 | 17.0 |" in text
    assert "| §3.1, Fig. 1" in text and "| not yet run |" in row(text, "| §3.1, Fig. 1")  # no CIFAR summary here


def test_a_last_epoch_ended_by_the_deadline_is_shown_as_such(tmp_path):
    """The main job's deadline can end a run's last epoch early: its results row says on how
    many images, so three such epochs never read as three whole ones."""
    run = fake_run(tmp_path / "runs/tiny/paper/seed0", dataset="tiny-imagenet", experiment="paper", top1=0.7,
                   changes={"epochs": 3}, classes=10)
    final = json.loads((run / "final.json").read_text())
    (run / "final.json").write_text(json.dumps(final | {"epochs": 3, "last_epoch_images": 7}))
    text = write_report(tmp_path).read_text()
    assert "| 3 (the last on 7 of 10 images) |" in row(text, "| tiny-imagenet, 10 classes")
