"""The network's hyperparameters: one frozen dataclass whose defaults are the paper's values.

Ablations are `dataclasses.replace(PAPER, ...)` diffs; command-line overrides go through
`override`, which rejects unknown keys and wrongly typed values instead of guessing.
"""

from __future__ import annotations

import ast
import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping


@dataclass(frozen=True)
class AlexNetConfig:
    num_classes: int = 1000    # §2: the 1000 ILSVRC classes (the width of fc8)
    activation: str = "relu"   # §3.1: "relu" (the paper's net) | "tanh" (Fig. 1's comparison)
    lrn: str = "code"          # §3.3: "code" = cuda-convnet2's α/n per squared term | "paper" = α as printed | "none"
    lrn_size: int = 5          # §3.3: n, the number of adjacent kernel maps in the window
    lrn_alpha: float = 1e-4    # §3.3: α
    lrn_beta: float = 0.75     # §3.3: β
    lrn_k: float = 2.0         # §3.3: k
    pool_kernel: int = 3       # §3.4: z = 3 with s = 2 (overlapping); 2 = the non-overlapping ablation
    towers: int = 2            # §3.2: two towers (the two GPUs); 1 = the one-GPU net of half the kernels
    dropout: float = 0.5       # §4.2: drop probability on the outputs of fc6 and fc7
    init_std: float = 0.01     # §5: every weight ~ N(0, 0.01)
    init_bias: float = 1.0     # §5: the bias of conv2, conv4, conv5, fc6, fc7 (all others 0)

    def __post_init__(self) -> None:
        _check_types(self)
        _require(self, "num_classes", self.num_classes >= 1, "an integer >= 1")
        _require(self, "activation", self.activation in ("relu", "tanh"), "'relu' or 'tanh'")
        _require(self, "lrn", self.lrn in ("code", "paper", "none"), "'code', 'paper' or 'none'")
        _require(self, "lrn_size", self.lrn_size >= 1 and self.lrn_size % 2 == 1,
                 "an odd integer >= 1 (the window is centred on the map)")
        _require(self, "lrn_alpha", math.isfinite(self.lrn_alpha) and self.lrn_alpha >= 0, "a number >= 0")
        _require(self, "lrn_beta", math.isfinite(self.lrn_beta) and self.lrn_beta >= 0, "a number >= 0")
        _require(self, "lrn_k", math.isfinite(self.lrn_k) and self.lrn_k > 0, "a number > 0")
        _require(self, "pool_kernel", self.pool_kernel in (2, 3),
                 "3 (overlapping, the paper) or 2 (the §3.4 ablation); the stride is 2 in both")
        _require(self, "towers", self.towers in (1, 2), "2 (the paper) or 1 (the §3.2 comparison net)")
        _require(self, "dropout", 0 <= self.dropout < 1, "a probability in [0, 1)")
        _require(self, "init_std", math.isfinite(self.init_std) and self.init_std > 0, "a number > 0")
        _require(self, "init_bias", math.isfinite(self.init_bias), "a finite number")



def override(config: Any, items: Mapping[str, Any] | Iterable[str]) -> Any:
    """Return `config` with fields replaced, from a mapping or from "key=value" strings.

    Values given as strings are read with `ast.literal_eval` (so `dropout=0.25`, `towers=1`),
    and kept as plain strings when they are not Python literals (so `activation=tanh` works).
    Unknown keys and wrongly typed values raise ValueError naming what is allowed.
    """
    if not isinstance(items, Mapping):
        pairs = {}
        for item in items:
            key, sep, text = item.partition("=")
            if not sep or not key.strip():
                raise ValueError(f"override {item!r} is not of the form key=value")
            pairs[key.strip()] = _parse_value(text.strip())
        items = pairs
    names = [f.name for f in dataclasses.fields(config)]
    unknown = sorted(set(items) - set(names))
    if unknown:
        raise ValueError(f"unknown {type(config).__name__} key(s) {', '.join(unknown)}; "
                         f"allowed keys: {', '.join(names)}")
    return dataclasses.replace(config, **items)


def from_dict(cls: type, values: Mapping[str, Any]) -> Any:
    """Rebuild a config from `dataclasses.asdict` output (e.g. a run's config.json), strictly."""
    return override(cls(), values)


def _parse_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _check_types(config: Any) -> None:
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        expected = {"int": int, "float": float, "str": str, "bool": bool}[f.type]
        ok = isinstance(value, expected) and not (expected is int and isinstance(value, bool))
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            object.__setattr__(config, f.name, float(value))  # 2 for a float field means 2.0
            ok = True
        if not ok:
            raise ValueError(f"{type(config).__name__}.{f.name} must be of type {f.type}, "
                             f"got {value!r} ({type(value).__name__})")


def _require(config: Any, name: str, ok: bool, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{type(config).__name__}.{name} = {getattr(config, name)!r} is not allowed; "
                         f"it must be {allowed}")


PAPER = AlexNetConfig()  # the paper's net; ablations are dataclasses.replace(PAPER, ...)
