"""§3.3's local response normalisation as one registered operator, `reproduction::lrn`, with a
fast implementation on each device. A performance path (`AlexNet.set_fused_lrn(True)`,
TrainConfig.fused_lrn), not in the paper: it computes what `F.local_response_norm` computes
(the oracle in the tests), windows clipped at the edges of each of `groups` channel groups
(the towers, §3.2):

    b_i = a_i / d_i^β,   d_i = k + (α/size)·Σ_{j=i-size//2}^{i+(size-1)//2} a_j²

- CPU: `kernels.c`'s `lrn`, one pass over the tensor each way, fp32 arithmetic for bf16
  inputs, the backward recomputing d from the row instead of saving it (`kernels.py` builds it
  on first use; without a C compiler the operator falls back to plain PyTorch, the same
  formula, slower, and says so once).
- CUDA: the Triton kernels of `lrn_triton.py`.

Why an operator: `torch.compile` sees it as one node (its shape function is registered), so the
compiled step neither breaks its graph at the LRN nor traces into a kernel, and autograd calls
the registered backward operator.
"""

from __future__ import annotations

import ctypes
import os

import torch
import torch.nn.functional as F
from torch import Tensor

from reproduction.ops import kernels

_DTYPES = {torch.float32: 0, torch.bfloat16: 1}


def local_response_norm(x: Tensor, size: int, alpha: float, beta: float, k: float, groups: int = 1) -> Tensor:
    """`F.local_response_norm(x, size, alpha, beta, k)` on each of `groups` equal channel
    groups of the N×C×H×W tensor x, as one operator (differentiable once)."""
    if x.dim() != 4:
        raise ValueError(f"LRN takes an N×C×H×W tensor, got shape {tuple(x.shape)}")
    if size < 1 or groups < 1 or x.shape[1] % groups:
        raise ValueError(f"LRN needs size >= 1 and {x.shape[1]} channels in {groups} equal groups")
    return torch.ops.reproduction.lrn(x, int(size), float(alpha), float(beta), float(k), int(groups))


# --------------------------------------------------------------------------- the operators

@torch.library.custom_op("reproduction::lrn", mutates_args=())
def _lrn(x: Tensor, size: int, alpha: float, beta: float, k: float, groups: int) -> Tensor:
    return _cpu(x, None, size, alpha, beta, k, groups)


@torch.library.custom_op("reproduction::lrn_backward", mutates_args=())
def _lrn_backward(x: Tensor, grad: Tensor, size: int, alpha: float, beta: float, k: float,
                  groups: int) -> Tensor:
    return _cpu(x, grad, size, alpha, beta, k, groups)


@_lrn.register_fake
def _(x, size, alpha, beta, k, groups):
    return torch.empty_like(x)


@_lrn_backward.register_fake
def _(x, grad, size, alpha, beta, k, groups):
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output):
    x, *ctx.args = inputs
    ctx.save_for_backward(x)


def _backward(ctx, grad):
    (x,) = ctx.saved_tensors
    return torch.ops.reproduction.lrn_backward(x, grad, *ctx.args), None, None, None, None, None


_lrn.register_autograd(_backward, setup_context=_setup_context)


@_lrn.register_kernel("cuda")
def _triton(x, size, alpha, beta, k, groups):
    from reproduction.ops import lrn_triton
    parts = [lrn_triton._forward(p, size, alpha, beta, k, keep_d=False)[0] for p in x.chunk(groups, 1)]
    return _like(x, parts)


@_lrn_backward.register_kernel("cuda")
def _triton_backward(x, grad, size, alpha, beta, k, groups):
    from reproduction.ops import lrn_triton
    parts = []
    for xp, gp in zip(x.chunk(groups, 1), grad.chunk(groups, 1)):
        _, d = lrn_triton._forward(xp, size, alpha, beta, k, keep_d=True)  # d again: one more pass, no saved tensor
        parts.append(lrn_triton._backward(xp, d, gp, size, alpha, beta))
    return _like(x, parts)


def _like(x: Tensor, parts: list[Tensor]) -> Tensor:
    """The groups' results in one tensor with the strides `empty_like(x)` has (what the
    registered shape function promises torch.compile)."""
    out = torch.empty_like(x)
    if len(parts) == 1 and parts[0].stride() == out.stride():
        return parts[0]
    out.copy_(parts[0] if len(parts) == 1 else torch.cat(parts, dim=1))
    return out


