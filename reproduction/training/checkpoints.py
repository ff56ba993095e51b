"""Checkpoints: the files `torch.save` writes for a run (weights, optimiser, position in the
data, config), written atomically and read back with one clear error for anything else."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from reproduction.config import RunConfig, from_dict
from reproduction.errors import UserError, reading
from reproduction.files import atomic_write
from reproduction.model import AlexNet

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_ADVICE = "pass a checkpoint.pt written by reproduction.train (or reproduction.caffe)"


def save_checkpoint(path: Path, state: dict) -> None:
    """torch.save to a temporary file beside `path`, fsync, then rename over `path`: readers
    see the old checkpoint or the new one, never half of one."""
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: Path) -> dict:
    """A checkpoint written by this project: a dict with the model's weights and its config.
    Missing, truncated, garbage or foreign files (a bare state_dict such as torchvision's) are
    one UserError naming the file."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"no checkpoint at {path}; {CHECKPOINT_ADVICE}")
    with reading(path, "checkpoint", CHECKPOINT_ADVICE):
        state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict) \
            or not isinstance(state.get("config"), dict):
        kind = ("a bare state_dict (e.g. torchvision's or timm's), without this project's config"
                if isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())
                else f"a {type(state).__name__} without 'model' and 'config'")
        raise UserError(f"{path} is not a checkpoint of this project: it holds {kind}; {CHECKPOINT_ADVICE}")
    return state


def config_of(state: dict, path: Path | str = "the checkpoint") -> RunConfig:
    if state.get("net") == "cifar10":
        raise UserError(f"{path} holds one of CIFAR-10's four-layer nets (python -m reproduction.experiments), "
                        f"not AlexNet; {CHECKPOINT_ADVICE}")
    with reading(path, "checkpoint's config", CHECKPOINT_ADVICE):
        return from_dict(RunConfig, state["config"])


def model_from_checkpoint(state: dict, devices=None, path: Path | str = "the checkpoint") -> tuple[AlexNet, RunConfig]:
    config = config_of(state, path)
    try:
        model = AlexNet(config.model, devices=devices)
    except (ValueError, RuntimeError, AssertionError) as e:  # e.g. two devices for a one-tower net
        raise UserError(f"{path}: its net cannot be placed on {devices} ({e}); give one device per tower "
                        f"({config.model.towers})") from None
    with reading(path, "checkpoint (weights that fit its config)", CHECKPOINT_ADVICE):
        model.load_state_dict(state["model"])
    return model, config


def config_dict(config: RunConfig) -> dict:
    return dataclasses.asdict(config)
