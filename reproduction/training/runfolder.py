"""The run folder: everything a run leaves behind, readable without this code, and the one
place that writes it.

    config.json     the resolved RunConfig, experiment name, command, git SHA and dirty flag,
                    python/torch/torchvision versions, devices, data set (with its identity:
                    dataset, counts and a hash of its index) and seed
    metrics.jsonl   one JSON line per finished epoch (finite numbers only: always valid JSON)
    checkpoint.pt   the latest state (model, optimiser, position in the data), written
                    atomically: a crash mid-write leaves the previous checkpoint intact
    final.json      centre-patch and ten-patch top-1/top-5 error of the final net
    eval-*.json     what `python -m reproduction.evaluate` measured later (never final.json)

A folder belongs to one run. `RunFolder` refuses a fresh run into a folder that holds any run
file, holds an exclusive lock (flock on the folder itself) while a process writes it, so a
second trainer on the same --out refuses, and removes temporaries a killed writer left. A
resume checks everything before it writes anything; the checkpoint is the authority over
metrics.jsonl (lines after it, or a line torn by a kill, are dropped, and the drop is said).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Sequence

import torch
import torchvision

from reproduction.config import RunConfig
from reproduction.errors import UserError, reading
from reproduction.training.checkpoints import CHECKPOINT, config_dict, load_checkpoint, save_checkpoint
from reproduction.files import atomic_write, dumps, finite, lock_folder, read_json, read_json_file, write_json

BEST = "best.pt"  # the weights of the epoch with the lowest centre-patch val top-1 error (loop.py)
RUN_FILES = ("config.json", "metrics.jsonl", "final.json", CHECKPOINT, BEST)
SELECTED_BY_VAL = ("best.pt is the epoch with the lowest centre-patch val top-1 error; when val is also the "
                   "set its numbers are reported on, choosing by it is optimistic (so are the paper's: its "
                   "learning rate was divided when the val error stopped improving, and Table 2 reports "
                   "ILSVRC-2012 val)")


def git_state() -> dict:
    """The commit the code came from and whether the work tree differed from it."""
    repo = Path(__file__).resolve().parents[2]

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



# ------------------------------------------------------------------- data a run reads ---------

def open_data(data_dir: Path, splits: Sequence[str] = ("train", "val")):
    """The prepared set's splits and stats.npz, checked: a missing, unfinished or damaged set
    and a split with no images are one UserError naming the file (before any step is taken)."""
    from reproduction.data import PackedSet, load_stats
    data_dir = Path(data_dir)
    advice = "prepare it with python -m data_prep (or pass another --data)"
    if not data_dir.is_dir():
        raise UserError(f"{data_dir}: no such folder (--data); {advice}")
    sets = []
    for split in splits:
        with reading(data_dir / "manifest.json", f"prepared set ({split} split)", advice):
            s = PackedSet(data_dir, split)
        if len(s) == 0:
            raise UserError(f"{data_dir}: the {split} split holds no images ({split}.index.npy is empty); "
                            f"re-prepare the set with images in {split}")
        sets.append(s)
    with reading(data_dir / "stats.npz", "stats file (mean and RGB eigen-decomposition)", advice):
        stats = load_stats(data_dir)
    return (*sets, stats)


def data_identity(data_dir: Path, train_set, val_set) -> dict:
    """What config.json records of the data: a resume must see the same set (a hash of both
    indices: offsets, lengths and labels), wherever it now lies."""
    digest = hashlib.sha256()
    for split in ("train", "val"):
        digest.update((Path(data_dir) / f"{split}.index.npy").read_bytes())
    return {"path": str(data_dir), "dataset": train_set.manifest.get("dataset"),
            "train_images": len(train_set), "val_images": len(val_set), "classes": len(train_set.classes),
            "index_sha256": digest.hexdigest()}


def locate_data(recorded: str, run_folder: Path) -> Path:
    """The data folder a run's config.json names. The main job records it relative to the
    checkout (data/...), so from another working directory it is looked for below the run
    folder's ancestors too; returned as recorded where it is found nowhere."""
    path = Path(recorded)
    if path.is_absolute() or path.is_dir():
        return path
    for ancestor in Path(run_folder).resolve().parents:
        if (ancestor / path).is_dir():
            return ancestor / path
    return path


