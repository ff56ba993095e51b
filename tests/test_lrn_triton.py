"""The fused Triton LRN (reproduction/ops/lrn_triton.py) against its oracle, F.local_response_norm.

On CPU the kernels run in Triton's interpreter. Triton picks interpreter or compiler when a
kernel is made, so those checks run in one child process with TRITON_INTERPRET=1 set from the
start (this file run as a script): it writes its results to a file and the tests here compare
them. Interpreted kernels are slow, hence tensors of 2×C×9×9 and one image through the net.
The gpu-marked tests compare the compiled kernels at conv1's size.
"""

import copy
import dataclasses
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from reproduction.ops import lrn_triton
from reproduction.config import PAPER
from reproduction.model import AlexNet, LocalResponseNorm

ROOT = Path(__file__).resolve().parents[1]
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="triton is not installed; the fused LRN needs it")

# Both §3.3 forms as F.local_response_norm sees them: code α = 1e-4, paper α = 1e-4·5 (c = α/size).
CODE = dict(size=5, alpha=1e-4, beta=0.75, k=2.0)
PAPER_FORM = dict(size=5, alpha=5e-4, beta=0.75, k=2.0)
# id: LRN arguments, channels, dtype, layout ("nchw", "nhwc" = channels_last, "slice" = a
# channel slice of a bigger tensor, strides neither), the upstream gradient's layout. 2×C×9×9
# inputs: 81 pixels make 6 programs per image for C = 48, 11 for C = 128 (lrn_triton.ELEMENTS).
CASES = {
    "code-c48-fp32": (CODE, 48, "float32", "nchw", "nchw"),
    "code-c128-fp32-cl": (CODE, 128, "float32", "nhwc", "nhwc"),
    "paper-c48-fp32-cl": (PAPER_FORM, 48, "float32", "nhwc", "nhwc"),
    "code-c7-fp32-cl": (CODE, 7, "float32", "nhwc", "nhwc"),
    "paper-c7-fp32": (PAPER_FORM, 7, "float32", "nchw", "nchw"),
    "even4-c7-fp32": ({**CODE, "size": 4}, 7, "float32", "nchw", "nchw"),
    "even6-c7-fp32-cl": ({**CODE, "size": 6}, 7, "float32", "nhwc", "nhwc"),
    "size9-c7-fp32": ({**CODE, "size": 9}, 7, "float32", "nchw", "nchw"),  # window wider than C
    "code-c48-bf16": (CODE, 48, "bfloat16", "nchw", "nchw"),
    "paper-c7-bf16-cl": (PAPER_FORM, 7, "bfloat16", "nhwc", "nhwc"),
    "code-c7-fp32-mixed-grad": (CODE, 7, "float32", "nchw", "nhwc"),
    "code-c7-fp32-slice": (CODE, 7, "float32", "slice", "nchw"),
}
MODELS = {"paper": PAPER, "lrn_paper": dataclasses.replace(PAPER, lrn="paper"),
          "lrn_across_towers": dataclasses.replace(PAPER, lrn_scope="all")}


def make_input(channels, dtype, layout, shape=(2, None, 9, 9), seed=0):
    """Signed activations ~300: c·Σa² ≈ 9 beside k = 2, so the window matters."""
    gen = torch.Generator().manual_seed(seed)
    n, _, h, w = shape
    x = 300 * torch.randn(n, channels + (layout == "slice"), h, w, generator=gen)
    x = x[:, 1:] if layout == "slice" else x
    x = x.to(getattr(torch, dtype))
    return x.to(memory_format=torch.channels_last) if layout == "nhwc" else x


