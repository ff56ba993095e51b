"""The CUDA paths (marked gpu; skipped on a CPU, a failure if skipped where a GPU is visible,
see conftest.py): train_step, PaperSGD, train() and evaluate on CUDA, the LRN operator at the
towers' C = 48 / 128 in bf16 / channels_last inside the net, its no-grad path, the compiled
fast step, an optimiser step with the towers on cuda:0 + cpu, deterministic reruns. The CPU
tests here check the rules the GPU paths rely on (deterministic set-up, the skip rule, the
loader's fallback when nvJPEG fails to start)."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from packing import colour_set
from reproduction.ops import lrn as lrn_op
from reproduction.config import PAPER, RunConfig, TrainConfig, override
from reproduction.data import PackedSet, load_stats
from reproduction.evaluate import evaluate
from reproduction.model import AlexNet
from reproduction.optim import PaperSGD, paper_param_groups
from reproduction.training.build import deterministic_setup, step_module, train_step
from reproduction.train import train

ROOT = Path(__file__).resolve().parents[1]
NO_DROPOUT = dataclasses.replace(PAPER, dropout=0.0, num_classes=10)  # masks differ between devices



def batch(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return 50 * torch.randn(n, 3, 224, 224, generator=g), torch.randint(0, 10, (n,), generator=g)


def stepped(devices, steps=2, fused_sgd=False, fused_lrn=False):
    """The net (no dropout) after `steps` of §5's SGD on fixed batches: its parameters on the CPU."""
    torch.manual_seed(0)
    model = AlexNet(NO_DROPOUT, devices=devices).set_fused_lrn(fused_lrn)
    opt = PaperSGD(paper_param_groups(model, 5e-4), lr=0.01, momentum=0.9, fused=fused_sgd)
    home = model.devices[0]
    losses = []
    for s in range(steps):
        x, y = batch(seed=s)
        loss, _ = train_step(model, opt, x.to(home), y.to(home), n=len(y))
        losses.append(loss.item())
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}, losses


def assert_close_states(want, got, rtol=2e-2):
    """Each tensor's difference small beside what the steps changed in it (a bias that starts
    at 0 or 1 moves by ~1e-4, so elementwise tolerances say little). 2%: the second step's
    loss is ~20 on these inputs, and max-pooling routes the gradient of near-ties by ~1e-6
    differences (two LRN implementations on one CPU already differ by 0.5% in conv1); a
    wrong update is off by the whole movement."""
    init, _ = stepped(("cpu",), steps=0)
    for k in want:
        moved = (want[k] - init[k]).norm().item()
        assert (got[k] - want[k]).norm().item() <= rtol * moved + 1e-7, k


# --- CPU: the rules ---------------------------------------------------------------------

def test_deterministic_setup_sets_the_cublas_workspace_only_for_cuda(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        assert deterministic_setup([torch.device("cpu")]) is False
        assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ and torch.are_deterministic_algorithms_enabled()
        assert deterministic_setup([torch.device("cuda:0"), torch.device("cpu")]) is True
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")  # the user's own choice is kept
        deterministic_setup([torch.device("cuda")])
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    finally:
        torch.use_deterministic_algorithms(False)


def test_compiled_step_module_uses_static_shapes(monkeypatch):
    seen = {}
    monkeypatch.setattr(torch, "compile", lambda m, **kw: seen.update(kw) or m)
    step_module(AlexNet(NO_DROPOUT), TrainConfig(compile=True))
    assert seen == {"dynamic": False}


def test_a_gpu_test_that_skips_where_a_gpu_is_required_fails(pytester, monkeypatch):
    pytester.makeconftest((ROOT / "tests" / "conftest.py").read_text().replace('pytest_plugins = ["pytester"]', ""))
    pytester.makeini("[pytest]\nmarkers =\n    gpu: needs a CUDA device\n")
    pytester.makepyfile(textwrap.dedent("""
        import pytest
        @pytest.mark.gpu
        def test_skips():
            pytest.skip("no data")
        @pytest.mark.gpu
        def test_runs():
            pass
        def test_cpu_skip_is_fine():
            pytest.skip("not a gpu test")
    """))
    monkeypatch.setenv("REPRODUCTION_GPU_TESTS", "require")
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1, skipped=1)
    result.stdout.fnmatch_lines(["*gpu test skipped on a machine with a GPU*no data*"])


