"""The CIFAR-10 experiments' nets, layers, data views, Fig. 1's threshold and the commands."""

import dataclasses
import json
import pickle
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.datasets import CIFAR10

import reproduction.__main__ as main_job
from reproduction import cifar, experiments, report
from reproduction.cifar import LocallyConnected, ResponseNorm, cifar_net
from reproduction.stats import epochs_to, error_curve
from reproduction.config import CifarConfig, override
from reproduction.errors import UserError
from reproduction.experiments import CIFAR_EXPERIMENTS, CONV_LOCAL_11PCT, CONV_LOCAL_13PCT, FIG1


def shapes(net, x):
    out = {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: out.__setitem__(n, tuple(o.shape[1:])))
             for n, m in net.named_children()]
    net(x)
    for h in hooks:
        h.remove()
    return out


def test_18pct_net_shapes_and_parameters():
    net = cifar_net(CifarConfig())
    s = shapes(net, torch.zeros(2, 3, 32, 32))
    # layers-18pct.cfg: pools of 3/2 with cuda-convnet's overhanging last window, 32 → 16 → 8 → 4
    assert s["conv1"] == (32, 32, 32) and s["pool1"] == (32, 16, 16)
    assert s["conv2"] == (32, 16, 16) and s["pool2"] == (32, 8, 8)
    assert s["conv3"] == (64, 8, 8) and s["pool3"] == (64, 4, 4) and s["fc10"] == (10,)
    # conv 5×5×3×32, 5×5×32×32, 5×5×32×64 and fc 1024×10, each with its biases
    assert cifar.count_parameters(net) == (75 * 32 + 32) + (800 * 32 + 32) + (800 * 64 + 64) + (1024 * 10 + 10) == 89_578


def test_conv_local_net_shapes_and_parameters():
    net = cifar_net(CONV_LOCAL_11PCT)
    s = shapes(net, torch.zeros(2, 3, 24, 24))
    assert s["conv1"] == (64, 24, 24) and s["pool1"] == (64, 12, 12)
    assert s["conv2"] == (64, 12, 12) and s["pool2"] == (64, 6, 6)
    assert s["local3"] == (32, 6, 6) and s["local4"] == (32, 6, 6) and s["fc10"] == (10,)
    local = 36 * (576 * 32 + 32) + 36 * (288 * 32 + 32)  # unshared: one filter bank per position
    assert cifar.count_parameters(net) == (75 * 64 + 64) + (1600 * 64 + 64) + local + (1152 * 10 + 10) == 1_116_490
    assert isinstance(net.norm1, ResponseNorm) and net.norm1.kind == "crossmap"
    assert isinstance(cifar_net(CONV_LOCAL_13PCT).norm1, torch.nn.Identity)


def test_init_follows_the_layer_files():
    torch.manual_seed(0)
    net = cifar_net(CONV_LOCAL_11PCT)
    assert abs(net.conv1.weight.std().item() - 1e-4) < 1e-5
    assert abs(net.local3.weight.std().item() - 0.04) < 1e-3
    assert all(getattr(net, n).bias.abs().sum() == 0 for n in net.init_std)


def test_response_norms_against_written_out_formulas():
    torch.manual_seed(0)
    x = torch.randn(2, 6, 5, 5) * 30
    got = ResponseNorm("spatial", 3, 5e-5, 0.75)(x)
    want = torch.empty_like(x)
    for i in range(5):
        for j in range(5):
            region = x[:, :, max(0, i - 1):i + 2, max(0, j - 1):j + 2]  # clipped 3×3 region, same map
            want[:, :, i, j] = x[:, :, i, j] / (1 + 5e-5 / 9 * region.pow(2).sum((2, 3))) ** 0.75
    torch.testing.assert_close(got, want)
    got = ResponseNorm("crossmap", 5, 1e-3, 0.75)(x)
    for c in range(6):
        window = x[:, max(0, c - 2):c + 3]
        want[:, c] = x[:, c] / (1 + 1e-3 / 5 * window.pow(2).sum(1)) ** 0.75  # k = 1 in cuda-convnet
    torch.testing.assert_close(got, want)