def run_case(lrn, channels, dtype, layout, grad_layout, device="cpu", shape=(2, None, 9, 9)):
    """Values and gradients of the fused kernel and of the fp32 oracle on the same input."""
    x = make_input(channels, dtype, layout, shape).to(device).requires_grad_()
    g = make_input(channels, dtype, "nchw", shape, seed=1).to(device) / 300
    g = g.to(memory_format=torch.channels_last) if grad_layout == "nhwc" else g
    y = lrn_triton.local_response_norm(x, **lrn)
    (dx,) = torch.autograd.grad(y, x, g)
    x32 = x.detach().float().requires_grad_()
    y32 = F.local_response_norm(x32, **lrn)
    (dx32,) = torch.autograd.grad(y32, x32, g.float())
    cl = torch.channels_last
    return {"x": x32.detach().cpu(), "y": y.detach().cpu(), "dx": dx.cpu(),
            "y_ref": y32.detach().cpu(), "dx_ref": dx32.cpu(),
            "y_cl": y.is_contiguous(memory_format=cl), "dx_cl": dx.is_contiguous(memory_format=cl)}


def run_module(form):
    """model.LocalResponseNorm, plain and fused: the alpha handed to the kernel for each form;
    the output under no_grad (no d kept) too."""
    plain = LocalResponseNorm(5, 1e-4, 0.75, 2.0, form=form)
    fused = copy.deepcopy(plain)
    fused.fused = True
    x = make_input(48, "float32", "nchw").requires_grad_()
    g = make_input(48, "float32", "nchw", seed=1)
    out = {}
    for name, m in (("plain", plain), ("fused", fused)):
        y = m(x)
        with torch.no_grad():
            y_no_grad = m(x)
        out[name] = [y.detach(), *torch.autograd.grad(y, x, g), y_no_grad]
    return out


def pin_routes(model, routes: list, record: bool):
    """Send every ReLU's and max-pool's gradient of model where the plain net sends it: the
    gates and argmaxes recorded (record=True) or replayed in call order. Both are discontinuous:
    a pre-activation within rounding of 0, or two values of a pooling window within rounding of
    each other, route the gradient differently in two nets whose LRNs round differently (here
    one fc6 unit sat at 1.8e-7 in the plain net and 0.0 in the fused one: 0.13% of conv1's
    gradient). Pinned, the nets differ by the LRNs' rounding alone."""
    replay = iter(routes)

    def hook(module, args, out):
        x = args[0]
        relu = isinstance(module, torch.nn.ReLU)
        if record:
            routes.append((x > 0) if relu else F.max_pool2d(x, module.kernel_size, module.stride,
                                                             return_indices=True)[1])
        route = next(replay)
        return x * route if relu else x.flatten(2).gather(2, route.flatten(2)).view_as(out)

    for m in model.modules():
        if isinstance(m, (torch.nn.ReLU, torch.nn.MaxPool2d)):
            m.register_forward_hook(hook)


def run_model(config, device="cpu", n=1):
    """Logits and conv1/conv2 weight gradients (both reached through the LRNs) of the plain and
    the fused net with the same weights and the same gradient routes (pin_routes)."""
    torch.manual_seed(0)
    plain = AlexNet(config).to(device).eval()  # eval: no dropout draws to line up
    fused = copy.deepcopy(plain).set_fused_lrn(True)
    routes = []
    pin_routes(plain, routes, record=True)
    pin_routes(fused, routes, record=False)
    x = 50 * torch.randn(n, 3, 224, 224, generator=torch.Generator().manual_seed(0)).to(device)
    out = {}
    for name, model in (("plain", plain), ("fused", fused)):
        logits = model(x)
        logits.square().sum().backward()
        out[name] = [logits.detach().cpu()] + [model.get_parameter(p).grad.cpu()
                                               for p in ("conv1.weight_a", "conv2.weight_b")]
    return out