def check_same_data(recorded: dict, now: dict, config_json: Path) -> None:
    keys = [k for k in ("dataset", "classes", "train_images", "val_images", "test_images", "index_sha256") if k in recorded]
    differ = [f"{k} {recorded[k]!r} -> {now[k]!r}" for k in keys if recorded[k] != now[k]]
    if differ:
        raise UserError(f"--data {now['path']} is not the data set this run trained on ({config_json} records "
                        f"{recorded.get('path')}: {'; '.join(differ)}); resume with the run's own data")


# ------------------------------------------------------------------- metrics ------------------

def read_metrics(run_dir: Path, *, torn: list | None = None) -> list[dict]:
    """The epoch lines. A last line that does not parse (a kill mid-append) is left out and
    reported in `torn`; a bad line elsewhere is an error naming the file and line."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    with reading(path, "metrics file", "it should hold one JSON object per line"):
        lines = [(i, line) for i, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    rows = []
    for n, (i, line) in enumerate(lines):
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("epoch"), int):
                raise ValueError("not an epoch line")
        except ValueError:
            if n == len(lines) - 1 and torn is not None:
                torn.append(i)
                break
            raise UserError(f"{path}, line {i}: not a JSON epoch line ({line[:60]!r}); the file is damaged: "
                            "delete that line (the checkpoint holds the run's state)") from None
        rows.append(row)
    return rows


def append_metrics(run_dir: Path, row: dict) -> None:
    line = dumps(row)  # refuses NaN/inf before anything is written
    with open(Path(run_dir) / "metrics.jsonl", "a") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


def keep_metrics_before(run_dir: Path, epoch: int, *, rewrite: bool = True) -> list[dict]:
    """On resume: drop lines of epochs the checkpoint has not finished (written after it).
    rewrite=False only reads them (replicas other than rank 0 never write the run folder)."""
    rows = [r for r in read_metrics(run_dir, torn=[]) if r["epoch"] < epoch]
    if not rewrite:
        return rows
    atomic_write(Path(run_dir) / "metrics.jsonl",
                  lambda f: f.write("".join(dumps(r) + "\n" for r in rows).encode()))
    return rows


# ------------------------------------------------------------------- the folder ---------------

class RunFolder:
    """One run's folder. `writer=False` (a replica other than rank 0) only reads: no lock, no writes.

        folder = RunFolder(out)
        with folder:                 # released on exit, however the run ends
            folder.start(meta)       # fresh: refuses a folder holding run files, locks, writes config.json
            # or: plan = folder.resume_state(); ...check...; folder.resumed(meta, epoch)
    """

    def __init__(self, path: Path, *, writer: bool = True) -> None:
        self.path, self.writer = Path(path), writer
        self._fd: int | None = None
        self.notes: list[str] = []  # what was repaired, for the log

    def __enter__(self) -> "RunFolder":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT

    def held(self) -> list[str]:
        return [n for n in RUN_FILES if (self.path / n).exists()]

    def unstarted(self) -> bool:
        """Holds config.json but no checkpoint: a run stopped before its first checkpoint, with
        nothing to resume from (a metrics line without a checkpoint is of a lost epoch)."""
        held = set(self.held())
        return "config.json" in held and not held & {CHECKPOINT, BEST, "final.json"}

    def check_fresh(self, *, restart: bool = False) -> None:
        """A fresh run needs a folder that holds no run file (nothing is written here). restart:
        a folder whose run stopped before its first checkpoint may start again (its caller has
        checked that config.json holds the same config)."""
        if self.path.exists() and not self.path.is_dir():
            raise UserError(f"--out {self.path} is a file, not a folder; give a folder for the run")
        held = [] if restart and self.unstarted() else self.held()
        if held:
            raise UserError(f"{self.path} already holds a run ({', '.join(held)}); continue it with "
                            f"--resume, or give another --out")

    def busy(self) -> bool:
        """Whether another process holds the folder's lock (is training into it now)."""
        try:
            fd = lock_folder(self.path)
        except OSError:
            return False
        if fd is None:
            return True
        os.close(fd)  # drops the lock taken just now
        return False

    def lock(self) -> None:
        """Exclusive flock on the folder itself; then clean up what a killed writer left (only
        the lock holder may: another writer's temporaries are live)."""
        if not self.writer or self._fd is not None:
            return
        try:
            fd = lock_folder(self.path)
        except OSError as e:
            raise UserError(f"{self.path}: cannot open the run folder ({e.strerror or e})") from None
        if fd is None:
            raise UserError(f"{self.path} is being written by another process (it holds the folder's lock): "
                            "wait for it to end, or give another --out")
        self._fd = fd
        for stale in self.path.glob(".*.tmp"):  # e.g. .checkpoint.pt.abc123.tmp from a SIGKILL mid-write
            stale.unlink(missing_ok=True)
            self.notes.append(f"removed {stale.name}, a temporary file left by a killed writer")

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def create(self, *, restart: bool = False) -> None:
        """Make the folder and lock it; refuses one that holds run files (but see check_fresh's
        restart). A replica that does not write checked with check_fresh before rank 0 began
        writing: nothing to do here."""
        if self.writer:
            self.check_fresh(restart=restart)
            try:
                self.path.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise UserError(f"--out {self.path}: cannot create the run folder ({e.strerror or e}); "
                                "choose another path") from None
            if not os.access(self.path, os.W_OK | os.X_OK):
                raise UserError(f"--out {self.path}: the folder is not writable; choose another path")
            self.lock()
            self.check_fresh(restart=restart)  # a run that started between the first check and the lock
            if restart:
                (self.path / "metrics.jsonl").unlink(missing_ok=True)

    def start(self, meta: dict) -> None:
        if self.writer:
            write_json(self.path / "config.json", meta)

    def open_for_resume(self) -> tuple[dict, dict, list[dict]]:
        """Lock, then read (never write) the checkpoint, config.json and metrics.jsonl."""
        if not self.path.is_dir():
            raise UserError(f"--resume: {self.path} is not a run folder (no such folder)")
        if not self.checkpoint.exists():
            raise UserError(f"--resume: {self.path} holds no {CHECKPOINT} "
                            f"({', '.join(self.held()) or 'no run files'}); start a fresh run in another --out")
        if self.writer and not all(os.access(p, os.W_OK) for p in (self.path, self.path / "config.json", self.checkpoint)
                                   if p.exists()):  # refused now, not at the first checkpoint an epoch later
            raise UserError(f"--resume: {self.path} (or its config.json or {CHECKPOINT}) is not writable; fix its "
                            "permissions, or copy the folder somewhere writable and resume there")
        self.lock()
        state = load_checkpoint(self.checkpoint)
        meta = read_json_file(self.path / "config.json", "run record (config.json)",
                              "the run folder is damaged; start a fresh run in another --out")
        if not isinstance(meta, dict) or not isinstance(meta.get("data"), dict) or "experiment" not in meta:
            raise UserError(f"{self.path / 'config.json'} is not this project's run record (no 'experiment' or "
                            "'data'); start a fresh run in another --out")
        torn: list[int] = []
        rows = read_metrics(self.path, torn=torn)
        if torn:
            self.notes.append(f"dropped the torn last line ({torn[0]}) of {self.path / 'metrics.jsonl'} "
                              "(a kill mid-append; the checkpoint is the authority)")
        if not isinstance(state.get("position"), dict):
            raise UserError(f"{self.checkpoint} holds no training position (imported weights?); "
                            "fine-tune from it with --init-from instead of --resume")
        return state, meta, rows

    def check_resume(self, meta: dict, saved_batch: int, batch: int, position: dict, data: dict) -> None:
        """What a resume may not change: the data set, and the batch size mid-epoch (the rest of
        the epoch's batches would revisit images)."""
        check_same_data(meta["data"], data, self.path / "config.json")
        if saved_batch != batch and position["batch"] != 0:
            raise UserError(f"--set batch_size={batch}: {self.checkpoint} is mid-epoch (epoch {position['epoch'] + 1}, "
                            f"batch {position['batch']}) at batch_size={saved_batch}, and the rest of the epoch would "
                            "revisit images; resume with its batch_size and change it once the checkpoint is at "
                            "an epoch boundary (batch 0)")

    def resumed(self, meta: dict, config: dict, epoch: int, entry: dict) -> list[dict]:
        """After every check passed: the metrics before the checkpoint's epoch (the checkpoint
        is the authority), and config.json with the resumed config and this resume's record."""
        history = keep_metrics_before(self.path, epoch, rewrite=self.writer)
        meta.setdefault("resumed", []).append(entry)
        meta["config"] = config
        if self.writer:
            write_json(self.path / "config.json", meta)
        return history

    def append(self, row: dict) -> None:
        if self.writer:
            append_metrics(self.path, row)

    def save(self, state: dict) -> None:
        if self.writer:
            save_checkpoint(self.checkpoint, state)

    def save_as(self, name: str, state: dict) -> None:
        if self.writer:
            save_checkpoint(self.path / name, state)

    def finish(self, final: dict) -> None:
        if self.writer:
            write_json(self.path / "final.json", final)