def test_locally_connected_uses_one_filter_per_position():
    torch.manual_seed(0)
    layer = LocallyConnected(2, 3, size=4, kernel=3, padding=1)
    torch.nn.init.normal_(layer.weight)
    torch.nn.init.normal_(layer.bias)
    x = torch.randn(2, 2, 4, 4)
    padded = F.pad(x, (1, 1, 1, 1))
    want = torch.empty(2, 3, 4, 4)
    for i in range(4):
        for j in range(4):
            patch = padded[:, :, i:i + 3, j:j + 3].reshape(2, -1)  # (c, ky, kx) order, as unfold
            want[:, :, i, j] = patch @ layer.weight[i * 4 + j] + layer.bias[:, i * 4 + j]
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)


def test_epochs_to_threshold_on_a_synthetic_curve():
    points = [(0.5, 0.6), (1.0, 0.4), (1.5, 0.3), (2.0, 0.2)]
    assert epochs_to(points, 0.25) == pytest.approx(1.75)   # halfway between 0.3 and 0.2
    assert epochs_to(points, 0.4) == pytest.approx(1.0)     # reached exactly at a point
    assert epochs_to(points, 0.1) is None
    assert epochs_to([(0.2, 0.5)], 0.7) == pytest.approx(0.2 * 0.2 / 0.4)  # from chance, 0.9, at epoch 0
    rows = [{"epoch": 0, "train_error": 0.5, "train_error_parts": [0.8, 0.6, 0.5, 0.4, 0.3]},
            {"epoch": 1, "train_error": 0.2, "train_error_parts": [0.25, 0.2, 0.2, 0.2, 0.2]}]
    curve = error_curve(rows)
    assert curve[0] == (0.2, 0.8) and curve[4] == (1.0, 0.3) and curve[5] == (1.2, 0.25)
    assert epochs_to(curve, 0.25) == pytest.approx(1.2)


def test_batches_crop_flip_and_mean_are_keyed_by_seed_and_epoch():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8)
    labels = torch.arange(10)
    mean = images.float().mean(0)
    c = dataclasses.replace(CONV_LOCAL_11PCT, batch_size=4)
    a = list(cifar.batches(images, labels, mean, c, 0, train=True))
    b = list(cifar.batches(images, labels, mean, c, 0, train=True))
    other = list(cifar.batches(images, labels, mean, c, 1, train=True))
    assert [x.shape for x, _ in a] == [(4, 3, 24, 24)] * 2 + [(2, 3, 24, 24)]
    assert all(torch.equal(x, y) for (x, _), (y, _) in zip(a, b))
    assert not all(torch.equal(x, y) for (x, _), (y, _) in zip(a, other))
    assert sorted(torch.cat([y for _, y in a]).tolist()) == list(range(10))  # each image once per epoch
    # every training view is some crop (maybe mirrored) of its image minus the mean's centre crop
    x, y = a[0][0][0], a[0][1][0]
    centre = mean[:, 4:28, 4:28]
    found = [(r, s, f) for r in range(9) for s in range(9) for f in (False, True)
             if torch.allclose(x, (lambda v: v.flip(-1) if f else v)(images[y, :, r:r + 24, s:s + 24].float() - centre))]
    assert found
    test = next(cifar.batches(images, labels, mean, c, 0, train=False))[0]
    torch.testing.assert_close(test, images[:4, :, 4:28, 4:28].float() - centre)


def test_experiment_configs_change_only_what_they_claim():
    relu, tanh = CIFAR_EXPERIMENTS["cifar-relu-tanh"].values()
    assert dataclasses.replace(tanh, activation="relu") == relu == FIG1
    assert FIG1.weight_decay_conv == FIG1.weight_decay_top == 0 and not FIG1.flip  # "no regularization"
    no_norm, norm = CIFAR_EXPERIMENTS["cifar-lrn"].values()
    assert dataclasses.replace(no_norm, norm="crossmap") == norm
    with pytest.raises(ValueError, match="layout"):
        override(CifarConfig(), ["layout=resnet"])
    with pytest.raises(ValueError, match="crop"):
        CifarConfig(crop=28)


def test_training_learns_and_stops_at_the_threshold(shared_data, tmp_path):
    data = cifar.load_cifar10(shared_data / "cifar10", per_class=2)
    assert data["train"][0].shape == (20, 3, 32, 32) and torch.bincount(data["train"][1]).tolist() == [2] * 10
    # one batch of 20 real images, learnt by heart until the 25% stop (FIG1's stop_below)
    c = dataclasses.replace(FIG1, lr=0.003, epochs=60, batch_size=20)
    rows, final = cifar.run(tmp_path / "run", c, data, {}, log=lambda s: None)
    assert len(rows) < 60 and rows[-1]["train_error"] <= 0.25 < min(r["train_error"] for r in rows[:-1])
    assert rows[-1]["train_loss"] < 0.5 * rows[0]["train_loss"]
    assert all(len(r["train_error_parts"]) == 1 for r in rows)  # one batch: one part per epoch
    assert rows[-1]["test_error"] is not None and not final["diverged"]
    assert final["epochs"] == len(rows) and "25%" in final["stopped"]
    assert {"config.json", "metrics.jsonl", "checkpoint.pt", "final.json"} <= {p.name for p in (tmp_path / "run").iterdir()}


