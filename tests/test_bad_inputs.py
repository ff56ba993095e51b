"""Bad inputs, interrupts and faults: every case gives a clear error or a counted,
listed skip, and nothing a failed command was pointed at changes.

Each row of CASES runs a command's real entry point in-process (its main(argv)) and asserts
the exit status, that stderr names the file (or the option) at fault, that no traceback is
printed, and that the watched files (run folder, prepared set, source) are as they were.
The kill tests at the end run `python -m reproduction.train` as a subprocess.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image

from data_prep.__main__ import main as prep_main
from packing import colour_set, pack_set
from reproduction.training import checkpoints
from reproduction.bench import main as bench_main
from reproduction.caffe import main as caffe_main
from reproduction.evaluate import main as evaluate_main
from reproduction.experiments import main as experiments_main
from reproduction.model import main as model_main
from reproduction.predict import main as predict_main
from reproduction.report import find_runs
from reproduction.report import main as report_main
from reproduction.train import main as train_main
from reproduction.visualize import main as visualize_main

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities")
REPO = Path(__file__).resolve().parents[1]
TINY_SET = ["--devices", "cpu", "--workers", "0"]
RECIPE = ["batch_size=4", "epochs=1", "seed=3", "stuck_steps=10000"]


# ------------------------------------------------------------------ the world the cases share --

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny prepared set (16 train / 4 val images, 4 classes), a second one of the same shape
    (other images), a finished one-epoch run on the first, and a small image-folder source."""
    root = tmp_path_factory.mktemp("world")
    data = colour_set(root / "data", train=16, val=4, seed=0)
    other = colour_set(root / "other", train=16, val=4, seed=1)
    run = root / "run"
    assert train_main(["--data", str(data), "--out", str(run), *TINY_SET, "--set", *RECIPE]) == 0
    source = root / "source"
    rng = np.random.default_rng(0)
    for split, n in (("train", 2), ("val", 1)):
        for c in ("cat", "dog"):
            (source / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (40, 48, 3), np.uint8)).save(source / split / c / f"{i}.png")
    return {"root": root, "data": data, "other": other, "run": run, "source": source}


def copy_run(world, dest: Path, *, checkpoint: bool = True) -> Path:
    """The finished run's folder; the checkpoint is hard-linked (an atomic rewrite would give
    the copy a new inode, which the fingerprint sees, and never touch the original)."""
    dest.mkdir(parents=True)
    for f in world["run"].iterdir():
        if f.name == checkpoints.CHECKPOINT:
            if checkpoint:
                os.link(f, dest / f.name)
        elif f.is_file():
            shutil.copy2(f, dest / f.name)
    return dest


def fingerprint(*paths: Path) -> dict:
    """Every file under `paths`: small ones by content, large ones by size, mtime and inode."""
    seen = {}
    for root in paths:
        files = [root] if root.is_file() or root.is_symlink() else sorted(p for p in root.rglob("*"))
        for p in files:
            if p.is_symlink() or not p.is_file():
                seen[str(p)] = "dir" if p.is_dir() else "other"
                continue
            st = p.stat()
            seen[str(p)] = (hashlib.sha256(p.read_bytes()).hexdigest() if st.st_size < 1 << 20
                            else (st.st_size, st.st_mtime_ns, st.st_ino))
    return seen


def torch_file(path: Path, obj) -> Path:
    torch.save(obj, path)
    return path


def garbage(path: Path, data: bytes = b"\x00not a checkpoint\xff" * 40) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def truncated(src: Path, dest: Path, keep: float = 0.5) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(src, "rb") as f:
        dest.write_bytes(f.read(int(src.stat().st_size * keep)))
    return dest


def bare_state_dict(path: Path) -> Path:
    """What torchvision's alexnet weights are: a state_dict, no config."""
    return torch_file(path, {"features.0.weight": torch.zeros(2, 3, 3, 3), "classifier.6.bias": torch.zeros(2)})


def prepared_copy(world, dest: Path) -> Path:
    shutil.copytree(world["data"], dest)
    return dest


def edit_json(path: Path, change: Callable[[dict], dict | None]) -> None:
    value = json.loads(path.read_text())
    value = change(value) or value
    path.write_text(json.dumps(value))


