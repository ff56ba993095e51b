"""The arithmetic a step runs in: bf16 autocast (opt-in, not the paper's fp32), whether a device
computes bf16 natively, and the main job's measured choice between the two.

bf16 is a speed-up only where the hardware multiplies bf16 natively: an Intel Xeon with AMX or
AVX512-BF16 ran the faithful net's step ~1.7x faster in bf16 than in fp32 (results/benchmarks.md),
while a 2-core AMD EPYC with AVX2 only emulates it: ~1 img/s in bf16 against 24.5 img/s
for the fp32 fast path. So the flags decide only where bf16 cannot pay; where they say it might,
the choice is measured.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from typing import Callable

import torch


def autocast(device: torch.device | str, precision: str):
    """bf16 autocast when asked for (opt-in, not the paper's arithmetic); else nothing."""
    if precision == "bf16":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def native_bf16(device: torch.device | str) -> bool:
    """Whether the device computes bf16 matrix products natively (CUDA: Ampere or later; CPU:
    AVX512-BF16 or AMX on x86, the bf16 extension on Arm). Elsewhere bf16 is emulated and
    slower than fp32, so precision=bf16 is a speed-up only where this is True."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        with open("/proc/cpuinfo") as f:
            flags = {w for line in f if line.startswith(("flags", "Features")) for w in line.split(":", 1)[1].split()}
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def choose_precision(device: torch.device | str, step: Callable[[str], Callable[[], object]], *,
                     timed: int = 2, margin: float = 1.1) -> tuple[str, str]:
    """fp32 or bf16 for training on `device`, and the reason, to be printed and recorded.

    Without native bf16 the answer is fp32 with no measurement (an emulated bf16 step takes tens
    of seconds on a CPU). With it, `step(precision)` builds a step function (a throwaway net on
    a synthetic batch) and bf16 is chosen only if its median step is `margin` times faster than
    fp32's, each after one untimed warm-up step (a bf16 warm-up over 3x fp32's step is taken as
    its time: an emulated bf16 step is not run again)."""
    device = torch.device(device)
    if not native_bf16(device):
        where = "this CPU's flags show no AVX512-BF16 or AMX" if device.type == "cpu" else "this GPU has no bf16 units"
        return "fp32", f"fp32: {where}, so bf16 would be emulated and slower (not measured)"
    def timed_step(run) -> float:
        start = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    seconds = {}
    for precision in ("fp32", "bf16"):
        run = step(precision)
        warm = timed_step(run)  # warm-up: kernel selection, first allocations
        if precision == "bf16" and warm > 3 * seconds["fp32"]:
            seconds[precision] = warm  # even with its one-off costs: slow enough to say so now
        else:
            seconds[precision] = statistics.median(timed_step(run) for _ in range(timed))
        del run
    speedup = seconds["fp32"] / seconds["bf16"]
    measured = (f"measured one step at fp32 {1000 * seconds['fp32']:.0f} ms, bf16 {1000 * seconds['bf16']:.0f} ms "
                f"({speedup:.2f}x)")
    if speedup >= margin:
        return "bf16", f"bf16: native bf16 and {measured}"
    return "fp32", f"fp32: native bf16, but {measured}, under the {margin:.1f}x that would pay for it"
