"""The LRN operator (reproduction/ops/lrn.py: `reproduction::lrn`, its C kernel on the CPU) against
its oracle, F.local_response_norm: values and gradients over the forms, tower windows, channel
counts, window sizes, dtypes and layouts the net meets; the whole net with it against the
reference net; and torch.compile seeing it as one node."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
import torch.nn.functional as F

from reproduction.ops import lrn
from reproduction.config import PAPER, override
from reproduction.model import AlexNet

needs_kernel = pytest.mark.skipif(not lrn.kernel_available(), reason="no C compiler: the CPU LRN kernel "
                                  "cannot be built (the operator falls back to plain PyTorch)")


def oracle(x, size, alpha, beta, k, groups):
    """F.local_response_norm per channel group, in fp64 (so the kernel's fp32 error shows)."""
    return torch.cat([F.local_response_norm(p, size, alpha=alpha, beta=beta, k=k)
                      for p in x.double().chunk(groups, 1)], dim=1)


def layout(x, name):
    if name == "nchw":
        return x.contiguous()
    if name == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if name == "channel_slice":  # channels 2.. of a channels_last tensor with 2 more maps
        n, c, h, w = x.shape
        wide = torch.zeros(n, c + 2, h, w, dtype=x.dtype).contiguous(memory_format=torch.channels_last)
        wide[:, 2:] = x
        return wide[:, 2:]
    if name == "spatial_slice":  # pixels that do not merge into one stride: copied first
        return torch.cat([x, x], dim=3)[..., : x.shape[3]]
    raise ValueError(name)


def check(c, size, dtype, fmt, groups=1, n=2, hw=(5, 4), beta=0.75, k=2.0):
    g = torch.Generator().manual_seed(c * 100 + size)
    alpha = 1e-4 * size  # the paper's α·n as F.local_response_norm takes it
    x = layout((torch.randn(n, c, *hw, generator=g) * 40).relu().to(dtype), fmt).requires_grad_(True)
    grad = torch.randn(n, c, *hw, generator=g).to(dtype)
    y = lrn.local_response_norm(x, size, alpha, beta, k, groups)
    (dx,) = torch.autograd.grad(y, x, grad)
    x64 = x.detach().double().requires_grad_(True)
    y64 = oracle(x64, size, alpha, beta, k, groups)
    (dx64,) = torch.autograd.grad(y64, x64, grad.double())
    assert y.dtype == dtype and dx.dtype == dtype and y.shape == x.shape
    assert y.stride() == torch.empty_like(x).stride()  # what the registered shape function promises
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    scale_y, scale_dx = y64.abs().max().item(), dx64.abs().max().item()
    torch.testing.assert_close(y.double() / scale_y, y64 / scale_y, **tol)
    torch.testing.assert_close(dx.double() / scale_dx, dx64 / scale_dx, **tol)


@needs_kernel
@pytest.mark.parametrize("c", [7, 48, 96, 128, 256])
@pytest.mark.parametrize("size", [3, 4, 5, 9])
def test_kernel_matches_torch_over_channels_and_sizes(c, size):
    check(c, size, torch.float32, "channels_last")


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", ["nchw", "channels_last", "channel_slice", "spatial_slice"])
def test_kernel_matches_torch_over_dtypes_and_layouts(dtype, fmt):
    check(48, 5, dtype, fmt)


@needs_kernel
@pytest.mark.parametrize("c,groups", [(96, 2), (256, 2), (14, 2), (12, 3)])
def test_windows_stop_at_each_tower_edge(c, groups):
    check(c, 5, torch.float32, "channels_last", groups=groups)
    check(c, 4, torch.bfloat16, "nchw", groups=groups)


@needs_kernel
def test_batch_of_one_single_pixel_other_beta_and_k():
    check(96, 5, torch.float32, "channels_last", n=1, hw=(1, 1))
    check(48, 5, torch.float32, "nchw", n=1, hw=(13, 13), beta=0.5, k=1.0)  # the general d^-β path
    empty = lrn.local_response_norm(torch.zeros(0, 8, 3, 3), 5, 1e-4, 0.75, 2.0)
    assert empty.shape == (0, 8, 3, 3)


def test_fallback_is_the_same_formula():
    """lrn.reference (what runs without a compiler) against the fp64 oracle."""
    x = (torch.randn(2, 12, 3, 3, generator=torch.Generator().manual_seed(1)) * 40).relu()
    g = torch.randn_like(x)
    y = lrn.reference(x, None, 5, 5e-4, 0.75, 2.0, groups=2)
    fp32 = dict(rtol=1e-5, atol=1e-6)  # fp32 arithmetic against the fp64 oracle
    torch.testing.assert_close(y.double(), oracle(x, 5, 5e-4, 0.75, 2.0, 2), **fp32)
    x64 = x.double().requires_grad_(True)
    (dx64,) = torch.autograd.grad(oracle(x64, 5, 5e-4, 0.75, 2.0, 2), x64, g.double())
    torch.testing.assert_close(lrn.reference(x, g, 5, 5e-4, 0.75, 2.0, groups=2).double(), dx64, **fp32)


@pytest.fixture
def no_kernel(monkeypatch):
    """The operator as it runs where the C kernel cannot be built (no compiler, a failed build)."""
    monkeypatch.setattr(lrn.kernels, "library", lambda: None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_operator_without_the_kernel_runs_forward_and_backward(no_kernel, dtype):
    """The fallback through the operator and autograd, as a training step calls it: the backward
    runs inside the operator, where autograd is off (a fallback by autograd failed there)."""
    check(48, 5, dtype, "channels_last", groups=2)
    check(7, 4, dtype, "nchw")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_operator_takes_dtypes_the_kernel_does_not(dtype):
    """fp64 and fp16 never reach the C kernel: the fallback computes them (fp64 in fp64)."""
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(2, 12, 3, 3, generator=g) * 40).relu().to(dtype).requires_grad_(True)
    grad = torch.randn(2, 12, 3, 3, generator=g).to(dtype)
    y = lrn.local_response_norm(x, 5, 5e-4, 0.75, 2.0, 2)
    (dx,) = torch.autograd.grad(y, x, grad)
    x64 = x.detach().double().requires_grad_(True)
    (dx64,) = torch.autograd.grad(oracle(x64, 5, 5e-4, 0.75, 2.0, 2), x64, grad.double())
    assert y.dtype == dx.dtype == dtype
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(y.double(), oracle(x64.detach(), 5, 5e-4, 0.75, 2.0, 2), **tol)
    torch.testing.assert_close(dx.double(), dx64, **tol)


def test_training_step_without_the_kernel(no_kernel):
    """A whole training step of the net with fused_lrn on and no kernel: the gradients are the
    reference net's (what a machine without a compiler trains with)."""
    plain, fused = nets({"dropout": 0.0, "init_bias": 0.0})
    x, y = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(4)), torch.tensor([1, 7])
    (loss_p, grads_p), (loss_f, grads_f) = run(plain, x, y), run(fused, x, y)
    torch.testing.assert_close(loss_f, loss_p, rtol=1e-5, atol=1e-6)
    for name, grad in grads_p.items():
        torch.testing.assert_close(grads_f[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.skipif(shutil.which("gcc") is None, reason="no gcc to build the kernels with")
def test_kernels_build_with_a_compiler_command_and_an_unwritable_cache(monkeypatch, tmp_path):
    """$CC may be a command with words ("ccache gcc"); a cache folder that cannot be made (here
    one below a file) falls back to the temporary directory instead of losing the kernels."""
    blocked = tmp_path / "file"
    blocked.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocked / "cache"))
    monkeypatch.setenv("CC", "env gcc")
    monkeypatch.setattr(lrn.kernels.tempfile, "tempdir", str(tmp_path))
    built = lrn.kernels._build()
    assert built.parent == tmp_path / built.parent.name and built.is_file()
    assert lrn.kernels._load(built).lrn is not None