def test_evaluate_reads_its_counts_from_the_device_once(tiny_set, monkeypatch):
    """Per batch nothing waits for the device: one .item() for the whole split (the loss sum),
    not three per batch; the numbers are those of a per-image count by hand."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, 4))
    dataset, stats = PackedSet(tiny_set, "train"), load_stats(tiny_set)
    calls = []
    item = torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "item", lambda t: calls.append(1) or item(t))
    got = evaluate(model, dataset, stats, RunConfig().data, ten_patch=False, batch_size=4, workers=0)
    monkeypatch.undo()
    assert len(calls) == 1 and got["images"] == 14
    from reproduction.data import eval_batches
    with torch.no_grad():
        x, y = map(torch.cat, zip(*eval_batches(dataset, stats, RunConfig().data, batch_size=14, workers=0)))
        p = model(x).softmax(1)
    assert got["top1_error"] == pytest.approx((p.argmax(1) != y).float().mean().item())
    assert got["loss"] == pytest.approx(-p[torch.arange(14), y].clamp_min(1e-30).log().mean().item(), rel=1e-5)


def test_a_failing_nvjpeg_falls_back_to_cpu_decode_and_says_so(tiny_set, monkeypatch, capsys):
    """nvJPEG that fails to start (here: every device decode raises, as torchvision does for a
    status other than ARCH_MISMATCH) costs speed, not the loader: the batch is decoded on the
    CPU and copied (to the meta device here, no GPU needed), nvJPEG is not tried again, and one
    warning says so. A corrupt image fails on the CPU too and keeps its own error."""
    from reproduction import data
    real, calls = data.decode_jpeg, []

    def decode(images, mode, device="cpu"):
        calls.append(torch.device(device).type)
        if torch.device(device).type != "cpu":
            raise RuntimeError("nvjpegCreateEx failed: 6 (NVJPEG_STATUS_EXECUTION_FAILED)")
        return real(images, mode=mode)

    monkeypatch.setattr(data, "decode_jpeg", decode)
    monkeypatch.setattr(data, "_CPU_DECODE", {})
    dataset, meta = PackedSet(tiny_set, "train"), torch.device("meta")
    idx = torch.arange(4)
    want = data._decode(dataset.encoded(idx), idx, dataset.image_size, torch.device("cpu"))
    got = [data._decode(dataset.encoded(idx), idx, dataset.image_size, meta) for _ in range(2)]
    assert all(g.device == meta and g.shape == want.shape and g.dtype == want.dtype for g in got)
    assert calls == ["cpu", "meta", "cpu", "cpu"]  # nvJPEG tried once
    err = capsys.readouterr().err
    assert err.count("warning: nvJPEG failed on meta") == 1 and "NVJPEG_STATUS_EXECUTION_FAILED" in err
    assert data.decoder(meta).startswith("CPU + copy (nvJPEG failed: nvjpegCreateEx failed")
    assert data.decoder("cpu").startswith("CPU") and data.decoder("cuda:0") == "nvJPEG"
    monkeypatch.setattr(data, "_CPU_DECODE", {})
    with pytest.raises(RuntimeError) as caught:
        data._decode([torch.tensor([1, 2, 3], dtype=torch.uint8)], torch.arange(1), dataset.image_size, meta)
    assert "nvjpeg" not in str(caught.value).lower() and meta not in data._CPU_DECODE


def test_bench_train_and_eval_record_each_row_as_measured(tiny_set, tmp_path, monkeypatch, capsys):
    """gpu check's bench parts (CPU here): each measured row goes to --json at once (a part
    killed at its deadline keeps what it had measured), and bench train's loader is laid out
    as train() lays it out (channels_last)."""
    from reproduction import bench
    real, layouts = bench.train_batches, []

    def batches(*args, **kw):
        layouts.append(kw.get("channels_last"))
        return real(*args, **kw)

    monkeypatch.setattr(bench, "train_batches", batches)
    rows = tmp_path / "rows.jsonl"
    assert bench.main(["train", "--data", str(tiny_set), "--device", "cpu", "--batch-size", "4", "--batches", "1",
                       "--warmup", "1", "--workers", "0", "--json", str(rows), "--set", "channels_last=True"]) == 0
    assert layouts and all(layouts)
    got = [json.loads(line) for line in rows.read_text().splitlines()]
    assert [r["measurement"].split(" (")[0] for r in got] == ["loader only", "model only", "end to end",
                                                             "end to end / model only"]
    assert all(r["img_s"] > 0 and r["channels_last"] and r["decoder"].startswith("CPU") for r in got[:3])
    out = capsys.readouterr().out
    assert out.index("loader only (read, decode, augment: the ceiling): ") < out.index("| measurement |")
    assert bench.main(["eval", "--data", str(tiny_set), "--device", "cpu", "--batch-size", "4", "--workers", "0",
                       "--ten-patch", "--json", str(rows)]) == 0
    row = json.loads(rows.read_text().splitlines()[-1])
    assert row["bench"] == "eval" and row["images"] == 6
    assert row["patches_s"] == pytest.approx(10 * row["img_s"], abs=1)  # both rounded to 0.1


# --- CUDA ---------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("fused_sgd", [False, True])
def test_train_step_and_paper_sgd_on_cuda_match_the_cpu(no_tf32, fused_sgd):
    want, want_losses = stepped(("cpu",))
    got, got_losses = stepped(("cuda:0",), fused_sgd=fused_sgd)  # fused=True: CUDA params take foreach
    assert got_losses == pytest.approx(want_losses, rel=1e-3)
    assert_close_states(want, got)


@pytest.mark.gpu
@pytest.mark.parametrize("fused_sgd", [False, True])
def test_an_optimiser_step_on_mixed_devices_matches_the_cpu(no_tf32, fused_sgd):
    """Tower A on cuda:0, tower B on the CPU: PaperSGD updates parameters of both devices."""
    want, want_losses = stepped(("cpu",), fused_lrn=True)
    got, got_losses = stepped(("cuda:0", "cpu"), fused_sgd=fused_sgd, fused_lrn=True)
    assert got_losses == pytest.approx(want_losses, rel=1e-3)
    assert_close_states(want, got)


@pytest.mark.gpu
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("channels", [48, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lrn_operator_on_cuda_at_the_towers_sizes(channels, dtype, groups):
    """conv1's tower (48 maps at 55²) and conv2's (128 at 27²), NHWC as the fast step has
    them, alone or as two towers in one tensor (groups=2, windows clipped at the tower's
    edge); values, gradient, and the no-grad path (no backward state) against the oracle."""
    hw = 55 if channels == 48 else 27
    g = torch.Generator().manual_seed(0)
    x = (300 * torch.randn(16, channels * groups, hw, hw, generator=g)).to("cuda", dtype)
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    grad = torch.randn(x.shape, generator=g).to("cuda", dtype).contiguous(memory_format=torch.channels_last)
    args = (5, 1e-4, 0.75, 2.0, groups)
    y = lrn_op.local_response_norm(x, *args)
    (dx,) = torch.autograd.grad(y, x, grad)
    with torch.no_grad():
        y_no_grad = lrn_op.local_response_norm(x, *args)
    ref_y = lrn_op.reference(x.detach().cpu(), None, *args)
    ref_dx = lrn_op.reference(x.detach().cpu(), grad.cpu(), *args)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(y.cpu().float(), ref_y.float(), **tol)
    torch.testing.assert_close(y_no_grad, y.detach(), rtol=0, atol=0)
    scale = ref_dx.abs().max().item()
    torch.testing.assert_close(dx.cpu().float(), ref_dx.float(), rtol=tol["rtol"], atol=tol["atol"] * scale)
    assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.gpu
def test_fast_net_in_bf16_channels_last_matches_the_plain_net(no_tf32):
    """The LRN operator inside the net (both towers, C = 48 and 128) under bf16 autocast and
    channels_last, against the plain fp32 net (TF32 off): logits, fc8's gradient, the no-grad path."""
    torch.manual_seed(0)
    plain = AlexNet(NO_DROPOUT, devices=("cuda",)).eval()
    fast = copy.deepcopy(plain).set_fused_lrn(True).to(memory_format=torch.channels_last)
    x, _ = batch(8)
    x = x.cuda()
    ref = plain(x)
    ref.square().mean().backward()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = fast(x.contiguous(memory_format=torch.channels_last))
    out.float().square().mean().backward()
    scale = ref.abs().max().item()
    torch.testing.assert_close(out.float(), ref, rtol=5e-2, atol=5e-2 * scale)
    # fc8's gradient (conv1's is no measure: bf16 makes exact ties in max-pooling, which then
    # routes the gradient elsewhere; the operator's own gradient is checked above)
    want, got = plain.fc8.weight_a.grad, fast.fc8.weight_a.grad
    assert (got - want).norm() / want.norm() < 0.05
    assert all(torch.isfinite(p.grad).all() for p in fast.parameters())
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        no_grad = fast(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(no_grad.float(), out.float().detach(), rtol=1e-2, atol=1e-2 * scale)


@pytest.mark.gpu
def test_compiled_fast_step_runs_full_and_partial_batches():
    """torch.compile of the fast step (LRN operator, bf16, channels_last, dynamic=False): full
    batch, the epoch's partial batch, full again, all finite; its first loss is the eager step's."""
    t = TrainConfig(precision="bf16", channels_last=True, compile=True, fused_lrn=True)
    losses = {}
    for compiled in (False, True):
        torch.compiler.reset()
        torch.manual_seed(0)
        model = AlexNet(NO_DROPOUT, devices=("cuda",)).set_fused_lrn(True)
        opt = PaperSGD(paper_param_groups(model, 5e-4), lr=0.01, momentum=0.9)
        fn = step_module(model, dataclasses.replace(t, compile=compiled))
        out = []
        for s, n in enumerate((8, 5, 8)):
            x, y = batch(n, seed=s)
            loss, errors = train_step(fn, opt, x.cuda(), y.cuda(), n=n, precision="bf16", channels_last=True)
            out.append(loss.item())
            assert 0 <= errors.item() <= n
        losses[compiled] = out
    assert torch.isfinite(torch.tensor(losses[True])).all()
    # the first step's loss: the same weights, only the kernels' rounding differs (later steps
    # start from updates that large, diverging first steps on these inputs magnify)
    assert losses[True][0] == pytest.approx(losses[False][0], rel=2e-2)


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    return colour_set(tmp_path_factory.mktemp("tiny"), train=14, val=6, seed=0)


@pytest.mark.gpu
@pytest.mark.parametrize("fast", [False, True])
def test_train_and_evaluate_on_cuda(tiny_set, tmp_path, fast):
    """train() on CUDA (nvJPEG loader, the step, per-epoch evaluation, checkpoints) and
    evaluate() of its weights give the same numbers as the run's final evaluation."""
    changes = {"batch_size": 4, "epochs": 2, "seed": 3, "stuck_steps": 10_000}
    if fast:
        # the fast path as the ablations run it (compile has its own test: it costs ~a minute)
        changes |= {"precision": "bf16", "channels_last": True, "fused_lrn": True}
    config = override(RunConfig(), changes)
    final = train(config, tiny_set, tmp_path / "run", devices=(torch.device("cuda:0"),), workers=0,
                  log=lambda s: None)
    assert final["centre"]["images"] == 6 and 0 <= final["ten_patch"]["top1_error"] <= 1
    state = torch.load(tmp_path / "run" / "checkpoint.pt", map_location="cpu", weights_only=False)
    model = AlexNet(override(config, {"num_classes": 4}).model, devices=("cuda:0",)).set_fused_lrn(fast)
    model.load_state_dict(state["model"])
    if fast:
        model.to(memory_format=torch.channels_last)
    got = evaluate(model, PackedSet(tiny_set, "val"), load_stats(tiny_set), config.data, ten_patch=True,
                   batch_size=4, device="cuda", precision=config.train.precision,
                   channels_last=config.train.channels_last)
    # cuDNN may pick other kernels (benchmark mode, TF32 convolutions): one image of 6 may flip
    assert abs(got["top1_error"] - final["ten_patch"]["top1_error"]) <= 1 / 6 + 1e-9
    assert got["loss"] == pytest.approx(final["ten_patch"]["loss"], rel=2e-2)


@pytest.mark.gpu
def test_deterministic_training_on_cuda_is_bit_repeatable():
    """deterministic=True on CUDA in a fresh process (CUBLAS_WORKSPACE_CONFIG is read at the
    first cuBLAS call): two runs of three steps from the same seed give identical weights,
    through the LRN operator that deterministic selects."""
    code = textwrap.dedent("""
        import os, torch
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        from reproduction.config import PAPER
        from reproduction.model import AlexNet
        from reproduction.optim import PaperSGD, paper_param_groups
        from reproduction.training.build import deterministic_setup, train_step
        assert deterministic_setup([torch.device("cuda")])
        def run():
            torch.manual_seed(0)
            m = AlexNet(PAPER, devices=("cuda",)).set_fused_lrn(True)
            opt = PaperSGD(paper_param_groups(m, 5e-4), lr=0.01, momentum=0.9)
            g = torch.Generator().manual_seed(1)
            for s in range(3):
                torch.manual_seed(100 + s)
                x = (50 * torch.randn(8, 3, 224, 224, generator=g)).cuda()
                y = torch.randint(0, 1000, (8,), generator=g).cuda()
                train_step(m, opt, x, y, n=8)
            return [p.detach().clone() for p in m.parameters()]
        a, b = run(), run()
        assert all(torch.equal(p, q) for p, q in zip(a, b)), "deterministic runs differ"
        print("bit-identical")
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "bit-identical" in done.stdout, done.stderr[-3000:]