# A run folder (one holding config.json or checkpoint.pt) holds files that each belong to one
# command; a command may replace its own, never the training run's or another command's.
FIG3 = "fig3-conv1"  # Fig. 3 picture and record that `python -m reproduction` writes into its run folder
RUN_RECORDS = {
    "train": ("the training run", RUN_FILES),
    "filters": ("the Fig. 3 record (visualize filters)", (f"{FIG3}.png", f"{FIG3}.json")),
    "evaluate": ("an evaluation (evaluate)", ("eval-*.json", "eval-*.png")),
}


def refuse_run_file(path: Path, option: str, command: str) -> None:
    """UserError if `path` is in a run folder and is a file that a command other than `command`
    (a key of RUN_RECORDS, or any other name) writes there."""
    name, folder = Path(path).name, Path(path).parent
    if not any((folder / marker).exists() for marker in ("config.json", CHECKPOINT)):
        return
    for owner, (what, patterns) in RUN_RECORDS.items():
        if owner != command and any(fnmatch.fnmatchcase(name, p) for p in patterns):
            raise UserError(f"{option} {path}: {name} in this run folder belongs to {what} and is never "
                            "replaced; write to another file name")


def run_record(experiment: str, config: RunConfig, *, command: Sequence[str], devices: Sequence[torch.device],
               data: dict, distributed: dict, batch_scaling: dict | None, init_from: Path | None) -> dict:
    """config.json of a fresh run: what ran, from which code, on what, with which data."""
    t = config.train
    return {"experiment": experiment, "config": config_dict(config), "command": list(command),
            "git": git_state(), "environment": environment(devices), "data": data, "seed": t.seed,
            "precision": {"precision": t.precision, "channels_last": t.channels_last, "compile": t.compile,
                          "deterministic": t.deterministic},
            "distributed": distributed, "batch_scaling": batch_scaling,
            "init_from": None if init_from is None else str(init_from)}