def test_an_interrupted_cifar_run_resumes_to_the_same_numbers(shared_data, tmp_path, monkeypatch):
    """Ctrl-C mid-epoch checkpoints; the same call again continues, and ends with the metrics
    and weights of a run never interrupted (CPU, to the bit; seconds aside)."""
    import os
    import signal

    from reproduction.training.checkpoints import load_checkpoint
    from reproduction.optim import PaperSGD
    data = cifar.load_cifar10(shared_data / "cifar10", per_class=4)
    c = dataclasses.replace(FIG1, lr=0.003, epochs=2, batch_size=8, drop_epochs=(1,))  # 5 batches an epoch
    straight, _ = cifar.run(tmp_path / "straight", c, data, {}, log=lambda s: None)
    original, calls = PaperSGD.step, []

    def step_then_interrupt(self, *a, **k):
        out = original(self, *a, **k)
        calls.append(1)
        if len(calls) == 3:  # mid-epoch 0
            os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(PaperSGD, "step", step_then_interrupt)
    said = []
    with pytest.raises(KeyboardInterrupt):
        cifar.run(tmp_path / "resumed", c, data, {"command": "python -m reproduction.experiments X"}, log=said.append)
    assert any("continue with python -m reproduction.experiments X" in s for s in said)
    assert not (tmp_path / "resumed" / "final.json").exists()
    monkeypatch.setattr(PaperSGD, "step", original)
    resumed, final = cifar.run(tmp_path / "resumed", c, data, {}, log=said.append)
    assert any("resumed at epoch 1, batch 3" in s for s in said)
    drop = ("seconds", "img_per_s")
    assert [{k: v for k, v in r.items() if k not in drop} for r in resumed] == [
        {k: v for k, v in r.items() if k not in drop} for r in straight]
    a, b = (load_checkpoint(tmp_path / n / "checkpoint.pt")["model"] for n in ("straight", "resumed"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert len(json.loads((tmp_path / "resumed" / "config.json").read_text())["resumed"]) == 1


def test_a_diverging_sweep_run_is_recorded_and_ranked_last(shared_data, tmp_path):
    data = cifar.load_cifar10(shared_data / "cifar10", per_class=2)
    c = dataclasses.replace(FIG1, lr=1e30, epochs=2, batch_size=20)  # overflows at step 2
    said = []
    rows, final = cifar.run(tmp_path / "run", c, data, {}, log=said.append)
    assert final["diverged"] and final["test_error"] is None and "loss became nan" in final["stopped"]
    assert any(s.startswith("  stopped:") for s in said)
    assert json.loads((tmp_path / "run" / "final.json").read_text()) == final
    assert cifar.sweep_score(rows, final) == (2, float("inf"))
    assert cifar.run(tmp_path / "run", c, data, {}, log=said.append)[1] == final  # reused, not retrained
    with pytest.raises(UserError, match="another config"):
        cifar.run(tmp_path / "run", dataclasses.replace(c, lr=0.01), data, {}, log=said.append)


@pytest.mark.parametrize("experiment", ["cifar-relu-tanh", "cifar-lrn"])
def test_experiment_commands_end_to_end(experiment, shared_data, tmp_path, capsys):
    results = tmp_path
    tmp_path = results / "cifar10" / experiment.removeprefix("cifar-")  # where the report looks
    args = [experiment, "--data", str(shared_data / "cifar10"), "--out", str(tmp_path), "--per-class", "10",
            "--seeds", "0", "1", "--set", "epochs=1", "batch_size=50"]
    if experiment == "cifar-relu-tanh":
        args += ["--lrs", "0.003", "0.01", "--sweep-epochs", "1"]
    assert experiments.main(args) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    variants = summary["activations"] if experiment == "cifar-relu-tanh" else summary["variants"]
    assert set(variants) == set(CIFAR_EXPERIMENTS[experiment])
    for v in variants.values():
        for run in v["runs"].values():
            folder = tmp_path / run["folder"]
            assert {"config.json", "metrics.jsonl", "final.json"} <= {p.name for p in folder.iterdir()}
            assert len((folder / "metrics.jsonl").read_text().splitlines()) == 1
    if experiment == "cifar-relu-tanh":
        assert (tmp_path / "fig1.png").stat().st_size > 0
        assert {w["lr"] for w in summary["activations"]["tanh"]["sweep"]} == {0.003, 0.01}
    else:
        assert len(summary["difference"]["per_seed"]) == 2
    capsys.readouterr()
    assert experiments.main(args) == 0  # a rerun reuses every finished run folder
    out = capsys.readouterr().out
    assert "finished already, reused" in out and "epoch 1/1" not in out
    text = report.write_report(results).read_text()
    if experiment == "cifar-relu-tanh":
        assert "## §3.1, Fig. 1 on CIFAR-10" in text and "(cifar10/relu-tanh/fig1.png)" in text
        assert "| tanh | 0.003 |" in text or "| tanh | 0.01 |" in text  # the swept ε it chose
    else:
        assert "## §3.3 on CIFAR-10" in text and "no_norm − norm" in text
        assert "(cifar10/lrn/runs/norm/seed1)" in text


def test_experiment_command_explains_missing_data(tmp_path, capsys):
    assert experiments.main(["cifar-lrn", "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "CIFAR-10 not found" in err and "cifar-10-batches-py" in err and "--download" in err


# --- torchvision's CIFAR-10 layout (cifar-10-batches-py/), read and downloaded -----------------

def tiny_torchvision_cifar(root: Path, *, per_batch: int = 4, test: int = 10, names=cifar.CLASSES) -> Path:
    """torchvision's CIFAR-10 layout in miniature: data_batch_1..5, test_batch and batches.meta,
    pickled dicts as the official files are, with generated pixels; labels cycle through the
    classes, so the five training batches hold 2 images of each class."""
    folder = root / CIFAR10.base_folder
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    k = 0
    for name, n in [*((f"data_batch_{i}", per_batch) for i in range(1, 6)), ("test_batch", test)]:
        batch = {"batch_label": name, "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 "labels": [(k + j) % 10 for j in range(n)], "filenames": [f"{name}_{j}.png" for j in range(n)]}
        k += n
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    meta = {"label_names": list(names), "num_cases_per_batch": per_batch, "num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return folder


def test_torchvision_layout_reads_as_torchvision_does(tmp_path, monkeypatch):
    folder = tiny_torchvision_cifar(tmp_path)
    data = cifar.load_cifar10(tmp_path, tmp_path / "cache.npz")
    assert (tmp_path / "cache.npz").is_file()
    # torchvision's own reader is the reference (it checks the real files' MD5s, which these lack)
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", lambda *a, **k: True)
    for split, train in (("train", True), ("test", False)):
        reference = CIFAR10(str(tmp_path), train=train)
        x, y = data[split]
        assert torch.equal(x, torch.from_numpy(reference.data).permute(0, 3, 1, 2)), split  # N×H×W×C → N×C×H×W
        assert y.tolist() == reference.targets, split
    assert data["train"][0].shape == (20, 3, 32, 32) and len(data["test"][1]) == 10
    again = cifar.load_cifar10(folder, tmp_path / "cache.npz")  # the batches folder itself, from the cache
    assert torch.equal(again["train"][0], data["train"][0])
    sub = cifar.load_cifar10(folder, per_class=1)
    assert torch.bincount(sub["train"][1]).tolist() == [1] * 10


def test_torchvision_layout_refuses_foreign_or_incomplete_batches(tmp_path):
    bad_names = tiny_torchvision_cifar(tmp_path / "a", names=[f"c{i}" for i in range(10)])
    with pytest.raises(UserError, match="batches.meta: label_names .* are not CIFAR-10's"):
        cifar.load_cifar10(bad_names)
    missing = tiny_torchvision_cifar(tmp_path / "b")
    (missing / "data_batch_3").unlink()
    with pytest.raises(UserError, match="CIFAR-10 incomplete: missing .*data_batch_3"):
        cifar.load_cifar10(missing)
    (missing / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(UserError, match="data_batch_3 is not a readable CIFAR-10 batch"):
        cifar.load_cifar10(missing)


def lrn_command(tmp_path: Path, out: str, *extra: str) -> list[str]:
    return ["cifar-lrn", "--out", str(tmp_path / out), "--seeds", "0", "--set", "epochs=1", "batch_size=10", *extra]


def test_experiment_command_trains_on_the_torchvision_layout(tmp_path, monkeypatch):
    tiny_torchvision_cifar(tmp_path / "tv")

    def no_download(*args, **kwargs):
        raise AssertionError("CIFAR-10 is there: nothing may be downloaded")

    monkeypatch.setattr(cifar, "download_and_extract_archive", no_download)
    work, out = tmp_path / "work", tmp_path / "results" / "cifar10" / "lrn"
    assert experiments.main(lrn_command(tmp_path, str(out), "--data", str(tmp_path / "tv"), "--work", str(work))) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["source"] == {"layout": "torchvision", "path": str(tmp_path / "tv")}
    for variant in ("norm", "no_norm"):
        config = json.loads((out / "runs" / variant / "seed0" / "config.json").read_text())
        assert (config["data"]["train_images"], config["data"]["test_images"]) == (20, 10)
    assert (work / "cifar10-native.npz").is_file()  # the cache goes to --work, not the checkout's data/
    # One seed has no sd: the summary holds null (JSON has no NaN) and the report says so.
    assert summary["difference"]["sd"] is None and summary["variants"]["norm"]["test_error_sd"] is None
    text = report.write_report(tmp_path / "results").read_text()
    assert "One seed only" in text and "inconclusive (n = 1, fewer than 3 seeds" in text and "± nan" not in text


def test_experiment_command_downloads_with_torchvision_when_no_cifar_is_there(tmp_path, monkeypatch, capsys):
    calls = []

    def fake_download(url, download_root, filename=None, md5=None, **kwargs):  # torchvision's helper, offline
        calls.append((url, Path(download_root), filename, md5))
        tiny_torchvision_cifar(Path(download_root))

    monkeypatch.setattr(cifar, "download_and_extract_archive", fake_download)
    monkeypatch.setattr(cifar, "SHARED_CIFAR10", tmp_path / "no-shared-data")
    work = tmp_path / "work"
    assert experiments.main(lrn_command(tmp_path, "a", "--work", str(work))) == 0  # no --data: automatic
    assert calls == [(CIFAR10.url, work / "downloads", CIFAR10.filename, CIFAR10.tgz_md5)]
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["source"]["path"] == \
        str(work / "downloads" / CIFAR10.base_folder)
    mine = tmp_path / "mine"
    assert experiments.main(lrn_command(tmp_path, "b", "--data", str(mine), "--download", "--work", str(work))) == 0
    assert calls[-1][:2] == (CIFAR10.url, mine) and (mine / CIFAR10.base_folder / "test_batch").is_file()

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(cifar, "download_and_extract_archive", offline)
    capsys.readouterr()
    assert experiments.main(lrn_command(tmp_path, "c", "--work", str(tmp_path / "w2"))) == 2
    err = capsys.readouterr().err
    assert f"could not download {CIFAR10.url}" in err and "MD5" in err and "Traceback" not in err


def test_the_main_job_and_the_experiments_share_one_finder(tmp_path, monkeypatch):
    """python -m reproduction --dataset cifar10 finds CIFAR-10 as reproduction.experiments does:
    ../shared's copy when there, else torchvision's in WORK/downloads (downloaded once)."""
    shared = tmp_path / "shared-cifar10"
    tiny_torchvision_cifar(shared)
    monkeypatch.setattr(cifar, "SHARED_CIFAR10", shared)
    monkeypatch.setattr(cifar, "download_and_extract_archive", lambda *a, **k: pytest.fail("must not download"))
    assert main_job.find_cifar10(tmp_path / "work") == shared
    monkeypatch.setattr(cifar, "SHARED_CIFAR10", tmp_path / "none")
    monkeypatch.setattr(cifar, "download_and_extract_archive",
                        lambda url, root, **k: tiny_torchvision_cifar(Path(root)))
    assert main_job.find_cifar10(tmp_path / "work") == tmp_path / "work" / "downloads" / CIFAR10.base_folder


@pytest.mark.parametrize("bad", [["--seeds", "-1"], ["--per-class", "0"], ["--lrs", "0.01", "0"], ["--sweep-epochs", "0"]])
def test_experiment_command_refuses_bad_values_before_reading_data(bad, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        experiments.main(["cifar-relu-tanh", "--out", str(tmp_path / "out"), *bad])
    assert e.value.code == 2 and f"error: {bad[0]}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