def check_case(r, dtype, layout):
    if dtype == "float32":
        tol = dict(rtol=1e-5, atol=1e-5)
    else:  # bf16 output (8-bit mantissa) against the fp32 oracle
        tol = dict(rtol=2e-2, atol=2e-2 * r["y_ref"].abs().max().item())
    torch.testing.assert_close(r["y"].float(), r["y_ref"], **tol)
    tol["atol"] = tol["atol"] if dtype == "float32" else 2e-2 * r["dx_ref"].abs().max().item()
    torch.testing.assert_close(r["dx"].float(), r["dx_ref"], **tol)
    # The output keeps the input's memory format; dx is laid out like x.
    assert r["y_cl"] == (layout == "nhwc") and r["dx_cl"] == (layout == "nhwc")
    # The normalisation is not ~a constant factor here (else a wrong window could pass).
    ratio = (r["y_ref"] / r["x"])[r["x"].abs() > 1]
    assert ratio.min() < 0.5 * ratio.max()


def check_model(out):
    for plain, fused in zip(out["plain"], out["fused"]):
        scale = plain.abs().max().item()
        torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-5 * scale)


# --- the interpreter, on CPU ---------------------------------------------------------------

@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    """Every case and model check, run once in a child with TRITON_INTERPRET=1."""
    out = tmp_path_factory.mktemp("lrn_triton") / "results.pt"
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, __file__, str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return torch.load(out)


@needs_triton
@pytest.mark.parametrize("case", CASES)
def test_interpreted_kernels_match_torch(interpreted, case):
    _, _, dtype, layout, _ = CASES[case]
    check_case(interpreted[case], dtype, layout)


@needs_triton
@pytest.mark.parametrize("form", ["code", "paper"])
def test_interpreted_fused_module_matches_plain(interpreted, form):
    check_model(interpreted[f"module:{form}"])


@needs_triton
def test_interpreted_fused_model_matches_plain(interpreted):
    """The paper's net, one image: logits and conv1/conv2 gradients through both LRNs."""
    check_model(interpreted["model:paper"])


def test_fused_flag_on_cpu_needs_no_triton():
    """Without CUDA (and without the interpreter) fused=True runs the LRN operator's CPU kernel
    (tests/test_lrn.py), never a Triton kernel. (torch's own custom-op machinery may import the
    triton package when it is installed; that is not ours.)"""
    code = ("import sys, torch; from reproduction.ops import lrn_triton; from reproduction.model import AlexNet; "
            "m = AlexNet().set_fused_lrn(True); assert m.lrn1.fused and m.lrn2.fused; "
            "x = torch.rand(1, 48, 5, 5); "
            "want = torch.nn.functional.local_response_norm(x, 5, 1e-4, 0.75, 2.0); "
            "torch.testing.assert_close(m.lrn1(x), want); "
            "assert lrn_triton._kernels is None, 'Triton kernels made on the CPU path'")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="N×C×H×W"):
        lrn_triton.local_response_norm(torch.zeros(2, 3, 4), **CODE)
    with pytest.raises(TypeError, match="float32"):
        lrn_triton.local_response_norm(torch.zeros(1, 3, 4, 4, dtype=torch.float64), **CODE)


# --- compiled kernels on a GPU, at conv1's size ---------------------------------------------

@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("lrn", [CODE, PAPER_FORM], ids=["code", "paper"])
def test_cuda_kernels_match_torch(lrn, layout, dtype):
    r = run_case(lrn, 96, dtype, layout, layout, device="cuda", shape=(64, None, 55, 55))
    check_case(r, dtype, layout)


@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize("name", MODELS)
def test_cuda_fused_model_matches_plain(no_tf32, name):
    # fp32 at 1e-4: cuDNN's convolutions default to TF32 (10-bit mantissa), which would put
    # ~1e-3 between two nets whose LRN outputs differ by rounding alone
    check_model(run_model(MODELS[name], device="cuda", n=8))


if __name__ == "__main__":  # the interpreter child of the `interpreted` fixture
    assert os.environ.get("TRITON_INTERPRET") == "1"
    results = {case: run_case(*args) for case, args in CASES.items()}
    results.update({f"module:{form}": run_module(form) for form in ("code", "paper")})
    results["model:paper"] = run_model(PAPER)
    torch.save(results, sys.argv[1])
    print(f"{len(results)} results written to {sys.argv[1]}")
