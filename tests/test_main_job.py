"""The main job (`python -m reproduction`) end to end on a few real Tiny-ImageNet images per
class: prepare, train, evaluate, Fig. 3, report, summary; a second call reuses the run, --new
trains another; and nothing it does touches a tracked file."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
import torch

import reproduction.__main__ as main_job
from reproduction.config import override

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


def test_recipe_is_stated_and_shrinks_by_a_fraction():
    options, name, changes = main_job.recipe(False, "tiny-imagenet")
    assert options == ["--classes", "10", "--limit-per-class", "500", "--val-limit-per-class", "50"]
    assert name == "tiny-imagenet-10x500" and "precision" not in changes  # measured, not assumed
    assert main_job.recipe(False, "tiny-imagenet", 0.5)[0][-4:] == ["--limit-per-class", "250",
                                                                    "--val-limit-per-class", "25"]
    assert main_job.recipe(False, "tiny-imagenet", 0.01)[1] == "tiny-imagenet-10x20"  # never below 20 / 10
    assert main_job.recipe(True, "tiny-imagenet")[1] == "tiny-imagenet-200"
    assert main_job.recipe(True, "tiny-imagenet", 0.1)[1] == "tiny-imagenet-200x50"


PLANNED = main_job.EXPERIMENTS["paper"]


def budget(**kw):
    base = dict(seconds=600.0, began=time.time() - 20, train_images=5000, val_images=500)
    return main_job.Budget(**{**base, **kw})


@pytest.mark.parametrize("rate,epochs", [(90.0, 6), (22.5, 2), (13.0, 1)])
def test_the_budget_keeps_the_epochs_that_fit(rate, epochs):
    """At AMX's speed the recipe's 6 epochs fit 10 minutes; at 22.5 img/s 2, at 13 img/s 1, each
    with too little time left for a tenth of one more epoch (MIN_PART)."""
    b = budget()
    plan = b.plan(rate, 6)
    assert plan.epochs == plan.record["epochs"] == epochs and plan.fraction == 1.0
    assert plan.record["eta_minutes"] <= 10 and plan.deadline == pytest.approx(b.began + 600 - b.tail(rate))
    assert plan.reason.startswith(f"{epochs} of the recipe's 6 epochs")


def test_the_budget_plans_a_last_epoch_that_its_deadline_ends():
    """At 27 img/s two whole epochs end the job after ~8.1 minutes: the time left would train
    ~2,600 images of a third, so three are planned and training stops at the deadline, which
    leaves the last epoch's validation and the final evaluation their time within the budget."""
    b = budget()
    plan = b.plan(27.0, 6)
    assert plan.epochs == plan.record["epochs"] == 3 and plan.record["eta_minutes"] == 10
    assert plan.deadline == pytest.approx(b.began + 600 - b.tail(27.0))
    assert plan.record["deadline_minutes"] == pytest.approx((plan.deadline - b.began) / 60)
    assert plan.record["training_seconds"] == pytest.approx(plan.deadline - time.time(), abs=1)
    assert "3 of the recipe's 6 epochs, the last ending at the deadline after about 2," in plan.reason
    assert "of its 5,000 images" in plan.reason and "training stops by 8.4 min" in plan.reason


def test_the_plan_times_the_runs_own_step_before_training(monkeypatch):
    """The speed the plan uses: the median of the timed synthetic steps of the run's own config
    (the one builder's net and step), after one untimed warm-up."""
    import reproduction.bench as bench
    seconds = iter([5.0, 0.5, 0.25, 1.0])  # the warm-up's 5 s is not timed
    clock = {"t": 0.0}

    def fake_step(config, device):
        def step():
            clock["t"] += next(seconds)
            return (torch.zeros(()),)
        return step, None, None
    monkeypatch.setattr(bench, "synthetic_step", fake_step)
    monkeypatch.setattr(main_job.time, "perf_counter", lambda: clock["t"])
    config = override(PLANNED, {"batch_size": 32})
    assert main_job.measure_speed(config, "cpu") == pytest.approx(32 / 0.5)


def test_the_budget_shrinks_the_images_where_one_epoch_does_not_fit():
    plan = budget().plan(5.0, 6)
    assert 0 < plan.fraction < 0.5 and plan.epochs == 1


