"""Training (§5): exact resume, atomic checkpoints, the guard, the run folder, evaluation."""

from __future__ import annotations

import json
import math
import os
import signal

import pytest
import torch

from packing import colour_set
from reproduction.training import checkpoints, runfolder
from reproduction.config import DataConfig, RunConfig, override
from reproduction.data import PackedSet, load_stats
from reproduction.errors import UserError
from reproduction.evaluate import evaluate
from reproduction.evaluate import main as evaluate_main
from reproduction.optim import PaperSGD
from reproduction.training.loop import Guard, TrainingStopped
from reproduction.train import learning_rate, train
from reproduction.train import main as train_main

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities")

TINY = override(RunConfig(), {"batch_size": 4, "epochs": 2, "seed": 3, "stuck_steps": 10_000})


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    """14 train images (the last batch of 4 is partial) and 6 val images of 4 colour classes."""
    return colour_set(tmp_path_factory.mktemp("tiny"), train=14, val=6, seed=0)


def run(tiny_set, out, config=TINY, **kw):
    return train(config, tiny_set, out, devices=(torch.device("cpu"),), workers=0, log=lambda s: None, **kw)


@pytest.fixture(scope="module")
def finished_run(tiny_set, tmp_path_factory):
    """One run through the command line, as a user starts it."""
    out = tmp_path_factory.mktemp("runs") / "run"
    code = train_main(["--experiment", "paper", "--data", str(tiny_set), "--out", str(out), "--devices", "cpu",
                       "--workers", "0", "--set", "batch_size=4", "epochs=2", "seed=3", "stuck_steps=10000"])
    assert code == 0
    return out, json.loads((out / "final.json").read_text())


def test_a_run_writes_a_self_describing_folder(tiny_set, finished_run):
    out, final = finished_run
    tmp_path = out.parent
    meta = json.loads((tmp_path / "run" / "config.json").read_text())
    assert meta["config"]["model"]["num_classes"] == 4  # fc8 follows the data
    assert meta["config"]["train"]["batch_size"] == 4 and meta["seed"] == 3
    assert {"sha", "dirty"} <= set(meta["git"]) and meta["environment"]["torch"] == torch.__version__
    assert meta["precision"] == {"precision": "fp32", "channels_last": False, "compile": False,
                                 "deterministic": False}
    rows = runfolder.read_metrics(tmp_path / "run")
    assert [r["epoch"] for r in rows] == [0, 1] and [r["step"] for r in rows] == [4, 8]
    for key in ("train_loss", "train_error", "val_top1_error", "val_top5_error", "lr", "img_per_s", "seconds"):
        assert all(key in r for r in rows), key
    assert rows[0]["lr"] == 0.01
    assert final["centre"]["images"] == 6 and final["ten_patch"]["patches"] == 10
    assert meta["experiment"] == "paper" and "--set" in meta["command"]
    with pytest.raises(UserError, match="--resume"):
        run(tiny_set, tmp_path / "run")


def test_evaluate_command_reproduces_the_final_numbers(tiny_set, finished_run, tmp_path, capsys):
    out, final = finished_run
    checkpoint = tmp_path / checkpoints.CHECKPOINT
    checkpoint.write_bytes((out / checkpoints.CHECKPOINT).read_bytes())
    assert evaluate_main(["--checkpoint", str(checkpoint), "--data", str(tiny_set), "--device", "cpu"]) == 0
    again = json.loads((tmp_path / "eval-val.json").read_text())  # its own file: final.json is the run's
    assert not (tmp_path / "final.json").exists()
    for protocol in ("centre", "ten_patch"):  # other batching: the loss agrees to rounding
        assert {k: v for k, v in again[protocol].items() if k != "loss"} == \
            {k: v for k, v in final[protocol].items() if k != "loss"}
        assert again[protocol]["loss"] == pytest.approx(final[protocol]["loss"], rel=1e-5)
    assert '"top1_error"' in capsys.readouterr().out