def targz(path: Path, members: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def jpeg(seed: int, size: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


# ------------------------------------------------------------------ the table ------------------

@dataclass
class Case:
    argv: list[str]
    needle: str                      # what stderr must contain: the file (or option) at fault
    watch: list[Path] = field(default_factory=list)  # must be unchanged afterwards
    code: int = 2


def run_folder_cases():
    def fresh_into_text_run(w, t):
        out = copy_run(w, t / "run", checkpoint=False)  # what a committed text-only run folder is
        return Case(["--data", str(w["data"]), "--out", str(out), *TINY_SET], str(out), [out])

    def fresh_into_run(w, t):
        out = copy_run(w, t / "run")
        return Case(["--data", str(w["data"]), "--out", str(out), *TINY_SET], "--resume", [out])

    def resume_without_checkpoint(w, t):
        out = copy_run(w, t / "run", checkpoint=False)
        return Case(["--resume", "--out", str(out), *TINY_SET], str(out), [out])

    def resume_mid_epoch_other_batch(w, t):
        out = copy_run(w, t / "run", checkpoint=False)
        state = checkpoints.load_checkpoint(w["run"] / checkpoints.CHECKPOINT)
        state["position"] = {"epoch": 0, "batch": 2, "step": 2, "sums": state["position"]["sums"]}
        torch.save(state, out / checkpoints.CHECKPOINT)
        return Case(["--resume", "--out", str(out), *TINY_SET, "--set", "batch_size=3"], "batch_size", [out])

    def resume_other_data(w, t):
        out = copy_run(w, t / "run")
        return Case(["--resume", "--out", str(out), "--data", str(w["other"]), *TINY_SET],
                    str(out / "config.json"), [out])

    def resume_damaged(kind):
        def build(w, t):
            out = copy_run(w, t / "run", checkpoint=False)
            src = w["run"] / checkpoints.CHECKPOINT
            {"truncated": lambda p: truncated(src, p), "garbage": garbage, "empty": lambda p: garbage(p, b""),
             "foreign": bare_state_dict, "text": lambda p: garbage(p, b"hello\n")}[kind](out / checkpoints.CHECKPOINT)
            return Case(["--resume", "--out", str(out), *TINY_SET], str(out / checkpoints.CHECKPOINT), [out])
        return build

    def resume_corrupt_metrics(w, t):
        out = copy_run(w, t / "run")
        (out / "metrics.jsonl").write_text("{not json\n" + (w["run"] / "metrics.jsonl").read_text())
        return Case(["--resume", "--out", str(out), *TINY_SET], "metrics.jsonl, line 1", [out])

    def resume_corrupt_config(w, t):
        out = copy_run(w, t / "run")
        (out / "config.json").write_text('{"experiment": "paper", ')
        return Case(["--resume", "--out", str(out), *TINY_SET], str(out / "config.json"), [out])

    def resume_config_without_data(w, t):
        out = copy_run(w, t / "run")
        edit_json(out / "config.json", lambda m: m.pop("data") and None)
        return Case(["--resume", "--out", str(out), *TINY_SET], str(out / "config.json"), [out])

    def resume_unknown_key(w, t):
        out = copy_run(w, t / "run")
        return Case(["--resume", "--out", str(out), *TINY_SET, "--set", "bogus_key=1"], "bogus_key", [out])

    def resume_architecture_change(w, t):
        out = copy_run(w, t / "run")
        return Case(["--resume", "--out", str(out), *TINY_SET, "--set", "towers=1"], str(out / checkpoints.CHECKPOINT), [out])

    def data_missing(w, t):
        return Case(["--data", str(t / "absent"), "--out", str(t / "run"), *TINY_SET], str(t / "absent"))

    def data_unprepared(w, t):
        (t / "raw").mkdir()
        return Case(["--data", str(t / "raw"), "--out", str(t / "run"), *TINY_SET], str(t / "raw" / "manifest.json"))

    def data_empty_val(w, t):
        data = prepared_copy(w, t / "data")
        np.save(data / "val.index.npy", np.zeros((0, 3), np.int64))
        (data / "val.jpg.bin").write_bytes(b"")
        edit_json(data / "manifest.json", lambda m: m["splits"]["val"].update(count=0))
        return Case(["--data", str(data), "--out", str(t / "run"), *TINY_SET, "--set", *RECIPE], "val split", [data])

    def data_no_image_size(w, t):
        data = prepared_copy(w, t / "data")
        edit_json(data / "manifest.json", lambda m: m.pop("image_size") and None)
        return Case(["--data", str(data), "--out", str(t / "run"), *TINY_SET], str(data / "manifest.json"), [data])

    def data_truncated_stats(w, t):
        data = prepared_copy(w, t / "data")
        truncated(w["data"] / "stats.npz", data / "stats.npz", 0.3)
        return Case(["--data", str(data), "--out", str(t / "run"), *TINY_SET], str(data / "stats.npz"), [data])

    def data_foreign_format(w, t):
        data = prepared_copy(w, t / "data")
        edit_json(data / "manifest.json", lambda m: m.update(format="ffcv/1"))
        return Case(["--data", str(data), "--out", str(t / "run"), *TINY_SET], str(data / "manifest.json"), [data])

    def out_is_file(w, t):
        garbage(t / "file")
        return Case(["--data", str(w["data"]), "--out", str(t / "file"), *TINY_SET], str(t / "file"), [t / "file"])

    def out_unwritable(w, t):  # below a file: no folder can be made there (root ignores chmod)
        garbage(t / "file")
        return Case(["--data", str(w["data"]), "--out", str(t / "file" / "run"), *TINY_SET], str(t / "file" / "run"))

    def devices(text):
        def build(w, t):
            if text.startswith("cuda") and torch.cuda.is_available():
                pytest.skip("a GPU is visible")
            return Case(["--data", str(w["data"]), "--out", str(t / "run"), "--devices", text, "--workers", "0"], text)
        return build

    def init_from(kind):
        def build(w, t):
            path = t / "start.pt"
            if kind == "garbage":
                garbage(path)
            elif kind == "foreign":
                bare_state_dict(path)
            elif kind == "truncated":
                truncated(w["run"] / checkpoints.CHECKPOINT, path)
            return Case(["--init-from", str(path), "--data", str(w["data"]), "--out", str(t / "run"), *TINY_SET],
                        str(path))
        return build

    return [
        ("train", "fresh run into a text-only run folder", fresh_into_text_run),
        ("train", "fresh run into a finished run", fresh_into_run),
        ("train", "--resume of a folder without checkpoint", resume_without_checkpoint),
        ("train", "--resume mid-epoch with another batch_size", resume_mid_epoch_other_batch),
        ("train", "--resume with another --data of the same shape", resume_other_data),
        ("train", "--resume, truncated checkpoint", resume_damaged("truncated")),
        ("train", "--resume, garbage checkpoint", resume_damaged("garbage")),
        ("train", "--resume, empty checkpoint", resume_damaged("empty")),
        ("train", "--resume, foreign (bare state_dict) checkpoint", resume_damaged("foreign")),
        ("train", "--resume, text file as checkpoint", resume_damaged("text")),
        ("train", "--resume, corrupt metrics line (not the last)", resume_corrupt_metrics),
        ("train", "--resume, corrupt config.json", resume_corrupt_config),
        ("train", "--resume, config.json without data", resume_config_without_data),
        ("train", "--resume --set unknown key", resume_unknown_key),
        ("train", "--resume --set towers=1 (weights do not fit)", resume_architecture_change),
        ("train", "--data missing", data_missing),
        ("train", "--data not prepared", data_unprepared),
        ("train", "--data with an empty val split", data_empty_val),
        ("train", "--data manifest without image_size", data_no_image_size),
        ("train", "--data truncated stats.npz", data_truncated_stats),
        ("train", "--data of a foreign format", data_foreign_format),
        ("train", "--out is a file", out_is_file),
        ("train", "--out cannot be created", out_unwritable),
        ("train", "--devices gpu7", devices("gpu7")),
        ("train", "--devices cuda:0 without a GPU", devices("cuda:0")),
        ("train", "--init-from garbage", init_from("garbage")),
        ("train", "--init-from missing", init_from("missing")),
        ("train", "--init-from a bare state_dict", init_from("foreign")),
        ("train", "--init-from truncated", init_from("truncated")),
    ]


def evaluate_cases():
    def checkpoint(kind):
        def build(w, t):
            path = t / "checkpoint.pt"
            {"garbage": garbage, "foreign": bare_state_dict, "missing": lambda p: None, "empty": lambda p: garbage(p, b""),
             "truncated": lambda p: truncated(w["run"] / checkpoints.CHECKPOINT, p)}[kind](path)
            return Case(["--checkpoint", str(path), "--data", str(w["data"]), "--device", "cpu"], str(path), [t])
        return build

    def run_args(w, t, *extra):
        out = copy_run(w, t / "run")
        return out, ["--checkpoint", str(out / checkpoints.CHECKPOINT), "--data", str(w["data"]), *extra]

    def towers_mismatch(w, t):
        out, argv = run_args(w, t, "--device", "cpu,cpu,cpu")
        return Case(argv, str(out / checkpoints.CHECKPOINT), [out])

    def batch_zero(w, t):
        out, argv = run_args(w, t, "--device", "cpu", "--batch-size", "0")
        return Case(argv, "--batch-size", [out])

    def unprepared(w, t):
        out = copy_run(w, t / "run")
        (t / "raw").mkdir()
        return Case(["--checkpoint", str(out / checkpoints.CHECKPOINT), "--data", str(t / "raw"), "--device", "cpu"],
                    str(t / "raw"), [out])

    def into_final(w, t):
        out, argv = run_args(w, t, "--device", "cpu", "--output", str(t / "run" / "final.json"))
        return Case(argv, "final.json", [out])

    def no_split(w, t):
        out, argv = run_args(w, t, "--device", "cpu", "--split", "test")
        return Case(argv, str(w["data"] / "manifest.json"), [out])

    def other_classes(w, t):
        five = pack_set(t / "five", {"train": [(np.zeros((32, 32, 3), np.uint8), i) for i in range(5)],
                                     "val": [(np.zeros((32, 32, 3), np.uint8), i) for i in range(5)]}, num_classes=5)
        out, argv = run_args(w, t, "--device", "cpu")
        argv[3] = str(five)
        return Case(argv, str(out / checkpoints.CHECKPOINT), [out, five])

    return [
        ("evaluate", "missing checkpoint", checkpoint("missing")),
        ("evaluate", "garbage checkpoint", checkpoint("garbage")),
        ("evaluate", "empty checkpoint", checkpoint("empty")),
        ("evaluate", "truncated checkpoint", checkpoint("truncated")),
        ("evaluate", "torchvision-style state_dict", checkpoint("foreign")),
        ("evaluate", "three devices for a two-tower net", towers_mismatch),
        ("evaluate", "--batch-size 0", batch_zero),
        ("evaluate", "--data not prepared", unprepared),
        ("evaluate", "--output final.json (the run's record)", into_final),
        ("evaluate", "--split the set lacks", no_split),
        ("evaluate", "data with another class count", other_classes),
    ]


def other_command_cases():
    def image(t):
        Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(t / "x.png")
        return t / "x.png"

    def predict(kind):
        def build(w, t):
            path = t / "c.pt"
            if kind == "garbage":
                garbage(path)
            elif kind == "truncated":
                truncated(w["run"] / checkpoints.CHECKPOINT, path)
            elif kind == "foreign":
                bare_state_dict(path)
            return Case(["--checkpoint", str(path), str(image(t)), "--data", str(w["data"])], str(path), [t])
        return build

    def predict_top(w, t):
        return Case(["--checkpoint", str(w["run"] / checkpoints.CHECKPOINT), str(image(t)), "--top", "-1"], "--top")

    def filters(scale, kind="run"):
        def build(w, t):
            path = w["run"] / checkpoints.CHECKPOINT
            if kind == "garbage":
                path = garbage(t / "c.pt")
            elif kind == "foreign":
                path = bare_state_dict(t / "c.pt")
            needle = "--scale" if kind == "run" else str(path)
            return Case(["filters", "--checkpoint", str(path), "--out", str(t / "f.png"), "--scale", scale], needle, [t])
        return build

    def neighbours_unprepared(w, t):
        (t / "raw").mkdir()
        return Case(["neighbours", "--checkpoint", str(w["run"] / checkpoints.CHECKPOINT), "--data", str(t / "raw"),
                     "--out", str(t / "n.png"), "--device", "cpu"], str(t / "raw"), [t])

    def caffe_beside_stats(w, t):
        data = prepared_copy(w, t / "data")
        return Case([str(garbage(t / "w.npy")), "--out", str(data / "checkpoint.pt")], str(data / "stats.npz"), [data])

    def caffe_text(w, t):
        path = garbage(t / "notes.txt", b"just some text\n")
        return Case([str(path), "--out", str(t / "out" / "checkpoint.pt")], str(path), [path])

    def caffe_out_folder(w, t):
        (t / "dir").mkdir()
        return Case([str(garbage(t / "w.npy")), "--out", str(t / "dir")], str(t / "dir"), [t])

    def cifar(kind):
        def build(w, t):
            src = t / "cifar"
            if kind == "empty":
                targz(src / "train.tar.gz", {})
                targz(src / "test.tar.gz", {})
                needle = str(src / "train.tar.gz")
            elif kind == "truncated":
                whole = targz(t / "whole.tar.gz", {f"cat/{i}.jpg": jpeg(i, 64) for i in range(30)})
                truncated(whole, src / "train.tar.gz", 0.5)
                shutil.copy(whole, src / "test.tar.gz")
                needle = str(src / "train.tar.gz")
            else:  # neither layout: the error names the folder and how to get either
                src.mkdir()
                needle = f"CIFAR-10 not found in {src}: expected train.tar.gz + test.tar.gz"
            cache = REPO / "data" / "cifar10-native.npz"
            return Case(["cifar-lrn", "--data", str(src), "--out", str(t / "out"), "--seeds", "0"], needle,
                        [src] + ([cache] if cache.exists() else []))
        return build

    def bench_unprepared(w, t):
        (t / "raw").mkdir()
        return Case(["eval", "--data", str(t / "raw"), "--device", "cpu"], str(t / "raw"))

    def model_bad_set(w, t):
        return Case(["--set", "bogus=1"], "bogus")

    return [
        ("predict", "garbage checkpoint", predict("garbage")),
        ("predict", "truncated checkpoint", predict("truncated")),
        ("predict", "missing checkpoint", predict("missing")),
        ("predict", "bare state_dict", predict("foreign")),
        ("predict", "--top -1", predict_top),
        ("visualize", "filters --scale -1", filters("-1")),
        ("visualize", "filters --scale 0", filters("0")),
        ("visualize", "filters, garbage checkpoint", filters("4", "garbage")),
        ("visualize", "filters, bare state_dict", filters("4", "foreign")),
        ("visualize", "neighbours, --data not prepared", neighbours_unprepared),
        ("caffe", "--out beside a prepared set's stats.npz", caffe_beside_stats),
        ("caffe", "a text file as weights", caffe_text),
        ("caffe", "--out an existing folder", caffe_out_folder),
        ("experiments", "--data: two empty tars (never the cache)", cifar("empty")),
        ("experiments", "--data: a truncated tar", cifar("truncated")),
        ("experiments", "--data: neither layout", cifar("missing")),
        ("bench", "eval --data not prepared", bench_unprepared),
        ("model", "--set unknown key", model_bad_set),
    ]


def data_prep_cases():
    def source_copy(w, t):
        shutil.copytree(w["source"], t / "src")
        return t / "src"

    def no_val(w, t):
        src = source_copy(w, t)
        shutil.rmtree(src / "val")
        return Case(["imagefolder", str(src), "--out", str(t / "out"), "--workers", "1", "--no-hash"], "val", [src])

    def empty_class(w, t):
        src = source_copy(w, t)
        (src / "train" / "emu").mkdir()
        return Case(["imagefolder", str(src), "--out", str(t / "out"), "--workers", "1"], "'emu'", [src])

    def all_hidden_val(w, t):
        src = source_copy(w, t)
        for f in (src / "val").rglob("*.png"):
            f.rename(f.with_name("." + f.name))
        return Case(["imagefolder", str(src), "--out", str(t / "out"), "--workers", "1"], str(src / "val"), [src])

    def out_is_file(w, t):
        src = source_copy(w, t)
        garbage(t / "file")
        return Case(["imagefolder", str(src), "--out", str(t / "file"), "--workers", "1"], str(t / "file"), [src, t / "file"])

    def foreign_manifest(w, t):
        src = source_copy(w, t)
        (t / "out").mkdir()
        (t / "out" / "manifest.json").write_text('{"name": "something else"}')
        return Case(["imagefolder", str(src), "--out", str(t / "out"), "--workers", "1"],
                    str(t / "out" / "manifest.json"), [src, t / "out"])

    def tiny(kind):
        def build(w, t):
            path = t / "tiny"
            if kind == "empty":
                path.mkdir()
            else:
                path = garbage(t / "tiny.zip", b"PK not really a zip")
            return Case(["tiny-imagenet", str(path), "--out", str(t / "out"), "--workers", "1"], str(path), [path])
        return build

    def cifar_truncated(w, t):
        whole = targz(t / "whole.tar.gz", {f"cat/{i}.jpg": jpeg(i, 64) for i in range(30)})
        truncated(whole, t / "src" / "train.tar.gz", 0.5)
        shutil.copy(whole, t / "src" / "test.tar.gz")
        return Case(["cifar10", str(t / "src"), "--out", str(t / "out"), "--workers", "1", "--no-hash"],
                    str(t / "src"), [t / "src"])

    def ilsvrc_tree_no_val(w, t):
        src = t / "tree"
        for wnid in ("n01", "n02"):
            (src / "train" / wnid).mkdir(parents=True)
            (src / "train" / wnid / "a.JPEG").write_bytes(jpeg(1))
        return Case(["ilsvrc2012", str(src), "--out", str(t / "out"), "--workers", "1", "--no-hash"], "val", [src])

    def bad_option(w, t):
        src = source_copy(w, t)
        return Case(["imagefolder", str(src), "--out", str(t / "out"), "--quality", "0"], "quality", [src])

    return [
        ("data_prep", "imagefolder without val/", no_val),
        ("data_prep", "an empty class folder", empty_class),
        ("data_prep", "a val split of hidden files only", all_hidden_val),
        ("data_prep", "--out is a file", out_is_file),
        ("data_prep", "--out holds a foreign manifest", foreign_manifest),
        ("data_prep", "tiny-imagenet on an empty folder", tiny("empty")),
        ("data_prep", "tiny-imagenet on a non-zip", tiny("zip")),
        ("data_prep", "cifar10 with a truncated tar", cifar_truncated),
        ("data_prep", "ilsvrc2012 tree without val", ilsvrc_tree_no_val),
        ("data_prep", "--quality 0", bad_option),
    ]


MAINS = {"train": train_main, "evaluate": evaluate_main, "predict": predict_main, "visualize": visualize_main,
         "caffe": caffe_main, "experiments": experiments_main, "bench": bench_main, "model": model_main,
         "data_prep": prep_main, "report": report_main}
CASES = run_folder_cases() + evaluate_cases() + other_command_cases() + data_prep_cases()


def call(main, argv) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse's own errors: usage and one line, exit 2
        return e.code


@pytest.mark.parametrize("command, name, build", CASES, ids=[f"{c}: {n}" for c, n, _ in CASES])
def test_bad_input(command, name, build, world, tmp_path, capsys):
    case = build(world, tmp_path)
    watch = case.watch + [world["run"], world["data"]]
    before = fingerprint(*watch)
    code = call(MAINS[command], case.argv)
    out, err = capsys.readouterr()
    assert code == case.code, f"exit {code}, stderr: {err}"
    assert "Traceback" not in err + out
    assert case.needle in err, err
    assert fingerprint(*watch) == before, "a failed command changed what it was pointed at"
    assert not list(tmp_path.rglob(".*.tmp")), "a temporary file was left behind"


def test_the_table_is_long_enough():
    assert len(CASES) >= 50


# ------------------------------------------------------------------ what must work ------------

def test_torn_last_metrics_line_is_dropped_and_the_run_resumes(world, tmp_path, capsys):
    out = copy_run(world, tmp_path / "run")
    whole = (out / "metrics.jsonl").read_text()
    (out / "metrics.jsonl").write_text(whole + '{"epoch": 1, "step": 8, "lr": 0.0')  # a kill mid-append
    garbage(out / ".checkpoint.pt.abc123.tmp")  # a kill mid-write
    assert train_main(["--resume", "--out", str(out), *TINY_SET]) == 0  # finished: re-evaluates only
    captured = capsys.readouterr().out
    assert "dropped the torn last line" in captured and "removed .checkpoint.pt.abc123.tmp" in captured
    assert (out / "metrics.jsonl").read_text() == whole
    assert not list(out.glob(".*.tmp"))


def test_a_non_finite_run_never_ends_as_a_result(world, tmp_path, capsys):
    """lr=1e38 with one step per epoch: the NaN appears after the last guarded step. The run
    stops (exit 1) with no metrics line, no final.json, and the report lists nothing."""
    out = tmp_path / "results" / "runs" / "nan"
    code = train_main(["--data", str(world["data"]), "--out", str(out), *TINY_SET,
                       "--set", "batch_size=16", "epochs=1", "lr=1e38", "stuck_steps=10000"])
    err = capsys.readouterr().err
    assert code == 1 and "non-finite" in err and "Traceback" not in err
    assert "no checkpoint was written" in err  # it does not claim a checkpoint it never wrote
    assert not (out / "final.json").exists() and not (out / checkpoints.CHECKPOINT).exists()
    assert not (out / "metrics.jsonl").exists() or (out / "metrics.jsonl").read_text() == ""
    assert find_runs(tmp_path / "results") == []


def test_evaluate_writes_its_own_file_and_the_report_still_reads_the_run(world, tmp_path, capsys):
    results = tmp_path / "results"
    out = copy_run(world, results / "runs" / "paper" / "seed3")
    final = (out / "final.json").read_text()
    assert evaluate_main(["--checkpoint", str(out / checkpoints.CHECKPOINT), "--data", str(world["data"]),
                          "--device", "cpu"]) == 0
    assert (out / "final.json").read_text() == final  # the run's record is never replaced
    assert json.loads((out / "eval-val.json").read_text())["split"] == "val"
    assert [r["folder"] for r in find_runs(results)] == [out]
    # an old evaluate's overwrite (no epochs), a corrupt metrics line, NaN: left out with a line, no crash
    for name, damage in [("old", lambda f: edit_json(f / "final.json", lambda d: d.pop("epochs") and None)),
                         ("torn", lambda f: (f / "metrics.jsonl").write_text("{oops\n{}\n")),
                         ("nan", lambda f: (f / "final.json").write_text(final.replace('"loss": ', '"loss": NaN, "x": ', 1))),
                         ("nodata", lambda f: edit_json(f / "config.json", lambda d: d.pop("data") and None))]:
        damage(copy_run(world, results / "runs" / name / "seed3"))
    capsys.readouterr()
    assert report_main(["--results", str(results)]) == 0
    err = capsys.readouterr().err
    assert err.count("report: left out") == 4 and "Traceback" not in err
    assert "seed3" in (results / "README.md").read_text()


def test_labels_ignore_hidden_names_and_list_odd_entries(world, tmp_path):
    """.ipynb_checkpoints must not become class 0; broken symlinks, loops, FIFOs, non-UTF-8
    names and absurd aspect ratios are skipped with a listed reason."""
    for dataset in ("imagefolder", "ilsvrc2012"):
        src = tmp_path / dataset / "src"
        shutil.copytree(world["source"], src)
        train = src / "train"
        (train / ".ipynb_checkpoints").mkdir()
        (train / ".ipynb_checkpoints" / "x.png").write_bytes((train / "cat" / "0.png").read_bytes())
        (train / "cat" / ".hidden").mkdir()
        (train / "cat" / ".hidden" / "y.png").write_bytes((train / "cat" / "0.png").read_bytes())
        (train / "cat" / "broken.png").symlink_to(tmp_path / "nowhere.png")
        (train / "cat" / "loop").symlink_to(train / "cat" / "loop")
        os.mkfifo(train / "cat" / "pipe.png")
        (train / "dog" / os.fsdecode(b"caf\xe9.png")).write_bytes((train / "dog" / "0.png").read_bytes())
        Image.new("RGB", (1, 20000)).save(train / "dog" / "thin.png")
        out = tmp_path / dataset / "out"
        assert prep_main([dataset, str(src), "--out", str(out), "--workers", "1", "--no-hash"]) == 0
        m = json.loads((out / "manifest.json").read_text())
        assert [c["id"] for c in m["classes"]] == ["cat", "dog"]  # sorted, no hidden class
        assert m["splits"]["train"]["per_class"] == [2, 2]
        reasons = {s["name"].split("/")[-1]: s["reason"] for s in m["skipped"]}
        assert "broken symlink" in reasons["broken.png"] and "loop" in reasons["loop"]
        assert "FIFO" in reasons["pipe.png"] and "UTF-8" in reasons["caf\\xe9.png"]
        assert "aspect ratio" in reasons["thin.png"]
        assert not any(".hidden" in s["name"] or "ipynb" in s["name"] for s in m["skipped"])


def test_a_class_folder_of_self_links_ends_in_seconds(world, tmp_path):
    """A class folder holding only links back to itself (`ln -s . a; ln -s . b`) holds no file:
    the check enters each folder once instead of exploring every path through the links."""
    import time
    src = tmp_path / "src"
    shutil.copytree(world["source"], src)
    empty = src / "train" / "ghost"
    empty.mkdir()
    for name in "abcdefgh":
        (empty / name).symlink_to(".")
    began = time.time()
    assert prep_main(["imagefolder", str(src), "--out", str(tmp_path / "out"), "--workers", "1", "--no-hash"]) == 2
    assert time.time() - began < 30


def test_a_damaged_jpeg_in_the_packed_set_is_named_and_the_progress_kept(world, tmp_path, capsys):
    from reproduction.data import epoch_order
    data = prepared_copy(world, tmp_path / "data")
    index = np.load(data / "train.index.npy")
    victim = int(epoch_order(16, seed=3, epoch=0)[4])  # the first image of batch 2 (batch_size 4)
    offset, length, _ = index[victim]
    with open(data / "train.jpg.bin", "r+b") as f:
        f.seek(offset)
        f.write(b"\0" * length)
    out = tmp_path / "run"
    assert train_main(["--data", str(data), "--out", str(out), *TINY_SET, "--set", *RECIPE]) == 2
    err = capsys.readouterr().err
    assert f"image {victim} (train_{victim}.JPEG)" in err and "train.jpg.bin" in err and "Traceback" not in err
    assert checkpoints.load_checkpoint(out / checkpoints.CHECKPOINT)["position"]["batch"] == 1  # the step before it


def test_experiments_cache_follows_its_source(tmp_path, monkeypatch):
    """The decoded cache is keyed by the tars' paths and contents: other data rebuilds it."""
    from reproduction import cifar
    classes = cifar.CLASSES
    a = tmp_path / "a"
    targz(a / "train.tar.gz", {f"{c}/{i}.jpg": jpeg(i) for i, c in enumerate(classes)})
    targz(a / "test.tar.gz", {f"{c}/{i}.jpg": jpeg(i + 10) for i, c in enumerate(classes)})
    b = tmp_path / "b"
    targz(b / "train.tar.gz", {f"{c}/{i}.jpg": jpeg(i + 20) for i, c in enumerate(classes[:2])})
    targz(b / "test.tar.gz", {f"{c}/{i}.jpg": jpeg(i + 30) for i, c in enumerate(classes[:2])})
    cache = tmp_path / "cache.npz"
    assert len(cifar.load_cifar10(a, cache)["train"][1]) == 10
    assert len(cifar.load_cifar10(b, cache)["train"][1]) == 2  # not a's cached 10
    assert len(cifar.load_cifar10(b, cache)["train"][1]) == 2


# ------------------------------------------------------------------ kill tests (subprocesses) --

def _env():
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def _locked_by_another(folder: Path) -> bool:
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def test_sigterm_checkpoints_and_a_second_trainer_refuses(world, tmp_path, capsys):
    """A resumes a finished run for two more epochs (batch 2: 8 steps an epoch); B on the same
    --out refuses while A holds the folder; SIGTERM stops A at a step with a checkpoint that
    then resumes to the end."""
    out = copy_run(world, tmp_path / "run")
    a = subprocess.Popen([sys.executable, "-m", "reproduction.train", "--resume", "--out", str(out), *TINY_SET,
                          "--set", "epochs=3", "batch_size=2"], cwd=REPO, env=_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in a.stdout:  # "resumed <out> at ...": A holds the lock and is about to step
            if line.startswith("resumed"):
                break
        assert _locked_by_another(out)
        before = fingerprint(out)
        assert train_main(["--resume", "--out", str(out), *TINY_SET]) == 2
        assert "being written by another process" in capsys.readouterr().err
        assert fingerprint(out) == before
        time.sleep(1.0)
        a.send_signal(signal.SIGTERM)
        _, err = a.communicate(timeout=120)
    finally:
        a.kill()
    assert a.returncode == 130, err
    assert "interrupt (SIGTERM)" in err and "Traceback" not in err
    position = checkpoints.load_checkpoint(out / checkpoints.CHECKPOINT)["position"]
    assert position["batch"] > 0 and position["step"] > 4  # mid-epoch, after the finished epoch's 4 steps
    assert train_main(["--resume", "--out", str(out), *TINY_SET, "--set", f"epochs={position['epoch'] + 1}"]) == 0
    assert json.loads((out / "final.json").read_text())["epochs"] == position["epoch"] + 1


def test_sigkill_mid_write_keeps_the_old_checkpoint_and_the_next_start_cleans_up(world, tmp_path, capsys):
    out = copy_run(world, tmp_path / "run")
    old = fingerprint(out / checkpoints.CHECKPOINT)
    script = (
        "import sys, time, torch\n"
        "from pathlib import Path\nfrom reproduction.training import checkpoints\n"
        "def slow_save(obj, f):\n"
        "    f.write(b'half a checkpoint' * 1000); f.flush(); print('writing', flush=True); time.sleep(60)\n"
        "torch.save = slow_save\n"
        f"checkpoints.save_checkpoint(Path({str(out / checkpoints.CHECKPOINT)!r}), {{'model': {{}}}})\n")
    p = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "writing"
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
    finally:
        p.kill()
    assert fingerprint(out / checkpoints.CHECKPOINT) == old and checkpoints.load_checkpoint(out / checkpoints.CHECKPOINT)["position"]
    assert len(list(out.glob(".checkpoint.pt.*.tmp"))) == 1  # what the kill left
    assert train_main(["--resume", "--out", str(out), *TINY_SET]) == 0  # the next start
    assert not list(out.glob(".*.tmp"))
    assert "a temporary file left by a killed writer" in capsys.readouterr().out


def test_ctrl_c_on_a_prep_with_workers_ends_promptly_and_resumes(tmp_path):
    """Ctrl-C reaches the whole process group (the parent and its two workers): the prep ends
    within seconds, with one line on how to resume and no traceback; the rerun finishes."""
    rng = np.random.default_rng(0)
    # 200 images (~1 s of prep on 2 idle cores): enough that the prep cannot finish between the
    # first chunk appearing and the signal arriving (40 could, on an idle machine).
    for split, n in (("train", 200), ("val", 4)):
        for i in range(n):
            d = tmp_path / "src" / split / f"c{i % 2}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (300, 400, 3), np.uint8)).save(d / f"{i}.png", compress_level=0)
    argv = ["imagefolder", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--workers", "2",
            "--chunk-size", "2", "--no-hash"]
    # SIGINT back to its default in the child: a test runner started in the background (as
    # CI may be) passes SIGINT on as ignored, and Python then installs no Ctrl-C handler.
    p = subprocess.Popen([sys.executable, "-m", "data_prep", *argv], cwd=REPO, env=_env(), start_new_session=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "out" / ".partial" / "train-000001.json").exists():
            assert p.poll() is None and time.monotonic() < deadline, "the prep ended before it could be interrupted"
            time.sleep(0.02)
        os.killpg(p.pid, signal.SIGINT)
        start = time.monotonic()
        _, err = p.communicate(timeout=30)
        took = time.monotonic() - start
    finally:
        p.kill()
    assert p.returncode == 130 and took < 10, err
    assert "Traceback" not in err and "rerun the same command to resume" in err
    assert not (tmp_path / "out" / "manifest.json").exists()
    assert prep_main(argv) == 0
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["splits"]["train"]["count"] == 200


@pytest.mark.parametrize("args, needle", [
    (["--minutes", "inf"], "--minutes inf"), (["--minutes", "1e308"], "at most a week"),
    (["--seed", "-1"], "--seed -1")])
def test_main_job_refuses_bad_values_before_anything_is_written(args, needle, tmp_path, capsys):
    from reproduction.__main__ import main as job
    with pytest.raises(SystemExit) as stop:
        job(["--work", str(tmp_path / "w"), "--runs", str(tmp_path / "r"), *args])
    assert stop.value.code == 2 and needle in capsys.readouterr().err and not (tmp_path / "r").exists()


@pytest.mark.parametrize("args, needle", [
    (["--workers", "-1"], "--workers -1"), (["--global-batch", "0"], "--global-batch 0"),
    (["--set", "seed=-1"], "seed = -1 is not allowed")])
def test_train_refuses_bad_values_before_anything_is_written(args, needle, world, tmp_path, capsys):
    out = tmp_path / "run"
    try:
        code = train_main(["--data", str(prepared_copy(world, tmp_path / "data")), "--out", str(out), *args])
    except SystemExit as stop:
        code = stop.code
    assert code == 2 and needle in capsys.readouterr().err and not out.exists()


# ------------------------------------------------------------------ outputs never replace what they should not --

def output_cases():
    """Each file a command would write is refused, before any work, when it is a file of a run
    folder that another command wrote (the training run's, the Fig. 3 record, an evaluation) or
    one of the command's inputs."""
    ck = checkpoints.CHECKPOINT

    def visualize(command, name, needle):
        def build(w, t):
            run = copy_run(w, t / "run")
            data = ["--data", str(w["data"])] if command == "neighbours" else []
            return Case([command, "--checkpoint", str(run / ck), *data, "--out", str(run / name)], needle, [run])
        return build

    def evaluate(*extra, needle):
        def build(w, t):
            run = copy_run(w, t / "run")
            argv = [a.replace("RUN", str(run)) for a in extra]
            return Case(["--checkpoint", str(run / ck), "--data", str(w["data"]), "--device", "cpu", *argv],
                        needle, [run])
        return build

    def onto_the_checkpoint(w, t):
        (t / "weights").mkdir()  # not a run folder: only being the input stops it
        os.link(w["run"] / ck, t / "weights" / "model.pt")
        model = str(t / "weights" / "model.pt")
        return Case(["--checkpoint", model, "--data", str(w["data"]), "--output", model], "would overwrite the input",
                    [t / "weights"])

    def into_the_data(w, t):
        data = prepared_copy(w, t / "data")
        return Case(["--checkpoint", str(w["run"] / ck), "--data", str(data), "--output", str(data / "manifest.json")],
                    "would overwrite the input", [data])

    return [
        ("visualize", "filters --out RUN/final.png (final.json)", visualize("filters", "final.png", "final.json")),
        ("visualize", "filters --out RUN/config.png (config.json)", visualize("filters", "config.png", "config.json")),
        ("visualize", "filters --out its own checkpoint", visualize("filters", ck, ck)),
        ("visualize", "neighbours --out RUN/fig3-conv1.png", visualize("neighbours", "fig3-conv1.png", "Fig. 3")),
        ("visualize", "neighbours --out RUN/eval-val.png", visualize("neighbours", "eval-val.png",
                                                                    "belongs to an evaluation")),
        ("evaluate", "--output RUN/fig3-conv1.json", evaluate("--output", "RUN/fig3-conv1.json", needle="Fig. 3")),
        ("evaluate", "--predictions RUN/metrics.jsonl", evaluate("--predictions", "RUN/metrics.jsonl",
                                                                 needle="metrics.jsonl")),
        ("evaluate", "--predictions and --output one file", evaluate("--output", "RUN/e.json", "--predictions",
                                                                      "RUN/e.json", needle="--predictions")),
        ("evaluate", "--output the checkpoint itself", onto_the_checkpoint),
        ("evaluate", "--output into the data folder", into_the_data),
    ]


OUTPUT_CASES = output_cases()


@pytest.mark.parametrize("command, name, build", OUTPUT_CASES, ids=[f"{c}: {n}" for c, n, _ in OUTPUT_CASES])
def test_an_output_never_replaces_a_run_file_or_an_input(command, name, build, world, tmp_path, capsys):
    case = build(world, tmp_path)
    watch = case.watch + [world["run"], world["data"]]
    before = fingerprint(*watch)
    code = call(MAINS[command], case.argv)
    out, err = capsys.readouterr()
    assert code == 2 and "Traceback" not in err + out, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and case.needle in err, err
    assert fingerprint(*watch) == before, "nothing is written, replaced or added"


def test_filters_still_writes_the_runs_own_fig3_record(world, tmp_path, capsys):
    """What `python -m reproduction` does: visualize filters --out RUN/fig3-conv1.png."""
    run = copy_run(world, tmp_path / "run")
    final = (run / "final.json").read_bytes()
    argv = ["filters", "--checkpoint", str(run / checkpoints.CHECKPOINT), "--out", str(run / "fig3-conv1.png")]
    assert visualize_main(argv) == 0 and visualize_main(argv) == 0  # and again: its own record
    assert "per_tower" in json.loads((run / "fig3-conv1.json").read_text())
    assert (run / "final.json").read_bytes() == final


@pytest.fixture
def read_only(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    yield folder
    folder.chmod(0o755)


def _no_work(*args, **kwargs):
    raise AssertionError("the long work started before the output was checked")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder anyway")
@pytest.mark.parametrize("command", ["evaluate", "visualize", "report"])
def test_a_read_only_output_ends_in_one_line_before_any_work(command, world, read_only, monkeypatch, capsys):
    import reproduction.evaluate
    import reproduction.report
    import reproduction.visualize
    monkeypatch.setattr(reproduction.evaluate, "evaluate", _no_work)
    monkeypatch.setattr(reproduction.visualize, "load_checkpoint", _no_work)
    monkeypatch.setattr(reproduction.report, "write_report", _no_work)
    ck = str(world["run"] / checkpoints.CHECKPOINT)
    argv = {"evaluate": ["--checkpoint", ck, "--data", str(world["data"]), "--output", str(read_only / "e.json")],
            "visualize": ["filters", "--checkpoint", ck, "--out", str(read_only / "f.png")],
            "report": ["--results", str(read_only)]}[command]
    code = call(MAINS[command], argv)
    out, err = capsys.readouterr()
    assert code == 2 and "Traceback" not in err + out, err
    assert len(err.strip().splitlines()) == 1 and "not writable" in err and str(read_only) in err, err
    assert list(read_only.iterdir()) == []


def test_ctrl_c_while_a_command_loads_torch_exits_quietly_with_130():
    """`python -m reproduction.X` imports the package while argv[0] is still "-m": a Ctrl-C
    from then until the command's main starts (torch loading) ends with 130 and no traceback."""
    code = ("import sys; sys.argv[0] = '-m'\n"
            "import os, signal, time, reproduction\n"
            "os.kill(os.getpid(), signal.SIGINT)\n"
            "time.sleep(10)\n"
            "print('not stopped')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert done.returncode == 130 and "Traceback" not in done.stderr and "not stopped" not in done.stdout
    from reproduction.errors import run_cli  # once a command's main runs, Ctrl-C is KeyboardInterrupt again

    def main(argv):
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        return 0
    assert run_cli(main, []) == 0