def test_a_failed_build_falls_back_and_says_so(monkeypatch, capsys):
    monkeypatch.setenv("CC", "false")  # a compiler that always fails
    monkeypatch.setenv("XDG_CACHE_HOME", "/nonexistent-cache")
    monkeypatch.setattr(lrn.kernels, "_tried", False)
    monkeypatch.setattr(lrn.kernels, "_lib", None)
    assert lrn.kernels.library() is None and not lrn.kernel_available()
    assert "could not be built" in capsys.readouterr().err
    x = torch.rand(1, 8, 2, 2, requires_grad=True)
    lrn.local_response_norm(x, 5, 1e-4, 0.75, 2.0).sum().backward()  # the fallback, through autograd
    assert torch.isfinite(x.grad).all()


def test_bad_shapes_and_groups_are_refused():
    with pytest.raises(ValueError, match="N×C×H×W"):
        lrn.local_response_norm(torch.zeros(2, 3, 4), 5, 1e-4, 0.75, 2.0)
    with pytest.raises(ValueError, match="equal groups"):
        lrn.local_response_norm(torch.zeros(1, 7, 2, 2), 5, 1e-4, 0.75, 2.0, groups=2)


def nets(config, **kw):
    torch.manual_seed(0)
    plain = AlexNet(override(PAPER, {"num_classes": 10, **config}), **kw)
    fused = copy.deepcopy(plain).set_fused_lrn(True)
    return plain, fused


