"""The main job (`python -m reproduction`) end to end on a few real Tiny-ImageNet images per
class: prepare, train, evaluate, Fig. 3, report, summary; a second call reuses the run, --new
trains another; and nothing it does touches a tracked file."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

import reproduction.__main__ as main_job

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT.parent / "shared" / "data" / "tiny-imagenet-200"
pytestmark = [pytest.mark.skipif(not (TINY / "wnids.txt").is_file(), reason=f"{TINY} is absent"),
              pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities")]


def git_status() -> str:
    done = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=ROOT,
                          capture_output=True, text=True)
    if done.returncode:
        pytest.skip("not a git checkout")
    return done.stdout


@pytest.fixture
def tiny_recipe(monkeypatch):
    # 2 classes × 6 training / 2 val images, batch 4, 1 epoch: the job's code path in seconds.
    monkeypatch.setattr(main_job, "CPU_RUN", (2, 6, 2, {**main_job.CPU_RUN[3], "batch_size": 4, "epochs": 1}))


def test_main_job_end_to_end_and_nothing_tracked_changes(tiny_recipe, tmp_path, capsys):
    before = git_status()
    args = ["--work", str(tmp_path / "data"), "--runs", str(tmp_path / "runs")]
    assert main_job.main(args) == 0
    out = capsys.readouterr().out
    run = tmp_path / "runs" / "tiny-imagenet-2x6" / "paper-cpu" / "seed0"
    for name in ("config.json", "metrics.jsonl", "final.json", "checkpoint.pt", "fig3-conv1.png", "fig3-conv1.json"):
        assert (run / name).is_file(), name
    final = json.loads((run / "final.json").read_text())
    assert final["epochs"] == 1 and final["steps"] == 3  # 12 images in batches of 4
    config = json.loads((run / "config.json").read_text())["config"]
    assert config["train"]["batch_size"] == 4 and config["train"]["fused_lrn"] and config["model"]["lrn"] == "code"
    assert "centre patch" in out and "ten patches" in out and "chance" in out and "50.0%" in out
    assert "tower A" in out and "tower B" in out and str(run) in out
    assert (tmp_path / "runs" / "README.md").is_file()
    assert git_status() == before  # no tracked file changed, no untracked file appeared

    # A second call reuses the finished run (says so); --new trains into another folder.
    assert main_job.main(args) == 0
    assert "already holds a finished run" in capsys.readouterr().out
    assert main_job.main(args + ["--new"]) == 0
    assert (run.with_name("seed0-2") / "final.json").is_file()
    assert git_status() == before


def test_default_folders_are_ignored_by_git():
    """runs/ and data/ (the defaults) are ignored, so a user's run never shows up as a change."""
    for path in ("runs/tiny-imagenet-10x500/paper-cpu/seed0/final.json", "data/tiny-imagenet-10x500/manifest.json"):
        done = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT)
        assert done.returncode == 0, f"{path} is not ignored"
    assert main_job.REPO / "runs" == ROOT / "runs"


def test_recipe_is_stated_and_bf16_only_where_native(monkeypatch):
    import reproduction.evaluate as evaluate
    monkeypatch.setattr(evaluate, "native_bf16", lambda device: False)
    options, name, changes = main_job.recipe(False, "tiny-imagenet")
    assert options == ["--classes", "10", "--limit-per-class", "500", "--val-limit-per-class", "50"]
    assert name == "tiny-imagenet-10x500" and "precision" not in changes
    monkeypatch.setattr(evaluate, "native_bf16", lambda device: True)
    assert main_job.recipe(False, "tiny-imagenet")[2]["precision"] == "bf16"
    assert main_job.recipe(True, "tiny-imagenet")[1] == "tiny-imagenet-200"