def test_opt_in_bf16_and_channels_last_train_and_are_recorded(tiny_set, tmp_path):
    config = override(TINY, {"epochs": 1, "precision": "bf16", "channels_last": True})
    final = run(tiny_set, tmp_path / "run", config)
    meta = json.loads((tmp_path / "run" / "config.json").read_text())
    assert meta["precision"]["precision"] == "bf16" and meta["precision"]["channels_last"] is True
    row = runfolder.read_metrics(tmp_path / "run")[0]
    assert math.isfinite(row["train_loss"]) and 0 <= final["ten_patch"]["top1_error"] <= 1


def test_interrupted_and_resumed_run_is_bit_identical(tiny_set, tmp_path, monkeypatch):
    """6 steps straight vs 3 steps, a Ctrl-C, and a resume: the same weights, optimiser state
    and metrics, to the bit (CPU)."""
    config = override(TINY, {"epochs": 2})
    run(tiny_set, tmp_path / "straight", config)
    straight = checkpoints.load_checkpoint(tmp_path / "straight" / checkpoints.CHECKPOINT)

    original_step = PaperSGD.step
    calls = []

    def step_then_interrupt(self, *a, **k):
        out = original_step(self, *a, **k)
        calls.append(1)
        if len(calls) == 3:  # mid-epoch 0 (4 batches per epoch)
            os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(PaperSGD, "step", step_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_set, tmp_path / "resumed", config)
    monkeypatch.setattr(PaperSGD, "step", original_step)
    half = checkpoints.load_checkpoint(tmp_path / "resumed" / checkpoints.CHECKPOINT)
    assert half["position"]["epoch"] == 0 and half["position"]["batch"] == 3
    run(tiny_set, tmp_path / "resumed", config, resume=True)
    resumed = checkpoints.load_checkpoint(tmp_path / "resumed" / checkpoints.CHECKPOINT)

    for key, value in straight["model"].items():
        assert torch.equal(resumed["model"][key], value), key
    v_straight = straight["optimizer"]["state"]
    v_resumed = resumed["optimizer"]["state"]
    assert all(torch.equal(v_straight[i]["velocity"], v_resumed[i]["velocity"]) for i in v_straight)
    drop = ("seconds", "img_per_s")
    strip = lambda rows: [{k: v for k, v in r.items() if k not in drop} for r in rows]
    assert strip(runfolder.read_metrics(tmp_path / "resumed")) == strip(runfolder.read_metrics(tmp_path / "straight"))
    assert json.loads((tmp_path / "resumed" / "config.json").read_text())["resumed"][0]["changed"] == ""


def test_ctrl_c_during_an_epochs_validation_stops_after_its_checkpoint(tiny_set, tmp_path, monkeypatch):
    """A Ctrl-C that arrives after the epoch's last step (during its validation) is not lost:
    the epoch is recorded and checkpointed, then the run stops; --resume finishes it."""
    import reproduction.train as train_module
    original, calls = train_module.evaluate, []

    def evaluate_then_interrupt(*a, **k):
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return original(*a, **k)

    monkeypatch.setattr(train_module, "evaluate", evaluate_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_set, tmp_path / "run", override(TINY, {"epochs": 1}))
    assert not (tmp_path / "run" / "final.json").exists()
    saved = checkpoints.load_checkpoint(tmp_path / "run" / checkpoints.CHECKPOINT)
    assert saved["position"]["epoch"] == 1 and saved["position"]["batch"] == 0
    assert len(runfolder.read_metrics(tmp_path / "run")) == 1
    monkeypatch.setattr(train_module, "evaluate", original)
    final = run(tiny_set, tmp_path / "run", override(TINY, {"epochs": 1}), resume=True)
    assert final["epochs"] == 1 and (tmp_path / "run" / "final.json").is_file()