# ------------------------------------------------------------------------- the CPU kernel

def _cpu(x: Tensor, grad: Tensor | None, size: int, alpha: float, beta: float, k: float, groups: int) -> Tensor:
    if os.environ.get("TRITON_INTERPRET") == "1":  # the tests of the CUDA kernels, run on the CPU
        return (_triton(x, size, alpha, beta, k, groups) if grad is None
                else _triton_backward(x, grad, size, alpha, beta, k, groups))
    fits = x.device.type == "cpu" and x.dtype in _DTYPES and (grad is None or grad.dtype == x.dtype)
    lib = kernels.library() if fits else None
    if lib is None:
        return reference(x, grad, size, alpha, beta, k, groups)
    out = _rows(torch.empty_like(x))  # the strides the registered shape function promises
    x = _rows(x)
    if grad is not None:
        grad = _rows(grad)
    if x.numel():
        n, c, h, w = x.shape
        strides = [_strides(t) for t in (x, grad, out) if t is not None]
        failed = lib.lrn(ctypes.c_void_p(x.data_ptr()), ctypes.c_void_p(0 if grad is None else grad.data_ptr()),
                         ctypes.c_void_p(out.data_ptr()), _DTYPES[x.dtype], n, c, h * w,
                         strides[0], strides[1] if grad is not None else None, strides[-1],
                         size, groups, alpha / size, beta, k, int(grad is not None), torch.get_num_threads())
        if failed:
            raise MemoryError("the CPU LRN kernel could not allocate its row buffers")
    return out


def _rows(t: Tensor) -> Tensor:
    """t, or a copy whose pixels p = h·W + w sit at a uniform stride (the kernel's addressing)."""
    n, c, h, w = t.shape
    sp = t.stride(3) if w > 1 else t.stride(2) if h > 1 else 1
    if (w > 1 and t.stride(3) != sp) or (h > 1 and t.stride(2) != w * sp):
        return t.contiguous(memory_format=torch.channels_last)
    return t


def _strides(t: Tensor):
    n, c, h, w = t.shape
    sp = t.stride(3) if w > 1 else t.stride(2) if h > 1 else 1
    return (ctypes.c_int64 * 3)(t.stride(0), t.stride(1), sp)


def reference(x: Tensor, grad: Tensor | None, size: int, alpha: float, beta: float, k: float,
              groups: int = 1) -> Tensor:
    """The operator in plain PyTorch: the forward, or (grad given) the backward in closed form,
    the formulas kernels.c computes, per group. fp32 arithmetic (fp64 for fp64 inputs). The
    fallback where the kernel cannot be built or does not take the dtype, and runs inside the
    operator, where autograd is off: hence the backward by formula, not by autograd.

        d_i = k + c·Σ_{j in W(i)} a_j²,  W(i) = [i − size//2, i + (size−1)//2],  c = α/size
        b_i = a_i·d_i^-β
        ∂a_i = g_i·d_i^-β − 2βc·a_i·Σ_{j: i in W(j)} g_j·a_j·d_j^(-β-1)
    """
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    lo, hi, c = size // 2, (size - 1) // 2, alpha / size
    xs = x.detach().to(dtype).chunk(groups, 1)
    gs = grad.detach().to(dtype).chunk(groups, 1) if grad is not None else [None] * groups
    parts = []
    for a, g in zip(xs, gs):
        d = k + c * _window_sum(a * a, lo, hi)
        r = d.pow(-beta)
        parts.append(a * r if g is None else g * r - (2 * beta * c) * a * _window_sum(g * a * r / d, hi, lo))
    out = torch.empty_like(x)
    out.copy_(torch.cat(parts, dim=1))
    return out


def _window_sum(v: Tensor, lo: int, hi: int) -> Tensor:
    """out[:, i] = Σ_{j=i−lo}^{i+hi} v[:, j] over the channels, clipped at the edges."""
    m = v.shape[1]
    padded = F.pad(v, (0, 0, 0, 0, lo, hi))
    out = padded[:, :m].clone()
    for o in range(1, lo + hi + 1):
        out += padded[:, o:o + m]
    return out


def kernel_available() -> bool:
    return kernels.library() is not None
