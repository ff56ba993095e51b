"""The run folder: everything a run leaves behind, readable without this code.

    config.json     the resolved RunConfig, experiment name, command, git SHA and dirty flag,
                    python/torch/torchvision versions, devices, data set and seed
    metrics.jsonl   one JSON line per finished epoch
    checkpoint.pt   the latest state (model, optimiser, position in the data), written
                    atomically: a crash mid-write leaves the previous checkpoint intact
    final.json      centre-patch and ten-patch top-1/top-5 error of the final net
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch
import torchvision

from reproduction.config import RunConfig, from_dict
from reproduction.model import AlexNet

CHECKPOINT = "checkpoint.pt"


def git_state() -> dict:
    """The commit the code came from and whether the work tree differed from it."""
    repo = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    sha = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"sha": sha, "dirty": None if status is None else bool(status)}


def device_name(device: torch.device | str) -> str:
    """The GPU's name, or the CPU's model and visible core count."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = ""
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    return f"CPU {model or platform.processor() or platform.machine()} ({os.cpu_count()} cores visible)"


def environment(devices: Sequence[torch.device]) -> dict:
    names = [device_name(d) for d in devices]
    return {"python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "devices": [str(d) for d in devices],
            "device_names": names, "cpu_threads": torch.get_num_threads()}


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def write_json(path: Path, value: Any) -> None:
    """Write JSON atomically (temporary file in the same folder, then rename)."""
    _atomic_write(path, lambda f: f.write(json.dumps(value, indent=2).encode() + b"\n"))


def save_checkpoint(path: Path, state: dict) -> None:
    """torch.save to a temporary file beside `path`, fsync, then rename over `path`: readers
    see the old checkpoint or the new one, never half of one."""
    _atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"no checkpoint at {path}") from None


def model_from_checkpoint(state: dict, devices=None) -> tuple[AlexNet, RunConfig]:
    config = from_dict(RunConfig, state["config"])
    model = AlexNet(config.model, devices=devices)
    model.load_state_dict(state["model"])
    return model, config


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append_metrics(run_dir: Path, row: dict) -> None:
    with open(Path(run_dir) / "metrics.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def keep_metrics_before(run_dir: Path, epoch: int, *, rewrite: bool = True) -> list[dict]:
    """On resume: drop lines of epochs the checkpoint has not finished (written after it).
    rewrite=False only reads them (replicas other than rank 0 never write the run folder)."""
    rows = [r for r in read_metrics(run_dir) if r["epoch"] < epoch]
    if not rewrite:
        return rows
    _atomic_write(Path(run_dir) / "metrics.jsonl",
                  lambda f: f.write("".join(json.dumps(r) + "\n" for r in rows).encode()))
    return rows


def config_dict(config: RunConfig) -> dict:
    return dataclasses.asdict(config)


def _atomic_write(path: Path, write) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