def test_a_damaged_val_image_is_named_and_the_epochs_steps_kept(tiny_set, tmp_path, capsys):
    import shutil

    import numpy as np
    data = tmp_path / "data"
    shutil.copytree(tiny_set, data)
    offset, length, _ = np.load(data / "val.index.npy")[2]
    with open(data / "val.jpg.bin", "r+b") as f:
        f.seek(offset)
        f.write(b"\0" * length)
    args = ["--data", str(data), "--out", str(tmp_path / "run"), "--devices", "cpu", "--workers", "0",
            "--set", "batch_size=4", "epochs=1", "seed=3", "stuck_steps=10000"]
    assert train_main(args) == 2
    err = capsys.readouterr().err
    assert "image 2 (val_2.JPEG)" in err and "val.jpg.bin" in err and "Traceback" not in err
    saved = checkpoints.load_checkpoint(tmp_path / "run" / checkpoints.CHECKPOINT)["position"]
    assert (saved["epoch"], saved["batch"], saved["step"]) == (0, 4, 4)  # the epoch's 4 steps are kept
    shutil.copy(tiny_set / "val.jpg.bin", data / "val.jpg.bin")  # repaired: the run goes on from there
    assert train_main(["--resume", "--out", str(tmp_path / "run"), "--workers", "0"]) == 0
    assert len(runfolder.read_metrics(tmp_path / "run")) == 1


def test_a_recorded_relative_data_path_is_found_from_another_directory(tmp_path, monkeypatch):
    (tmp_path / "checkout" / "data" / "set").mkdir(parents=True)
    run_folder = tmp_path / "checkout" / "runs" / "set" / "paper-cpu" / "seed0"
    run_folder.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert runfolder.locate_data("data/set", run_folder) == tmp_path / "checkout" / "data" / "set"
    assert runfolder.locate_data("data/none", run_folder) == runfolder.Path("data/none")  # as recorded


def test_a_crash_while_writing_a_checkpoint_leaves_the_previous_one(finished_run, tmp_path, monkeypatch):
    path = tmp_path / checkpoints.CHECKPOINT
    path.write_bytes((finished_run[0] / checkpoints.CHECKPOINT).read_bytes())
    before = checkpoints.load_checkpoint(path)

    def torn_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(OSError, match="disk full"):
        checkpoints.save_checkpoint(path, {"model": {}})
    after = checkpoints.load_checkpoint(path)
    assert after["position"] == before["position"]
    assert all(torch.equal(after["model"][k], v) for k, v in before["model"].items())
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def test_guard_stops_on_nan_with_advice():
    guard = Guard(1000, stuck_steps=500, log=lambda s: None)
    with pytest.raises(TrainingStopped, match=r"loss became nan .*--set lr=0.001"):
        guard.check(float("nan"), step=7, lr=0.01)


def test_guard_warns_then_stops_at_chance():
    messages = []
    guard = Guard(50, stuck_steps=500, log=messages.append)
    chance = math.log(50)
    for step in range(1, 500):
        guard.check(chance + 0.01 * (-1) ** step, step, 0.01)
    assert len(messages) == 1 and "at chance" in messages[0] and "init_bias=0.1" in messages[0]
    with pytest.raises(TrainingStopped, match=r"still at chance, ln\(50\) = 3.912, after 500 steps"):
        guard.check(chance, 500, 0.01)
    # a loss that has left chance never trips it
    learning = Guard(50, stuck_steps=10, log=messages.append)
    for step in range(1, 200):
        learning.check(chance - 0.5, step, 0.01)


def test_a_diverging_run_stops_with_a_clear_message(tiny_set, tmp_path):
    with pytest.raises(TrainingStopped, match="loss became"):
        run(tiny_set, tmp_path / "run", override(TINY, {"lr": 1e12}))


def test_learning_rate_rules():
    fixed = override(TINY, {"schedule": "fixed", "drop_epochs": (2, 4)})
    assert [learning_rate(fixed, [0.5] * e) for e in (0, 1, 2, 4)] == pytest.approx([0.01, 0.01, 1e-3, 1e-4])
    plateau = override(TINY, {"patience": 1})
    assert learning_rate(plateau, [0.9, 0.8]) == 0.01
    assert learning_rate(plateau, [0.9, 0.8, 0.8]) == pytest.approx(0.001)


