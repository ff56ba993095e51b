"""Every Triton kernel the GPU stages launch, compiled on the CPU for sm_90 (H100/H200), and
ptxas's report on it: a kernel that does not compile, or spills registers to local memory,
fails here rather than in the first minutes on a GPU.

Triton compiles for a named target without a device: `triton.compile(ASTSource(...),
target=GPUTarget("cuda", 90, 32))` (API shared by triton 3.6 and 3.8).
The launches are lrn_triton's own (`forward_launch`, `backward_launch`) on meta tensors of
the net's shapes, laid out as the operator (reproduction/ops/lrn.py) hands them over: a tower's
channel slice of NCHW or channels_last maps. Their arguments get the specialisation Triton's
JIT gives them on a GPU (an int equal to 1 becomes a constant, pointers and ints divisible by
16 carry that hint). ptxas -v on the generated PTX then reports registers and spills.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import time

import pytest
import torch

from reproduction.ops import lrn_triton

ARCH = 90  # the H200 the stages are planned for (compute capability 9.0)
DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16"}  # fp32 (the paper's) and precision=bf16
# (C per tower, maps at H = W): conv1's 48 at 55, conv2's 128 at 27; lrn_scope="all" runs
# 96 and 256 (the gpu tests use C = 96 at 55 too). Batch 128 (§5).
SHAPES = {48: 55, 128: 27, 96: 55, 256: 27}


def _ptxas() -> str | None:
    try:  # the ptxas Triton itself uses (triton >= 3.4 keeps its tools in knobs)
        from triton import knobs
        path = knobs.nvidia.ptxas.path
        if path and os.path.isfile(path):
            return path
    except (ImportError, AttributeError, RuntimeError):
        pass
    return shutil.which("ptxas")


if importlib.util.find_spec("triton") is None:
    pytestmark = pytest.mark.skip(reason="triton is not installed: the fused LRN's kernels cannot be compiled")
elif _ptxas() is None:
    pytestmark = pytest.mark.skip(reason="no ptxas found (neither Triton's bundled one nor one on PATH)")


def launches():
    """(id, kernel, args, constexprs) of every launch the LRN operator makes in the stages:
    forward without d (inference, no-grad), forward keeping d and backward (training), per
    dtype, layout and channel count."""
    out = []
    for c, hw in SHAPES.items():
        for dtype, dname in DTYPES.items():
            for layout in ("nhwc", "nchw"):
                full = torch.empty(128, 2 * c, hw, hw, device="meta", dtype=dtype)
                if layout == "nhwc":
                    full = full.contiguous(memory_format=torch.channels_last)
                x = full.chunk(2, 1)[1]  # tower B's maps: an offset slice, as lrn.py passes it
                name = f"c{c}-{dname}-{layout}"
                y, _, _, args, meta = lrn_triton.forward_launch(x, 5, 1e-4, 0.75, 2.0, keep_d=False)
                out.append((f"fwd-{name}", "fwd", args, meta))
                y, d, _, args, meta = lrn_triton.forward_launch(x, 5, 1e-4, 0.75, 2.0, keep_d=True)
                out.append((f"fwd-keep-d-{name}", "fwd", args, meta))
                _, _, args, meta = lrn_triton.backward_launch(x, d, torch.empty_like(y), 5, 1e-4, 0.75)
                out.append((f"bwd-{name}", "bwd", args, meta))
    return out


def specialise(fn, args, meta):
    """signature, constexprs and attrs as Triton's JIT makes them for these arguments on a GPU."""
    signature, constexprs, attrs = {}, dict(meta), {}
    for i, (name, value) in enumerate(zip(fn.arg_names, args)):
        if isinstance(value, torch.Tensor):
            signature[name] = "*" + DTYPES[value.dtype]
            aligned = value.storage_offset() * value.element_size() % 16 == 0  # CUDA blocks: 512-byte aligned
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name}: unexpected launch argument {value!r}")
        elif isinstance(value, float):
            signature[name], aligned = "fp32", False
        elif value == 1:
            signature[name], constexprs[name], aligned = "constexpr", 1, False
        else:
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
            aligned = value % 16 == 0
        if aligned:
            attrs[(i,)] = [["tt.divisibility", 16]]
    for name in meta:
        signature[name] = "constexpr"
    # keyed by (argument index,): the form both triton 3.6 and 3.8 take (3.8 also takes names)
    index = {name: (i,) for i, name in enumerate(fn.arg_names)}
    return ({k: signature[k] for k in fn.arg_names}, {index[k]: v for k, v in constexprs.items()}, attrs)


def ptxas_report(ptx: str, tmp_path) -> dict:
    """Registers, stack frame and spill bytes of the PTX's kernel, from ptxas -v for sm_90a."""
    src = tmp_path / "kernel.ptx"
    src.write_text(ptx)
    done = subprocess.run([_ptxas(), "-v", f"--gpu-name=sm_{ARCH}a", str(src), "-o", str(tmp_path / "kernel.cubin")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    log = done.stderr + done.stdout
    number = lambda pattern: int(m.group(1)) if (m := re.search(pattern, log)) else None
    report = {"registers": number(r"Used (\d+) registers"), "stack": number(r"(\d+) bytes stack frame"),
              "spill_stores": number(r"(\d+) bytes spill stores"), "spill_loads": number(r"(\d+) bytes spill loads")}
    assert report["registers"] is not None and report["spill_stores"] is not None, log
    return report


@pytest.fixture(scope="module")
def kernels():
    return dict(zip(("fwd", "bwd"), lrn_triton._get_kernels()))


@pytest.mark.parametrize("launch", launches(), ids=lambda launch: launch[0])
def test_kernel_compiles_for_sm90_without_spills(kernels, launch, tmp_path):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    _, which, args, meta = launch
    fn = kernels[which]
    signature, constexprs, attrs = specialise(fn, args, meta)
    start = time.perf_counter()
    compiled = triton.compile(ASTSource(fn, signature, constexprs=constexprs, attrs=attrs),
                              target=GPUTarget("cuda", ARCH, 32))
    seconds = time.perf_counter() - start
    report = ptxas_report(compiled.asm["ptx"], tmp_path)
    print(f"{launch[0]}: {report} ({seconds:.1f} s to compile, BLOCK_P×BLOCK_C = "
          f"{meta['BLOCK_P']}×{meta['BLOCK_C']})")
    assert report["spill_stores"] == 0 and report["spill_loads"] == 0, (
        f"{launch[0]} spills on sm_{ARCH}: {report}; make lrn_triton.ELEMENTS smaller")
    assert report["registers"] <= 255


def test_the_launches_cover_the_stages_layouts():
    """The specialisation above matches what a GPU launch of each layout sees: channels_last
    has unit channel stride, NCHW unit pixel stride, and both tower slices stay 16-byte aligned."""
    fwd, _ = lrn_triton._get_kernels()
    seen = {}
    for name, which, args, meta in launches():
        if which == "fwd" and not meta["KEEP_D"]:
            signature, constexprs, _ = specialise(fwd, args, meta)
            seen[name] = {fwd.arg_names[k[0]] for k, v in constexprs.items() if v == 1} - set(meta)
    assert seen["fwd-c48-bf16-nhwc"] == {"sxc", "syc"} and seen["fwd-c48-bf16-nchw"] == {"sxp", "syp"}
    assert all(meta["BLOCK_P"] * meta["BLOCK_C"] <= lrn_triton.ELEMENTS for *_, meta in launches())