def run(model, x, y):
    model.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    return loss.detach(), {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("config,fmt", [({}, "nchw"), ({}, "channels_last"), ({"lrn": "paper"}, "channels_last"),
                                        ({"lrn_scope": "all"}, "nchw"), ({"towers": 1}, "channels_last")])
def test_whole_net_with_the_operator_equals_the_reference_net(config, fmt):
    """Logits and every gradient, fp32, both nets in the same memory format. Dropout off (the
    masks would differ in draw order), biases 0 and std 0.02: the paper's biases of 1 make many
    near-equal maps after ReLU, whose max-pool routing (hence gradient) flips at the last bit."""
    plain, fused = nets({"dropout": 0.0, "init_bias": 0.0, "init_std": 0.02, **config})
    x = layout(torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2)) * 20, fmt)
    if fmt == "channels_last":
        plain, fused = (m.to(memory_format=torch.channels_last) for m in (plain, fused))
    y = torch.tensor([1, 7])
    loss_p, grads_p = run(plain, x, y)
    loss_f, grads_f = run(fused, x, y)
    torch.testing.assert_close(loss_f, loss_p, rtol=1e-5, atol=1e-5)
    for name, g in grads_p.items():
        scale = g.abs().max().clamp(min=1e-12)
        torch.testing.assert_close(grads_f[name] / scale, g / scale, rtol=1e-5, atol=2e-5, msg=name)


def test_whole_net_in_bf16_stays_close():
    plain, fused = nets({"dropout": 0.0})
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(3)) * 50
    with torch.no_grad():
        ref = plain(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fused.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max() + 1e-3


def test_compiled_net_is_one_graph_and_equals_eager():
    """torch.compile (AOTAutograd, forward and backward) sees each LRN as one node: one graph, no
    break, the operator in it, and the same logits and gradients as eager."""
    from torch._dynamo.testing import CompileCounterWithBackend
    torch._dynamo.reset()
    _, fused = nets({"dropout": 0.0, "num_classes": 10})
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fused, backend=counter, fullgraph=True)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(4)) * 50
    y = torch.tensor([3, 4])
    loss_c, grads_c = run(compiled, x, y)
    loss_e, grads_e = run(fused, x, y)
    assert counter.frame_count == 1
    ops = [n.target for g in counter.graphs for n in g.graph.nodes if n.op == "call_function"]
    lrn_ops = (torch.ops.reproduction.lrn, torch.ops.reproduction.lrn.default)
    assert sum(op in lrn_ops for op in ops) == 4  # lrn1, lrn2 × two towers: each one node
    torch.testing.assert_close(loss_c, loss_e)
    for name, g in grads_e.items():
        torch.testing.assert_close(grads_c[name], g, msg=name)


def test_inductor_compiles_the_operator():
    """Inductor (the default backend, C++ codegen on the CPU) around the operator: forward and
    backward agree with eager."""
    torch._dynamo.reset()

    def block(x):
        return lrn.local_response_norm(torch.relu(x) * 2, 5, 1e-4, 0.75, 2.0, 2).sum(dim=1)

    x = torch.randn(2, 8, 5, 5, generator=torch.Generator().manual_seed(5)).requires_grad_(True)
    out = torch.compile(block, fullgraph=True)(x)
    (dx,) = torch.autograd.grad(out.sum(), x)
    ref = block(x)
    (dref,) = torch.autograd.grad(ref.sum(), x)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(dx, dref)


@pytest.mark.parametrize("fused", [False, True])
def test_half_precision_lrn_sums_and_powers_in_fp32(fused):
    """Under autocast (bf16 on the CPU) and for fp16 activations the LRN computes Σa² and the
    power in fp32 on every path: a² of an activation of 300 overflows fp16 (90,000 > 65,504),
    which would zero the output."""
    from reproduction.model import LocalResponseNorm
    norm = LocalResponseNorm(5, 1e-4, 0.75, 2.0, "code")
    norm.fused = fused
    x = torch.randn(2, 16, 5, 5, generator=torch.Generator().manual_seed(0)) * 300
    exact = F.local_response_norm(x, 5, alpha=1e-4, beta=0.75, k=2.0)
    for dtype in (torch.float16, torch.bfloat16):
        out = norm(x.to(dtype))
        assert out.dtype == dtype and torch.isfinite(out).all()
        torch.testing.assert_close(out.float(), exact, rtol=2 ** -7, atol=1e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = norm(x.to(torch.bfloat16))
    torch.testing.assert_close(out.float(), exact, rtol=2 ** -7, atol=1e-2)