class ConstantModel(torch.nn.Module):
    """Logits that depend only on the pixel at the top-left of each view, so the ten patches
    of one image disagree in a known way."""

    def __init__(self, classes):
        super().__init__()
        self.classes = classes
        self.calls = []

    def forward(self, x):
        self.calls.append(x.shape[0])
        corner = x[:, :, 0, 0].sum(1)
        return torch.stack([corner * (c + 1) / 1000 for c in range(self.classes)], 1)


def test_ten_patch_evaluation_averages_softmax_by_hand(tiny_set):
    data, stats = PackedSet(tiny_set, "val"), load_stats(tiny_set)
    config = DataConfig()
    model = ConstantModel(4)
    result = evaluate(model, data, stats, config, ten_patch=True, batch_size=4, workers=0)
    assert model.calls == [40, 20]  # 6 images × 10 patches, in batches of 4 images
    from reproduction.data import eval_batches
    probs, labels = [], []
    for x, y in eval_batches(data, stats, config, batch_size=6, ten_patch=True, workers=0):
        for image, label in zip(x, y):
            p = sum(torch.softmax(model(v[None])[0], 0) for v in image) / 10
            probs.append(p)
            labels.append(int(label))
    top1 = sum(int(p.argmax()) == l for p, l in zip(probs, labels)) / 6
    top5 = sum(l in p.topk(4).indices.tolist() for p, l in zip(probs, labels)) / 6
    assert result["top1_error"] == pytest.approx(1 - top1) and result["top5_error"] == pytest.approx(1 - top5)
    assert result["images"] == 6


def test_report_builds_from_run_folders(finished_run, tmp_path):
    out, _ = finished_run
    results = tmp_path / "results"

    def copy(experiment, seed, shift):
        folder = results / "runs" / "test" / experiment / f"seed{seed}"
        folder.mkdir(parents=True)
        meta = json.loads((out / "config.json").read_text()) | {"experiment": experiment}
        if experiment == "no_lrn":  # the config an ablation run really has
            meta["config"]["model"]["lrn"] = "none"
        final = json.loads((out / "final.json").read_text())
        final["centre"]["top1_error"] = 0.5 + shift
        (folder / "config.json").write_text(json.dumps(meta))
        (folder / "final.json").write_text(json.dumps(final))
        (folder / "metrics.jsonl").write_text((out / "metrics.jsonl").read_text())

    copy("paper", 0, 0.00)
    copy("paper", 1, 0.02)
    copy("no_lrn", 0, 0.05)
    copy("no_lrn", 1, 0.07)
    from reproduction.report import write_report
    text = write_report(results).read_text()
    assert "| 37.5 | 17.0 |" in text  # Table 1 beside ours
    row = [line for line in text.splitlines() if line.startswith("| test, 4 classes, 14 / 6 images | paper |")][0]
    assert "| 2 | 2 | 51.00 ± 1.41 |" in row and "[seed0](runs/test/paper/seed0)" in row
    assert "| batch_size=4, epochs=2 |" in row  # the scaled-down recipe, stated (the guard's stuck_steps is no recipe)
    assert "| 75.0 / 0.0 |" in row  # chance for 4 classes
    # no_lrn − paper = 5 points of top-1, sd √(1.41² + 1.41²) = 2.00; the paper's +1.4
    ablation = [line for line in text.splitlines() if "| no_lrn (§3.3) |" in line][0]
    assert "+5.00 ± 2.00" in ablation and "| +1.4 | +1.2 | yes |" in ablation
    png = results / "curves-test-14-6.png"
    assert png.stat().st_size > 1000 and f"![{png.stem}]({png.name})" in text