def test_precision_is_measured_only_where_bf16_is_native(monkeypatch):
    import reproduction.precision as precision
    built = []

    def step(seconds):
        def make(p):
            built.append(p)
            return lambda: time.sleep(seconds[p])
        return make
    monkeypatch.setattr(precision, "native_bf16", lambda device: False)
    chosen, why = precision.choose_precision("cpu", step({}))
    assert chosen == "fp32" and built == [] and "emulated" in why and "not measured" in why
    monkeypatch.setattr(precision, "native_bf16", lambda device: True)
    chosen, why = precision.choose_precision("cpu", step({"fp32": 0.03, "bf16": 0.01}))
    assert chosen == "bf16" and built == ["fp32", "bf16"] and "measured one step at fp32" in why
    chosen, why = precision.choose_precision("cpu", step({"fp32": 0.02, "bf16": 0.02}))
    assert chosen == "fp32" and "under the 1.1x" in why


def test_an_emulated_bf16_step_is_run_once_not_timed_again(monkeypatch):
    import reproduction.precision as precision
    monkeypatch.setattr(precision, "native_bf16", lambda device: True)
    calls = {"fp32": 0, "bf16": 0}

    def make(p):
        def run():
            calls[p] += 1
            time.sleep(0.01 if p == "fp32" else 0.1)  # bf16 10x slower: a CPU that only emulates it
        return run
    chosen, why = precision.choose_precision("cpu", make)
    assert chosen == "fp32" and calls == {"fp32": 3, "bf16": 1} and "under the 1.1x" in why


def test_evidence_needs_a_clean_checkout(monkeypatch, tmp_path, capsys):
    import reproduction.training.runfolder as runfolder
    monkeypatch.setattr(runfolder, "git_state", lambda: {"sha": "x", "dirty": True})
    args = ["--evidence", "--work", str(tmp_path / "data"), "--runs", str(tmp_path / "runs")]
    assert main_job.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --evidence:") and "uncommitted changes" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "runs").exists() and not (tmp_path / "data").exists()  # refused before any work


def test_evidence_records_the_data_path_relative_to_the_checkout(monkeypatch, tmp_path):
    repo, runs = tmp_path / "repo", tmp_path / "repo" / "runs"
    out = runs / "set" / "paper-cpu" / "seed0"
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps({"data": {"path": str(repo / "data" / "set")}}))
    for name in ("metrics.jsonl", "final.json", "fig3-conv1.png", "fig3-conv1.json"):
        (out / name).write_text("{}")
    monkeypatch.setattr(main_job, "REPO", repo)
    evidence = main_job.file_evidence(out, runs, out / "fig3-conv1.png")
    assert evidence == repo / "results" / "runs" / "set" / "paper-cpu" / "seed0"
    assert json.loads((evidence / "config.json").read_text())["data"]["path"] == "data/set"
    assert (evidence / "fig3-conv1.json").is_file() and not (evidence / "checkpoint.pt").exists()


def test_a_run_being_trained_is_left_alone_by_a_second_job(tiny_recipe, tmp_path, capsys):
    from reproduction.training.runfolder import RunFolder
    run = tmp_path / "runs" / "tiny-imagenet-2x6" / "paper-cpu" / "seed0"
    run.mkdir(parents=True)
    (run / "config.json").write_text("{}")
    with RunFolder(run) as live:
        live.lock()  # as the first job holds it while it trains
        assert main_job.main(["--work", str(tmp_path / "data"), "--runs", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert "being trained by another process" in err and "--new" in err and "delete" not in err
    assert sorted(p.name for p in run.iterdir()) == ["config.json"]


def test_a_job_stopped_before_its_first_checkpoint_starts_again_in_its_folder(tiny_recipe, tmp_path, capsys):
    run = tmp_path / "runs" / "tiny-imagenet-2x6" / "paper-cpu" / "seed0"
    run.mkdir(parents=True)
    (run / "config.json").write_text('{"killed": "before its first checkpoint"}')
    assert main_job.main(["--work", str(tmp_path / "data"), "--runs", str(tmp_path / "runs")]) == 0
    assert "starting it again" in capsys.readouterr().out
    assert (run / "final.json").is_file() and "killed" not in (run / "config.json").read_text()


def test_a_damaged_final_json_of_a_finished_run_is_one_line(tiny_recipe, tmp_path, capsys):
    run = tmp_path / "runs" / "tiny-imagenet-2x6" / "paper-cpu" / "seed0"
    run.mkdir(parents=True)
    (run / "config.json").write_text("{}")
    (run / "final.json").write_text('{"centre": ')  # cut mid-write by something else
    assert main_job.main(["--work", str(tmp_path / "data"), "--runs", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "final.json" in err and "--new" in err and len(err.splitlines()) == 1
