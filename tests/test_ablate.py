"""python -m reproduction.ablate: a tiny study through the real command (2 experiments × 2 seeds
× 1 epoch), its summary, table and figure, the reuse of finished runs, and its refusals."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from packing import colour_set
from reproduction.ablate import main, verdict

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities")
RECIPE = ["--set", "epochs=1", "batch_size=4", "stuck_steps=10000"]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("ablate")
    data = colour_set(root / "data", train=8, val=4, seed=0)
    out = root / "study"
    args = ["paper", "no_lrn", "--data", str(data), "--seeds", "0", "1", "--out", str(out), *RECIPE]
    assert main(args) == 0
    return data, out, args


def test_a_tiny_study_writes_its_summary_table_and_figure(study):
    _, out, _ = study
    for e in ("paper", "no_lrn"):
        for s in (0, 1):
            assert (out / "runs" / e / f"seed{s}" / "final.json").is_file()
    summary = json.loads((out / "summary.json").read_text())
    no_lrn = summary["experiments"]["no_lrn"]
    assert no_lrn["vs_paper"]["top1_error"]["protocol"] == "ten_patch" and len(no_lrn["vs_paper"]["top1_error"]["per_seed"]) == 2
    assert no_lrn["verdict"] in ("inconclusive at this scale", "at chance: no evidence either way")  # 2 seeds: never a finding
    assert set(summary["fig3"]) == {"0", "1"} and [t["tower"] for t in summary["fig3"]["0"]] == ["A", "B"]
    assert summary["scale"]["epochs"] == 1 and summary["scale"]["classes"] == 4
    text = (out / "table.md").read_text()
    assert "| paper | 2 |" in text and "| no_lrn | 2 |" in text and "Verdict rule" in text
    assert (out / "curves.png").stat().st_size > 1000


def test_a_second_call_reuses_every_finished_run(study, capsys):
    data, out, args = study
    before = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*/final.json")}
    assert main(args) == 0
    assert capsys.readouterr().out.count(" reused;") == 4
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*/final.json")} == before


def test_another_recipe_into_the_same_study_is_refused(study, capsys):
    data, out, args = study
    assert main([*args[:-4], "--set", "epochs=2", "batch_size=4", "stuck_steps=10000"]) == 2
    assert "holds a finished run of another config" in capsys.readouterr().err


def test_the_verdict_rule():
    def row(mean, se, err=0.5):
        return {"vs_paper": {"top1_error": {"mean": mean, "se": se}}, "ten_patch_top1_error": {"mean": err}}
    assert verdict("no_lrn", row(0.03, 0.01), 0.9, 3).startswith("measured: top-1 +3.0 points, the paper's sign")
    assert "opposite" in verdict("no_lrn", row(-0.03, 0.01), 0.9, 3)
    assert verdict("no_lrn", row(0.03, 0.02), 0.9, 3) == "inconclusive at this scale"
    assert verdict("no_lrn", row(0.03, 0.001), 0.9, 2) == "inconclusive at this scale"  # fewer than 3 seeds
    assert verdict("tanh", row(0.4, 0.001, err=0.9), 0.9, 3) == "at chance: no evidence either way"


def test_help_explains_the_study():
    done = subprocess.run([sys.executable, "-m", "reproduction.ablate", "--help"], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0 and "reused" in done.stdout and "summary.json" in done.stdout
