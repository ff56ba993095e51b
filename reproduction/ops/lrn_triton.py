"""§3.3's local response normalisation as one fused Triton kernel each way (forward, backward).

An opt-in performance path for `model.LocalResponseNorm` (`AlexNet.set_fused_lrn`), not in the
paper. It computes what `F.local_response_norm(x, size, alpha, beta, k)` computes over dim 1 of
an N×C×H×W tensor:

    b_i = a_i / d_i^β,   d_i = k + (α/size)·Σ_{j=i-size//2}^{i+(size-1)//2} a_j²

the window clipped at the channel edges (for an even size, torch's asymmetric window). Why:
torch builds the sum as avg_pool3d over a padded copy of x², with several full-size temporaries
each way; on an H100 that costs ~16.7 ms forward+backward for conv1's 512×96×55×55, where one
read and write of the tensor is ~0.5 ms. Here each pass reads its inputs once from memory (the
window's neighbour loads hit the cache) and writes its outputs once.

Triton is imported on first use, so CPU-only machines never import it. With TRITON_INTERPRET=1
set before that first use the kernels run in Triton's interpreter on CPU tensors (the tests).

Layouts: one program takes a block of pixels × all channels of one image. A pixel's address is
n·stride_n + c·stride_c + p·stride_p (p = h·W + w), which covers both contiguous NCHW
(stride_p = 1) and channels_last NHWC (stride_c = 1, the faster layout: a pixel's channels are
adjacent) without a copy, as well as channel slices of either; the output keeps the input's
memory format. Strides where h and w do not merge into one p (a spatial crop, say) cost a copy
to contiguous first.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

_kernels = None  # (forward, backward) JIT functions, made on first use by _get_kernels


def local_response_norm(x: Tensor, size: int, alpha: float, beta: float, k: float) -> Tensor:
    """`F.local_response_norm(x, size, alpha, beta, k)` for an N×C×H×W fp32/bf16/fp16 tensor,
    on CUDA (or on CPU under TRITON_INTERPRET=1). Differentiable once in x."""
    if x.dim() != 4:
        raise ValueError(f"fused LRN takes an N×C×H×W tensor, got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"fused LRN takes float32, bfloat16 or float16, got {x.dtype}")
    if size < 1:
        raise ValueError(f"LRN size must be >= 1, got {size}")
    keep_d = torch.is_grad_enabled() and x.requires_grad  # else no backward: skip writing d
    return _LocalResponseNorm.apply(x, int(size), float(alpha), float(beta), float(k), keep_d)


class _LocalResponseNorm(torch.autograd.Function):
    # Saved for backward: x (in AlexNet the ReLU's output, which autograd keeps anyway) and d
    # in fp32. Saving x alone and recomputing d would need d at each of i's neighbours j, i.e.
    # size² cached loads of x per element instead of 3·size; keeping d costs 4 bytes/element of
    # memory and one more write in forward. torch's path keeps three full-size intermediates
    # (the padded x², d and d^β).
    @staticmethod
    def forward(ctx, x, size, alpha, beta, k, keep_d):
        y, d = _forward(x, size, alpha, beta, k, keep_d)
        if keep_d:
            ctx.save_for_backward(x, d)
        ctx.args = size, alpha, beta
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        x, d = ctx.saved_tensors
        return _backward(x, d, g, *ctx.args), None, None, None, None, None


def _pixel_view(t: Tensor) -> tuple[Tensor, tuple[int, int, int]]:
    """t (copied if need be) and its (stride_n, stride_c, stride_p), pixel p = h·W + w."""
    n, c, h, w = t.shape
    sp = t.stride(3) if w > 1 else t.stride(2) if h > 1 else 1
    if (w > 1 and t.stride(3) != sp) or (h > 1 and t.stride(2) != w * sp):
        t = t.contiguous()  # neither NCHW nor NHWC: one extra read and write of t
        sp = 1
    return t, (t.stride(0), t.stride(1), sp)


def _on(device: torch.device):
    # Triton launches on the current CUDA device; tower B's maps may live on another (§3.2).
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


ELEMENTS = 1024  # elements per program (see _blocks)


def _blocks(c: int) -> tuple[int, int]:
    # All channels of a pixel in one program, 1024 elements a program (BLOCK_P pixels × BLOCK_C
    # channels). Why not more: at 4096 the backward's SIZE-unrolled window held ~5×4096 values
    # per 128 threads, so sm_90 spilled (C = 48 bf16: a 4.9 KB stack; C = 128: 168 registers and
    # 3.7 KB) and ptxas took 7.5 s per variant; at 1024 it compiles in ~1.3 s without spilling
    # (tests/test_triton_compile.py fails on any spill).
    import triton
    block_c = triton.next_power_of_2(c)
    return max(1, ELEMENTS // block_c), block_c


def _forward(x: Tensor, size: int, alpha: float, beta: float, k: float, keep_d: bool):
    fwd, _ = _get_kernels()
    y, d, grid, args, meta = forward_launch(x, size, alpha, beta, k, keep_d)
    if x.numel():  # an empty tensor has no programs to launch
        with _on(x.device):
            fwd[grid](*args, **meta)
    return y, (d if keep_d else None)


def forward_launch(x: Tensor, size: int, alpha: float, beta: float, k: float, keep_d: bool):
    """(y, d, grid, args, constexprs) of the forward kernel's launch on x, allocating y and d;
    tests/test_triton_compile.py compiles exactly these launches for sm_90 from meta tensors."""
    x, sx = _pixel_view(x)
    n, c, h, w = x.shape
    y = torch.empty_like(x)  # a dense x's strides, so NCHW stays NCHW and NHWC stays NHWC
    _, sy = _pixel_view(y)
    # d shares y's strides; written only when backward will need it (else y is a dummy pointer).
    d = torch.empty_like(y, dtype=torch.float32) if keep_d else y
    block_p, block_c = _blocks(c)
    tiles = -(-h * w // block_p)
    args = (x, y, d, h * w, c, tiles, *sx, *sy, alpha / size, beta, k)
    meta = dict(SIZE=size, BEFORE=size // 2, KEEP_D=keep_d, BLOCK_P=block_p, BLOCK_C=block_c)
    return y, d, (n * tiles,), args, meta


def _backward(x: Tensor, d: Tensor, g: Tensor, size: int, alpha: float, beta: float) -> Tensor:
    _, bwd = _get_kernels()
    dx, grid, args, meta = backward_launch(x, d, g, size, alpha, beta)
    if x.numel():  # an empty tensor has no programs to launch
        with _on(x.device):
            bwd[grid](*args, **meta)
    return dx


def backward_launch(x: Tensor, d: Tensor, g: Tensor, size: int, alpha: float, beta: float):
    """(dx, grid, args, constexprs) of the backward kernel's launch, allocating dx."""
    x, sx = _pixel_view(x)
    _, sd = _pixel_view(d)
    g, sg = _pixel_view(g)  # the incoming gradient may have its own layout (even expanded)
    n, c, h, w = x.shape
    dx = torch.empty_like(x)
    _, sdx = _pixel_view(dx)
    block_p, block_c = _blocks(c)
    tiles = -(-h * w // block_p)
    args = (x, d, g, dx, h * w, c, tiles, *sx, *sd, *sg, *sdx, alpha / size, beta)
    return dx, (n * tiles,), args, dict(SIZE=size, BEFORE=size // 2, BLOCK_P=block_p, BLOCK_C=block_c)


def _get_kernels():
    """Import triton and jit the two kernels below, once. Their source stays plain functions
    at module level because Triton's interpreter re-runs it with this module's globals, where
    it must find `tl` (a closure would be lost)."""
    global _kernels, tl
    if _kernels is None:
        try:
            import triton
            import triton.language
        except ImportError as e:
            raise ImportError("the fused LRN (fused_lrn=True) needs triton (pip install triton); "
                              "the plain PyTorch LocalResponseNorm runs without it") from e
        tl = triton.language
        _kernels = triton.jit(_lrn_fwd), triton.jit(_lrn_bwd)
    return _kernels


tl = None  # triton.language, bound by _get_kernels; the kernels read it as a global


# One program: image n = pid // tiles, pixels p of tile pid % tiles, all channels ch. The image
# offset is int64, so N·C·H·W may pass 2³¹.

def _lrn_fwd(x_ptr, y_ptr, d_ptr, HW, C, tiles,
             sxn, sxc, sxp, syn, syc, syp, c_alpha, beta, k,
             SIZE: tl.constexpr, BEFORE: tl.constexpr, KEEP_D: tl.constexpr,
             BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    n = (pid // tiles).to(tl.int64)
    p = (pid % tiles) * BLOCK_P + tl.arange(0, BLOCK_P)
    ch = tl.arange(0, BLOCK_C)
    pmask = p < HW
    xrow = x_ptr + n * sxn + p[:, None] * sxp
    s = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for o in tl.static_range(SIZE):  # window j = i - BEFORE + o, zero outside [0, C)
        j = ch + (o - BEFORE)
        m = pmask[:, None] & ((j >= 0) & (j < C))[None, :]
        a = tl.load(xrow + j[None, :] * sxc, mask=m, other=0.0).to(tl.float32)
        s += a * a
    mask = pmask[:, None] & (ch < C)[None, :]
    a = tl.load(xrow + ch[None, :] * sxc, mask=mask, other=0.0).to(tl.float32)
    d = k + c_alpha * s
    y = a * tl.exp2(-beta * tl.log2(d))  # a·d^-β
    out = n * syn + p[:, None] * syp + ch[None, :] * syc
    tl.store(y_ptr + out, y.to(y_ptr.dtype.element_ty), mask=mask)
    if KEEP_D:
        tl.store(d_ptr + out, d, mask=mask)


def _lrn_bwd(x_ptr, d_ptr, g_ptr, dx_ptr, HW, C, tiles,
             sxn, sxc, sxp, sdn, sdc, sdp, sgn, sgc, sgp, son, soc, sop, c_alpha, beta,
             SIZE: tl.constexpr, BEFORE: tl.constexpr,
             BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    # dx_i = g_i·d_i^-β − 2βc·a_i·Σ_{j: i in window(j)} g_j·a_j·d_j^(-β-1),
    # j running over i - AFTER .. i + BEFORE (AFTER = SIZE - 1 - BEFORE).
    pid = tl.program_id(0)
    n = (pid // tiles).to(tl.int64)
    p = (pid % tiles) * BLOCK_P + tl.arange(0, BLOCK_P)
    ch = tl.arange(0, BLOCK_C)
    pmask = p < HW
    xrow = x_ptr + n * sxn + p[:, None] * sxp
    drow = d_ptr + n * sdn + p[:, None] * sdp
    grow = g_ptr + n * sgn + p[:, None] * sgp
    t = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for o in tl.static_range(SIZE):
        j = ch + (o - (SIZE - 1 - BEFORE))
        m = pmask[:, None] & ((j >= 0) & (j < C))[None, :]
        aj = tl.load(xrow + j[None, :] * sxc, mask=m, other=0.0).to(tl.float32)
        gj = tl.load(grow + j[None, :] * sgc, mask=m, other=0.0).to(tl.float32)
        dj = tl.load(drow + j[None, :] * sdc, mask=m, other=1.0)
        t += gj * aj * tl.exp2((-beta - 1.0) * tl.log2(dj))
    mask = pmask[:, None] & (ch < C)[None, :]
    a = tl.load(xrow + ch[None, :] * sxc, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(grow + ch[None, :] * sgc, mask=mask, other=0.0).to(tl.float32)
    d = tl.load(drow + ch[None, :] * sdc, mask=mask, other=1.0)
    dx = g * tl.exp2(-beta * tl.log2(d)) - 2.0 * beta * c_alpha * a * t
    out = n * son + p[:, None] * sop + ch[None, :] * soc
    tl.store(dx_ptr + out, dx.to(dx_ptr.dtype.element_ty), mask=mask)