def test_finetune_from_a_checkpoint_on_five_real_tiny_imagenet_classes(shared_data, finished_run, tmp_path):
    """Fine-tuning: the 4-class run's weights, fc8 re-initialised for 5 classes, conv1-fc7 frozen."""
    from data_prep.__main__ import main as prep
    data = tmp_path / "tiny5"
    assert prep(["tiny-imagenet", str(shared_data / "tiny-imagenet-200"), "--out", str(data), "--classes", "5",
                 "--limit-per-class", "3", "--val-limit-per-class", "2", "--workers", "1", "--no-hash"]) == 0
    source = finished_run[0] / checkpoints.CHECKPOINT
    out = tmp_path / "finetune"
    frozen = "conv1,conv2,conv3,conv4,conv5,fc6,fc7"
    assert train_main(["--init-from", str(source), "--data", str(data), "--out", str(out), "--devices", "cpu",
                       "--workers", "0", "--set", "epochs=1", "batch_size=5", f"freeze={frozen}"]) == 0
    before, after = checkpoints.load_checkpoint(source)["model"], checkpoints.load_checkpoint(out / checkpoints.CHECKPOINT)["model"]
    for layer in frozen.split(","):
        assert torch.equal(after[f"{layer}.weight"], before[f"{layer}.weight"]), layer
    assert after["fc8.weight"].shape == (5, 4096) and before["fc8.weight"].shape == (4, 4096)
    meta = json.loads((out / "config.json").read_text())
    assert meta["experiment"] == "finetune" and meta["init_from"] == str(source)
    assert meta["config"]["train"]["freeze"] == frozen.split(",") and meta["config"]["model"]["num_classes"] == 5
    final = json.loads((out / "final.json").read_text())
    assert final["centre"]["images"] == 10  # 5 classes × 2 real val images
    assert runfolder.read_metrics(out)[0]["step"] == 3
    # fc8 started from §5's fresh initialisation (same seed, same draws) and, not frozen, was trained
    from reproduction.config import RunConfig, from_dict
    from reproduction.model import AlexNet
    torch.manual_seed(meta["config"]["train"]["seed"])
    fresh = AlexNet(from_dict(RunConfig, meta["config"]).model).state_dict()["fc8.weight"]
    assert not torch.equal(after["fc8.weight"], fresh)
    assert (after["fc8.weight"] - fresh).abs().max() < 0.05  # a few small steps from that start


def test_finetune_refuses_a_mismatched_start(finished_run, tiny_set, tmp_path, capsys):
    source = finished_run[0] / checkpoints.CHECKPOINT
    with pytest.raises(SystemExit):  # the checkpoint fixes the architecture: no --experiment
        train_main(["--init-from", str(source), "--experiment", "no_lrn", "--data", str(tiny_set),
                    "--out", str(tmp_path / "x")])
    assert "--init-from takes its architecture" in capsys.readouterr().err
    from reproduction.model import AlexNet
    from reproduction.training.build import load_pretrained
    one_tower = AlexNet(override(TINY, {"towers": 1, "num_classes": 4}).model)
    with pytest.raises(UserError, match="does not fit this net"):
        load_pretrained(one_tower, source)


def test_fashion_mnist_experiment_on_real_images(shared_data, tmp_path):
    """The d2l tutorial's job: real Fashion-MNIST (grey → 3 channels by data_prep, 28 px
    upsampled by the loader) through experiment fashion_mnist, end to end."""
    from data_prep.__main__ import main as prep
    data = tmp_path / "fmnist"
    assert prep(["fashion-mnist", str(shared_data / "fashion-mnist"), "--out", str(data),
                 "--limit-per-class", "1", "--workers", "1", "--no-hash"]) == 0
    out = tmp_path / "run"
    assert train_main(["--experiment", "fashion_mnist", "--data", str(data), "--out", str(out),
                       "--devices", "cpu", "--workers", "0", "--set", "epochs=1", "batch_size=10"]) == 0
    meta = json.loads((out / "config.json").read_text())
    assert meta["data"]["dataset"] == "fashion-mnist" and meta["config"]["model"]["num_classes"] == 10
    assert meta["config"]["model"]["init_bias"] == 0.1  # the experiment's stated change
    final = json.loads((out / "final.json").read_text())
    assert final["centre"]["images"] == 10 and 0 <= final["ten_patch"]["top1_error"] <= 1