def evaluation_path(checkpoint: Path, split: str, output: Path | None) -> Path:
    """Where `evaluate` writes: --output, else eval-<split>.json beside the checkpoint; never a
    run file (final.json belongs to the training run)."""
    path = Path(output) if output is not None else Path(checkpoint).parent / f"eval-{split}.json"
    if path.name in RUN_FILES:
        raise UserError(f"--output {path}: {path.name} belongs to the training run and is never replaced; "
                        f"write the evaluation elsewhere (default: eval-{split}.json)")
    if path.is_dir():
        raise UserError(f"--output {path} is a folder; give a file name such as eval-{split}.json")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--output {path}: cannot create its folder ({e.strerror or e}); choose another path") from None
    return path


def read_run(folder: Path) -> tuple[dict | None, str | None]:
    """A finished training run for the report, or (None, why it is left out)."""
    folder = Path(folder)
    try:
        meta, final = read_json(folder / "config.json"), read_json(folder / "final.json")
        metrics = read_metrics(folder, torn=[])
    except (OSError, ValueError, UserError) as e:
        return None, f"unreadable ({str(e).splitlines()[0][:120]})"
    if not isinstance(meta, dict) or not isinstance(final, dict):
        return None, "config.json or final.json is not a JSON object"
    missing = [k for k in ("experiment", "data", "config") if k not in meta]
    missing += [f"data.{k}" for k in ("classes", "train_images", "val_images")
                if not isinstance(meta.get("data"), dict) or k not in meta["data"]]
    missing += [k for k in ("centre", "ten_patch", "epochs") if k not in final]
    if missing:
        return None, f"not a finished training run (no {', '.join(missing)})"
    if not finite(final) or not all(map(finite, metrics)):
        return None, "holds a non-finite number"
    return {"folder": folder, "meta": meta, "metrics": metrics, "final": final}, None
