"""The small arithmetic that the CIFAR-10 experiments (cifar.py) and the report (report.py)
both apply to recorded runs: mean ± sd over seeds, the training-error curve and when it
crosses a threshold (Fig. 1), and the gap between the two towers' conv1 scores (Fig. 3).

Plain Python on plain numbers, below both of them: the report reads these off JSON records
without importing torch or the training code, and cifar.py writes them with the same functions.
"""

from __future__ import annotations

import statistics
from typing import Sequence


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample sd (nan for one value: no spread to show)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else float("nan"))


def sd_to_json(sd: float) -> float | None:
    """An sd as a JSON summary holds it: null for one seed's nan (JSON has no NaN)."""
    return None if sd != sd else sd


def sd_from_json(sd: float | None) -> float:
    """A summary's sd back as a number: nan for null (one seed, no spread)."""
    return float("nan") if sd is None else sd


def error_curve(rows: Sequence[dict]) -> list[tuple[float, float]]:
    """(epochs trained, training error) points: the error over each fifth of an epoch, placed at
    the end of that fifth (so the curve starts at (0.2, ·))."""
    points = []
    for row in rows:
        parts = row.get("train_error_parts") or [row["train_error"]]
        for i, err in enumerate(parts):
            points.append((row["epoch"] + (i + 1) / len(parts), err))
    return points


def epochs_to(points: Sequence[tuple[float, float]], threshold: float) -> float | None:
    """The first time the training-error curve reaches `threshold`, linearly interpolated
    between the two points around the crossing; None if it never does."""
    previous = (0.0, 0.9)  # before any training: chance on 10 classes
    for x, err in points:
        if err <= threshold:
            (x0, e0) = previous
            if e0 <= threshold or e0 == err:
                return x
            return x0 + (e0 - threshold) / (e0 - err) * (x - x0)
        previous = (x, err)
    return None


def tower_gap(per_tower: Sequence[dict]) -> tuple[float, float]:
    """Tower B's mean colour specificity minus tower A's, and that difference's standard error
    √(sd_A²/n_A + sd_B²/n_B), from visualize's per-tower records."""
    a, b = per_tower
    return b["mean"] - a["mean"], (a["sd"] ** 2 / a["n"] + b["sd"] ** 2 / b["n"]) ** 0.5


def towers_specialise(per_tower: Sequence[dict]) -> bool:
    """§6.1: one tower's kernels are largely colour-agnostic, the other's colour-specific, "modulo
    a renumbering of the GPUs": a gap of either sign counts when it is beyond 2 standard errors."""
    diff, se = tower_gap(per_tower)
    return abs(diff) > 2 * se