def deadline_after(monkeypatch, answers):
    """The loop's deadline check answers these in turn (once before each epoch, once after each
    step but an epoch's last), then True: a deadline reached at a chosen step."""
    answers = iter(answers)
    monkeypatch.setattr("reproduction.training.loop.Loop._past_deadline", lambda self: next(answers, True))


def test_a_deadline_ends_the_epoch_in_progress_as_the_last(tiny_set, tmp_path, monkeypatch):
    """The deadline passes after step 3: the epoch in progress ends there (12 of its 14 images)
    and is the run's last; the metrics row and final.json say so, config.json stays as written
    at the start, and a resume of the checkpoint (at the epoch's end) finds nothing to redo."""
    deadline_after(monkeypatch, [False, False, False])
    final = run(tiny_set, tmp_path / "run", override(TINY, {"epochs": 3}), deadline=1.0)
    assert final["epochs"] == 1 and final["steps"] == 3 and final["last_epoch_images"] == 12
    assert "epoch 1 ended after 12 of its 14 images" in final["stopped"]
    meta = json.loads((tmp_path / "run" / "config.json").read_text())
    assert meta["config"]["train"]["epochs"] == 3  # written once, at the start
    [row] = runfolder.read_metrics(tmp_path / "run")
    assert row["images"] == 12 and row["step"] == 3
    assert checkpoints.load_checkpoint(tmp_path / "run" / checkpoints.CHECKPOINT)["position"]["epoch"] == 1


def test_a_deadline_at_an_epochs_end_starts_no_other_epoch(tiny_set, tmp_path, monkeypatch):
    deadline_after(monkeypatch, [False, False, False, False])
    final = run(tiny_set, tmp_path / "run", override(TINY, {"epochs": 3}), deadline=1.0)
    assert final["epochs"] == 1 and final["steps"] == 4 and "before epoch 2 began" in final["stopped"]
    assert "images" not in runfolder.read_metrics(tmp_path / "run")[0] and "last_epoch_images" not in final


def test_a_caller_record_goes_into_config_json_once_at_the_start(tiny_set, tmp_path):
    """What the caller settled before training (the main job's plan) is part of config.json as
    written at the start; nothing rewrites config.json while the run trains."""
    run(tiny_set, tmp_path / "run", override(TINY, {"epochs": 1}), record={"plan": {"epochs": 1, "why": "test"}})
    meta = json.loads((tmp_path / "run" / "config.json").read_text())
    assert meta["plan"] == {"epochs": 1, "why": "test"} and "best_checkpoint" not in meta


def test_every_choice_made_for_this_machine_is_printed_with_its_reason_and_recorded(tiny_set, tmp_path):
    """What a run chooses by itself (devices, loader and compute threads, the C
    kernels) is one printed line, each choice with its reason, and config.json's "automatic"."""
    lines = []
    train(override(TINY, {"epochs": 1, "fused_lrn": True}), tiny_set, tmp_path / "run", log=lines.append)
    [said] = [line for line in lines if line.startswith("chosen for this machine: ")]
    automatic = json.loads((tmp_path / "run" / "config.json").read_text())["automatic"]
    assert said == "chosen for this machine: " + "; ".join(automatic)
    assert automatic[0].startswith("devices ") and "--devices chooses" in automatic[0]
    assert "loader thread(s)" in automatic[1] and "--workers chooses" in automatic[1]
    if torch.cuda.is_available():
        return
    assert "compute threads (torch's default, one per core)" in automatic[2]
    assert automatic[3].startswith("the C kernels for the LRN and the update ")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes read-only folders anyway")
def test_resume_in_a_read_only_run_folder_is_refused_before_training(finished_run, tmp_path, capsys):
    import shutil
    run = tmp_path / "ro"
    shutil.copytree(finished_run[0], run)
    (run / "final.json").unlink()
    for p in [run, *run.iterdir()]:
        p.chmod(0o555 if p.is_dir() else 0o444)
    try:
        assert train_main(["--resume", "--out", str(run), "--workers", "0"]) == 2
    finally:
        for p in [run, *run.iterdir()]:
            p.chmod(0o755 if p.is_dir() else 0o644)
    assert "is not writable" in capsys.readouterr().err
