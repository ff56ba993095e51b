"""The GPU checks in stages, for anyone with a machine that has a CUDA GPU.

    python -m reproduction.gpu prepare            # where the data is (CPU): builds gpu-bundle/
    # copy this folder (the checkout, gpu-bundle/ included) to the GPU machine; there, run:
    python -m reproduction.gpu check              # GPU tests, benchmarks, a one-epoch run
    python -m reproduction.gpu ablations --seed 0 # the paper's net and four §3/§4.1 ablations, one seed
    # copy the output folder back; then, in the checkout:
    python -m reproduction.gpu collect DIR        # the returned runs into results/

Each GPU command writes its numbers to one folder (--out, else $OUT, else runs/gpu-<stage>):
<stage>-summary.md, the table it also prints last; <stage>.jsonl, one JSON line per measured
bench row and one per part as it ends (status, seconds, its last lines, its rows, a run's
final.json); <stage>.log, everything every part printed. ablations adds each run's folder,
checkpoints left out, as ablation-<experiment>-seed<N>.tar.gz.

Each stage is a list of parts; each part is a subprocess under its own deadline, so one failing
or hanging part never stops the next. The deadlines sum to the stage's time limit (BUDGET) and
the slow parts (those with a torch.compile) come last; a part that ends early passes its unused
seconds on to the parts after it. Before anything runs, the stage prints that arithmetic and
refuses to start (`error: ...`) if the deadlines exceed the limit or the worst case exceeds
CALL_SECONDS, so a stage also fits a job queue's 10-minute limit per command. --dry-run (CPU,
seconds) runs the same orchestration with tiny stand-ins for the GPU parts and prints the same
arithmetic and table (tests/test_gpu_stages.py).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from reproduction.errors import UserError, run_cli

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "gpu-bundle"  # what prepare builds and the GPU machine needs beside the checkout
SHARED = ROOT.parent / "shared" / "data"
COLLECTED = ROOT / "results" / "runs" / "tiny-imagenet" / "gpu-50"
CLASSES = 50        # the Tiny-ImageNet subset: 25,000 train / 2,500 val images, ~56 MB packed
SAMPLES = 12        # imagenet-sample images for the nvJPEG loader tests (tests/test_data.py: batches of 10)
BUNDLE_LIMIT_MB = 60  # bundle plus checkout: the copy to the GPU machine stays small
FAST = ["precision=bf16", "channels_last=True", "fused_lrn=True"]  # the opt-in fast path (eager)
ABLATIONS = ["paper", "no_lrn", "no_overlap_pool", "one_tower", "no_pca_lighting"]
# The one reduced recipe of every ablation run: §5's SGD at batch 128 with ε 0.01 for 7 epochs,
# then 0.001 for 3 (a fixed schedule: a plateau rule has no room to act in 10 epochs), the
# fast path without torch.compile (five compiles would cost a minute each).
EPOCHS = 10


def recipe(epochs: int = EPOCHS) -> list[str]:
    """The --set of every ablation run: ε ÷ 10 after 70% of the epochs."""
    return [f"epochs={epochs}", "schedule=fixed", f"drop_epochs=({max(1, round(0.7 * epochs))},)"] + FAST


RECIPE = recipe()
BUDGET = {"prepare": 900.0, "check": 470.0, "ablations": 480.0}  # each stage's wall-time deadline
GRACE = 30.0  # seconds a part gets after SIGTERM (train.py checkpoints on it) before SIGKILL
DRAIN = 10.0  # seconds a finished part's output may take to reach the log
# The longest one GPU command may take (job queues often stop a command at 600 s): a stage's
# worst case, its budget + the last part's GRACE + DRAIN, must end inside it, or the summary is lost.
CALL_SECONDS = 560.0
PACKING = 20.0  # seconds ablations keeps free for packing its five runs (outside the deadlines)
TAIL = 12  # lines of a part's output kept in its JSON record


@dataclass
class Part:
    """One boxed step of a stage: a command with its own deadline in seconds. after: run in
    this process once the command ended, whatever its status (packing); returns a note.
    note: the summary's remark on a part that ended well (e.g. a run's final error)."""
    name: str
    command: list[str]
    seconds: float
    env: dict = field(default_factory=dict)
    after: Callable[[], str] | None = None
    note: Callable[[], str] | None = None
    record: Callable[[], dict] | None = None  # more for the part's JSON line (a run's final.json)


def arithmetic(stage: str, parts: Sequence[Part], budget: float, *, gpu: bool,
               reserved: float = 0.0) -> list[str]:
    """The stage's time arithmetic as printed lines; UserError if the parts' deadlines (plus
    `reserved` seconds of work between parts) exceed the budget or, for a GPU stage, the worst
    case (budget + the last part's SIGTERM grace + DRAIN) exceeds CALL_SECONDS."""
    total = sum(p.seconds for p in parts) + reserved
    terms = " + ".join(f"{p.name} {p.seconds:.0f}" for p in parts) + (f" + packing {reserved:.0f}" if reserved else "")
    lines = [f"budget: {terms} = {total:.0f} s of {budget:.0f} s"]
    if total > budget + 1e-6:
        raise UserError(f"{stage}: the parts' deadlines sum to {total:.0f} s, over the stage's {budget:.0f} s "
                        f"budget (reproduction/gpu.py, BUDGET[{stage!r}] and {stage}'s parts); shorten a part's "
                        "deadline or raise the budget")
    if gpu:
        worst = budget + GRACE + DRAIN
        lines.append(f"worst case: {budget:.0f} s + {GRACE:.0f} s SIGTERM grace of the last part + {DRAIN:.0f} s "
                     f"output drain = {worst:.0f} s of the {CALL_SECONDS:.0f} s one command may take (CALL_SECONDS)")
        if worst > CALL_SECONDS:
            raise UserError(f"{stage}: its worst case, {worst:.0f} s, exceeds the {CALL_SECONDS:.0f} s one command "
                            f"may take (reproduction/gpu.py, BUDGET[{stage!r}], GRACE, CALL_SECONDS); lower the budget")
    return lines


def run_parts(stage: str, parts: Sequence[Part], out: Path, budget: float, *, dry_run: bool = False,
              header: Sequence[str] = (), reserved: float = 0.0) -> list[dict]:
    """Run `parts` in order, teeing their output to stdout and out/<stage>.log. A part's limit
    is its deadline plus what the parts before it left unused, while the later parts' deadlines
    and `reserved` (packing) stay reserved (never more than what is left of `budget`). After
    each part, one JSON line goes to out/<stage>.jsonl. Prints the summary table last and
    writes it to out/<stage>-summary.md. Returns one row per part."""
    out.mkdir(parents=True, exist_ok=True)
    log_path, start, rows = out / f"{stage}.log", time.monotonic(), []
    jsonl = out / f"{stage}.jsonl"
    with open(log_path, "a", encoding="utf-8") as log:
        def say(text: str) -> None:
            sys.stdout.write(text)
            sys.stdout.flush()
            log.write(text)
            log.flush()

        say(f"=== {stage}{' (dry run)' if dry_run else ''}: {len(parts)} parts, deadline {budget:.0f} s, "
            f"{_now()} ===\n" + "".join(f"{line}\n" for line in header))
        for i, part in enumerate(parts):
            left = budget - (time.monotonic() - start)
            if left < 5:
                rows.append(_skip(part, stage, left, jsonl, dry_run, say))
                continue
            later = sum(p.seconds for p in parts[i + 1:]) + reserved
            limit = min(left, max(part.seconds, left - later))
            rows.append(_run_part(part, stage, limit, jsonl, dry_run, say))
        table = summary(stage, rows, budget, time.monotonic() - start, dry_run)
        say("\n" + table)
    (out / f"{stage}-summary.md").write_text(table)
    return rows


def _skip(part: Part, stage: str, left: float, jsonl: Path, dry_run: bool, say: Callable[[str], None]) -> dict:
    """The row of a part the stage has no time left for; its JSON line says so too."""
    status = "skipped (no time left)"
    say(f"--- {part.name}: skipped, {left:.0f} s of the stage left\n")
    _append(jsonl, {"part": part.name, "stage": stage, "status": status, "seconds": 0.0,
                    "deadline": part.seconds, "limit": 0.0, "dry_run": dry_run})
    return {"part": part.name, "status": status, "seconds": 0.0, "note": ""}


def _run_part(part: Part, stage: str, limit: float, jsonl: Path, dry_run: bool,
              say: Callable[[str], None]) -> dict:
    """Run one part within `limit` seconds, append its JSON line (with the bench rows it wrote
    meanwhile and its record) to `jsonl`, and return its row of the summary table."""
    say(f"--- {part.name} (deadline {limit:.0f} s): {_shown(part.command)}\n")
    offset = jsonl.stat().st_size if jsonl.exists() else 0
    status, seconds, tail = _run_one(part, limit, say)
    note = _note(part, status, tail)
    entry = {"part": part.name, "stage": stage, "status": status, "seconds": round(seconds, 1),
             "deadline": part.seconds, "limit": round(limit, 1), "note": note, "command": _shown(part.command),
             "tail": tail, "rows": _rows_since(jsonl, offset), "dry_run": dry_run}
    if part.record is not None:
        try:
            entry.update(part.record())
        except Exception as e:  # a run killed before its final.json: say so, keep the rest
            entry["record_error"] = f"{type(e).__name__}: {e}"
    _append(jsonl, entry)
    say(f"--- {part.name}: {status} in {seconds:.1f} s\n")
    return {"part": part.name, "status": status, "seconds": round(seconds, 1), "note": note}


def _note(part: Part, status: str, tail: list[str]) -> str:
    """The summary's remark: the part's own note if it ended well, else the last line it
    printed (an error, or a table's last row); then what its `after` returned (packing)."""
    note = _safely(part.note) if part.note is not None and status == "ok" else (tail[-1] if tail else "")
    if part.after is not None:
        extra = _safely(part.after)
        note = f"{note}; {extra}" if note and extra else note or extra
    return note


def _append(path: Path, entry: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:  # one line per write: a kill later loses none of it
        f.write(json.dumps(entry) + "\n")


def _rows_since(path: Path, offset: int) -> list[dict]:
    """The JSON lines a part's command appended to `path` (bench --json rows) after `offset`."""
    if not path.exists():
        return []
    with open(path, encoding="utf-8") as f:
        f.seek(offset)
        rows = []
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill
                pass
    return rows


def _run_one(part: Part, limit: float, say: Callable[[str], None]) -> tuple[str, float, list[str]]:
    """(status, seconds, its last TAIL non-empty lines) of one part, killed (its own process
    group) at its deadline: SIGTERM first, SIGKILL after GRACE seconds."""
    start, last = time.monotonic(), deque(maxlen=TAIL)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **part.env}
    try:
        proc = subprocess.Popen(part.command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, errors="replace",
                                start_new_session=True)
    except OSError as e:
        say(f"could not start: {e}\n")
        return f"error: {e}", 0.0, [str(e)]

    def pump():
        for line in proc.stdout:
            say(line)
            if line.strip():
                last.append(line.strip()[:160])

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout=limit)
        status = "ok" if code == 0 else f"failed (exit {code})"
    except subprocess.TimeoutExpired:
        status = f"timeout ({limit:.0f} s)"
        _signal(proc, signal.SIGTERM)
        try:
            proc.wait(timeout=GRACE)
        except subprocess.TimeoutExpired:
            _signal(proc, signal.SIGKILL)
            proc.wait()
    reader.join(timeout=DRAIN)
    return status, time.monotonic() - start, list(last)


def _shown(command: list[str]) -> str:
    """The command as a log line: python for the interpreter, a -c script by its first line."""
    words = ["python" if w == sys.executable else w for w in command]
    if "-c" in words:
        i = words.index("-c") + 1
        words[i] = repr(words[i].splitlines()[0][:70] + " ...")
        words = words[:i + 1] + [w for w in words[i + 1:] if len(w) < 200]
    return " ".join(words)


def _signal(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # the part's own session: its children (pytest's, torch's) too
    except ProcessLookupError:
        pass


def _safely(fn: Callable[[], str]) -> str:
    try:
        return fn() or ""
    except Exception as e:  # a note or a pack that fails is reported, never stops the stage
        return f"{type(e).__name__}: {e}"


def summary(stage: str, rows: list[dict], budget: float, seconds: float, dry_run: bool) -> str:
    ok = sum(r["status"] == "ok" for r in rows)
    lines = [f"## {stage}{' (dry run)' if dry_run else ''}: {ok}/{len(rows)} parts ok, "
             f"{seconds:.0f} s of {budget:.0f} s",
             "", f"{_now()}; git {_git_sha()}; {_device_line()}", "",
             "| part | status | seconds | note |", "|---|---|---:|---|"]
    lines += [f"| {r['part']} | {r['status']} | {r['seconds']:.1f} | {r['note'].replace('|', '/')} |" for r in rows]
    return "\n".join(lines) + "\n"


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _device_line() -> str:
    import torch
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    return f"no CUDA device, torch {torch.__version__}"


def _python(*args: str) -> list[str]:
    return [sys.executable, *args]


def _stand_in(command: list[str], code: str = "") -> list[str]:
    """A dry run's part: prints the command the GPU run makes, then runs `code` (a few lines
    that write what the real part would write)."""
    shown = " ".join(command[1:] if command[0] == sys.executable else command)
    return _python("-c", f"print('dry run, on the GPU: python ' + {shown!r})\n{code}")


# ------------------------------------------------------------------------------- prepare

def prepare_parts(source: Path, bundle: Path, classes: int, dry_run: bool, force: bool) -> list[Part]:
    """Build `bundle`: the packed Tiny-ImageNet subset, a few sample JPEGs, then its size."""
    data = bundle / f"tiny-imagenet-{classes}"
    prep = _python("-m", "data_prep", "tiny-imagenet", str(source / "tiny-imagenet-200"), "--out", str(data),
                   "--classes", str(classes), *(["--force"] if force else []))
    if dry_run:  # a few images per class: the real data_prep, in seconds
        prep += ["--limit-per-class", "4", "--val-limit-per-class", "2"]
    samples = _python("-c", (
        "import shutil, sys; from pathlib import Path\n"
        "src, dst, n = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])\n"
        "files = sorted(src.glob('*.JPEG'))[:n]\n"
        "assert files, f'no *.JPEG in {src}'\n"
        "dst.mkdir(parents=True, exist_ok=True)\n"
        "[shutil.copy2(f, dst / f.name) for f in files]\n"
        "print(f'{len(files)} images -> {dst}')"),
        str(source / "imagenet-sample"), str(bundle / "imagenet-sample"), str(SAMPLES))
    size = _python("-c", (
        "import subprocess, sys; from pathlib import Path\n"
        "bundle, limit = Path(sys.argv[1]), float(sys.argv[2])\n"
        "mb = lambda paths: sum(p.stat().st_size for p in paths if p.is_file()) / 2**20\n"
        "tracked = subprocess.run(['git', 'ls-files', '-co', '--exclude-standard'], capture_output=True, text=True).stdout.split()\n"
        "b, t = mb(bundle.rglob('*')), mb(Path(p) for p in tracked)\n"
        "print(f'bundle {b:.1f} MiB + checkout {t:.1f} MiB = {b + t:.1f} MiB to copy (limit {limit:g})')\n"
        "sys.exit(0 if b + t <= limit else 1)"), str(bundle), str(BUNDLE_LIMIT_MB))
    if (data / "manifest.json").is_file() and not force:  # data_prep writes its manifest last
        prep = _python("-c", f"print('already prepared: {data} (--force prepares it again)')")
    return [Part("data_prep tiny-imagenet", prep, BUDGET["prepare"] - 60),
            Part("imagenet-sample", samples, 30), Part("size", size, 30)]


# --------------------------------------------------------------------------------- check

# pytest's order is the command line's: the Triton LRN kernels and the fused net first (they were
# the ones never reached when the compile test sat in the middle), the torch.compile test alone
# in the last part of the stage (it compiles for ~a minute).
GPU_TEST_FILES = ["tests/test_lrn_triton.py", "tests/test_model.py", "tests/test_data.py", "tests/test_gpu.py"]
COMPILE_TEST = "tests/test_gpu.py::test_compiled_fast_step_runs_full_and_partial_batches"


def check_parts(data: Path, bundle: Path, work: Path, out: Path, dry_run: bool) -> list[Part]:
    """The check stage: versions, the gpu-marked tests, a one-epoch run, benchmarks, the compile test."""
    versions = _python("-c", (
        "import sys, torch, torchvision\n"
        "try:\n    import triton; tv = triton.__version__\nexcept ImportError:\n    tv = 'not installed'\n"
        "print(f'python {sys.version.split()[0]}, torch {torch.__version__}, torchvision {torchvision.__version__}, triton {tv}')\n"
        "print(f'CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, devices {torch.cuda.device_count()}')\n"
        "for i in range(torch.cuda.device_count()):\n"
        "    p = torch.cuda.get_device_properties(i)\n"
        "    print(f'cuda:{i} {p.name}, {p.total_memory / 2**30:.0f} GiB, capability {p.major}.{p.minor}, bf16 {torch.cuda.is_bf16_supported()}')\n"))
    test_env = {"REPRODUCTION_TEST_DATA": str(bundle), "REPRODUCTION_GPU_TESTS": "require"}
    # -v: each test's result is printed as it ends, so a part stopped at its deadline still says
    # which tests passed
    pytest = ["-m", "pytest", "-m", "gpu", "-v", "-rfEs", "-p", "no:cacheprovider"]
    tests = _python(*pytest, "--durations=8", *GPU_TEST_FILES, "--deselect", COMPILE_TEST)
    compile_test = _python(*pytest, COMPILE_TEST)
    jsonl = str(out / "check.jsonl")  # the bench rows go into the stage's JSON lines as measured
    bench_bf16 = _python("-m", "reproduction.bench", "model", "--device", "cuda", "--batch-sizes", "512",
                         "--precisions", "bf16")
    bench_fp32 = _python("-m", "reproduction.bench", "model", "--device", "cuda", "--batch-sizes", "128",
                         "--precisions", "fp32", "--variants", "torchvision", "torchvision-cl", "reference", "fast")
    run = work / "check-train"
    train = _python("-m", "reproduction.train", "--experiment", "paper", "--data", str(data), "--out", str(run),
                    "--devices", "cuda:0", "--set", "epochs=1", "stuck_steps=100000", *FAST)
    bench_eval = _python("-m", "reproduction.bench", "eval", "--data", str(data), "--device", "cuda",
                         "--ten-patch", "--json", jsonl, "--set", *FAST)
    bench_train = _python("-m", "reproduction.bench", "train", "--data", str(data), "--device", "cuda",
                          "--json", jsonl, "--set", *FAST)
    # Deadlines (s) sum to BUDGET["check"]: estimates for an H100/H200 (a part that ends early
    # passes its seconds on). Slow last: the two parts that run torch.compile (~a minute each).
    parts = [Part("versions", versions, 20),
             Part("gpu tests", tests, 140, env=test_env),
             Part("train 1 epoch, fast path", train, 60, note=lambda: _final_note(run),
                  record=lambda: _run_record(run)),
             Part("bench model fp32/128", bench_fp32, 40),
             Part("bench eval ten-patch", bench_eval, 35),
             Part("bench train", bench_train, 45),
             Part("bench model bf16/512 (+ compile)", bench_bf16, 70),
             Part("gpu compile test", compile_test, 60, env=test_env)]
    if dry_run:  # the same parts; versions for real, the GPU parts as stand-ins
        for p in parts[1:]:
            code = (_fake_run_code(run, "paper", 0) if p.command is train
                    else _fake_row_code(jsonl, p.command[3]) if p.command in (bench_eval, bench_train) else "")
            p.command = _stand_in(p.command, code)
    return parts


def _fake_row_code(jsonl: str, bench: str) -> str:
    """A dry run's bench part: one row in the stage's JSON lines, marked dry_run."""
    return (f"import json; open({jsonl!r}, 'a').write(json.dumps({{'bench': {bench!r}, 'img_s': 1.0, "
            "'dry_run': True}) + '\\n')\nprint('| dry run | 1 |')")


def _run_record(run: Path) -> dict:
    """A run folder's small files for its JSON line (the folder itself is not kept)."""
    read = lambda name: json.loads((run / name).read_text()) if (run / name).is_file() else None
    metrics = run / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()] if metrics.is_file() else []
    return {"final": read("final.json"), "metrics": rows, "config": read("config.json")}


def _final_note(run: Path) -> str:
    final = json.loads((run / "final.json").read_text())
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rate = f", {rows[-1]['img_per_s']:.0f} img/s" if rows and "img_per_s" in rows[-1] else ""
    return (f"top-1 {final['centre']['top1_error']:.3f} centre / {final['ten_patch']['top1_error']:.3f} "
            f"ten patches after {final.get('epochs', '?')} epoch(s){rate}" + (" (dry run)" if final.get("dry_run") else ""))


def _fake_run_code(run: Path, experiment: str, seed: int) -> str:
    """A dry run's training part: the files a run folder holds, marked dry_run (collect refuses them)."""
    return ("import json; from pathlib import Path\n"
            f"run = Path({str(run)!r}); run.mkdir(parents=True, exist_ok=True)\n"
            f"(run / 'config.json').write_text(json.dumps({{'experiment': {experiment!r}, 'seed': {seed}, 'dry_run': True}}))\n"
            "(run / 'metrics.jsonl').write_text(json.dumps({'epoch': 0, 'img_per_s': 1.0}) + '\\n')\n"
            "e = {'top1_error': 1.0, 'top5_error': 1.0, 'loss': 0.0}\n"
            f"(run / 'final.json').write_text(json.dumps({{'centre': e, 'ten_patch': e, 'epochs': 1, 'experiment': {experiment!r}, 'dry_run': True}}))\n"
            "(run / 'checkpoint.pt').write_bytes(b'not packed')\n")


# ----------------------------------------------------------------------------- ablations

def ablation_parts(data: Path, work: Path, out: Path, seed: int, experiments: Sequence[str],
                   per_run: float, dry_run: bool, epochs: int = EPOCHS) -> list[Part]:
    parts = []
    for exp in experiments:
        run = work / "runs" / exp / f"seed{seed}"  # where reproduction.ablate puts it
        train = _python("-m", "reproduction.ablate", exp, "--data", str(data), "--out", str(work),
                        "--seeds", str(seed), "--set", *recipe(epochs))
        if dry_run:
            train = _stand_in(train, _fake_run_code(run, exp, seed))
        parts.append(Part(f"train {exp}", train, per_run, note=lambda run=run: _final_note(run),
                          record=lambda run=run: {"final": _run_record(run)["final"]},
                          after=None if exp == "paper" else lambda exp=exp, run=run: pack(run, out, exp, seed)))
        if exp == "paper":  # Fig. 3 from the paper run, inside its folder, then packed
            fig = _python("-m", "reproduction.visualize", "filters", "--checkpoint", str(run / "checkpoint.pt"),
                          "--out", str(run / "fig3.png"))
            if dry_run:
                fig = _stand_in(fig)
            parts.append(Part("fig3 paper", fig, 30, after=lambda run=run: pack(run, out, "paper", seed)))
    return parts


def pack(run: Path, out: Path, experiment: str, seed: int) -> str:
    """The run folder as one tar.gz in out, without its checkpoints (large, and not needed for
    the report), so the output folder holds few files however many each run writes."""
    if not run.is_dir():
        return "no run folder to pack"
    path = out / f"ablation-{experiment}-seed{seed}.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for f in sorted(run.rglob("*")):
            if f.is_file() and f.suffix not in (".pt", ".lock"):
                tar.add(f, arcname=f"{experiment}/seed{seed}/{f.relative_to(run)}")
    return f"packed {path.name} ({path.stat().st_size / 1024:.0f} KiB)"


# ------------------------------------------------------------------------------- collect

def collect(folder: Path, into: Path, force: bool, allow_dry_run: bool) -> list[str]:
    """Unpack the ablation-*.tar.gz of a stage's output folder into `into`/<experiment>/seed<N>/
    (where `python -m reproduction.report` finds their final.json), and copy the stages'
    summaries, logs and JSON lines to results/gpu/ (dated). Returns what was done."""
    archives = sorted(folder.rglob("ablation-*.tar.gz"))
    summaries = sorted(folder.rglob("*-summary.md"))
    summaries += [f for f in sorted([*folder.rglob("*.log"), *folder.rglob("*.jsonl")])
                  if (f.parent / f"{f.stem}-summary.md").exists()]  # a stage's log and JSON lines
    if not archives and not summaries:
        raise UserError(f"{folder} holds no ablation-*.tar.gz or *-summary.md; give the output folder of a "
                        "`python -m reproduction.gpu` stage (its --out or $OUT), copied back from the GPU machine")
    done = []
    for path in archives:
        with tarfile.open(path) as tar:
            members = tar.getmembers()
            for m in members:
                if not (m.isfile() or m.isdir()) or m.name.startswith("/") or ".." in Path(m.name).parts:
                    raise UserError(f"{path}: unsafe member {m.name!r}; not unpacked")
            runs = sorted({Path(*Path(m.name).parts[:2]) for m in members if len(Path(m.name).parts) > 2})
            final = next((m for m in members if m.name.endswith("/final.json")), None)
            if final is not None and json.loads(tar.extractfile(final).read()).get("dry_run") and not allow_dry_run:
                raise UserError(f"{path} comes from a dry run (its final.json says dry_run); results/ holds "
                                "real runs only (give --into elsewhere and --allow-dry-run to unpack it)")
            for run in runs:
                target = into / run
                if target.exists():
                    if not force:
                        raise UserError(f"{target} exists; give --force to replace it with {path.name}")
                    shutil.rmtree(target)
            for m in members:
                if m.isfile():
                    dest = into / m.name
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    dest.write_bytes(tar.extractfile(m).read())
            done += [f"{path.name} -> {into / run}" for run in runs]
    gpu_results = ROOT / "results" / "gpu" if into == COLLECTED else into
    for path in summaries:
        gpu_results.mkdir(parents=True, exist_ok=True)
        stamp = datetime.datetime.fromtimestamp(path.stat().st_mtime, datetime.timezone.utc).strftime("%Y%m%d-%H%M")
        dest = gpu_results / f"{path.stem}-{stamp}{path.suffix}"
        shutil.copy2(path, dest)
        done.append(f"{path.name} -> {dest}")
    return done


# ---------------------------------------------------------------------------------- main

def find_data(bundle: Path, given: Path | None) -> Path:
    """--data, else the largest prepared tiny-imagenet-<classes> set in the bundle."""
    if given is not None:
        return given
    found = sorted(p.parent for p in bundle.glob("tiny-imagenet-*/manifest.json"))
    if not found:
        raise UserError(f"no prepared set in {bundle} (tiny-imagenet-*/manifest.json); run "
                        f"`python -m reproduction.gpu prepare` where the data is, then copy {BUNDLE.name}/ "
                        "with the checkout to this machine (or give --bundle)")
    return max(found, key=lambda p: int(p.name.rsplit("-", 1)[1]) if p.name.rsplit("-", 1)[1].isdigit() else 0)


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, argv)


def _main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.stage == "collect":
        return _collect(args)
    out = args.out or Path(os.environ.get("OUT") or ROOT / "runs" / f"gpu-{args.stage}")
    if args.stage == "prepare":
        return _prepare(args, out)
    return _gpu_stage(args, out)


def _parser() -> argparse.ArgumentParser:
    usage = "\n\n".join(__doc__.split("\n\n")[:3])  # the commands and what they write
    parser = argparse.ArgumentParser(prog="python -m reproduction.gpu", description=usage,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Stages: prepare (CPU), check and ablations (GPU), collect (CPU). "
                                            "How to run them: docs/gpu.md; what has run: results/gpu/README.md.")
    sub = parser.add_subparsers(dest="stage", required=True)
    p = sub.add_parser("prepare", help=f"CPU, where the data is: build {BUNDLE.name}/ (Tiny-ImageNet subset, "
                                       "sample images) to copy to the GPU machine with the checkout")
    _common(p, bundle=False)
    p.add_argument("--source", type=Path, default=SHARED, help=f"the shared data folder (default {SHARED})")
    _bundle_option(p, f"the folder to build (default {BUNDLE.name}/)")
    p.add_argument("--classes", type=int, default=None,
                   help=f"Tiny-ImageNet classes (default {CLASSES}; 2 with --dry-run)")
    p.add_argument("--force", action="store_true", help="prepare the set again even if it is there")
    p = sub.add_parser("check", help="GPU, first: versions, gpu tests, a short run, benchmarks, the compile test")
    _common(p)
    p = sub.add_parser("ablations", help="GPU: paper and four ablations on the subset, one seed")
    _common(p)
    p.add_argument("--seed", type=int, default=0, help="the seed of every run of this command (default 0)")
    p.add_argument("--experiments", nargs="+", default=ABLATIONS, help=f"default: {' '.join(ABLATIONS)}")
    p.add_argument("--epochs", type=int, default=EPOCHS,
                   help=f"epochs per run (default {EPOCHS}: ~86 s per run fits ~6 s per epoch; see check's epoch), ε ÷ 10 after 70%%; the same for every seed, or report cannot combine them")
    p = sub.add_parser("collect", help="CPU, after: returned runs into results/runs/tiny-imagenet/gpu-50/")
    p.add_argument("folder", type=Path, help="a stage's output folder, copied back from the GPU machine")
    p.add_argument("--into", type=Path, default=COLLECTED, help=f"default {COLLECTED.relative_to(ROOT)}")
    p.add_argument("--force", action="store_true", help="replace run folders that are already there")
    p.add_argument("--allow-dry-run", action="store_true", help="unpack a dry run's archives (tests)")
    return parser


def _common(p: argparse.ArgumentParser, bundle: bool = True) -> None:
    p.add_argument("--out", type=Path, default=None,
                   help="the folder for the summary, JSON lines, log and packed runs "
                        "(default: $OUT if set, else runs/gpu-<stage>)")
    p.add_argument("--dry-run", action="store_true",
                   help="the same orchestration on the CPU in seconds, GPU parts as stand-ins")
    if bundle:
        _bundle_option(p, f"the folder prepare built (default {BUNDLE.name}/)")
        p.add_argument("--data", type=Path, default=None,
                       help="the packed set (default: the largest tiny-imagenet-* in --bundle)")


def _bundle_option(p: argparse.ArgumentParser, text: str) -> None:
    p.add_argument("--bundle", type=Path, default=BUNDLE, help=text)


def _collect(args: argparse.Namespace) -> int:
    if not args.folder.is_dir():
        raise UserError(f"{args.folder} is not a folder; give a stage's output folder, copied back from the "
                        "GPU machine")
    for line in collect(args.folder, args.into, args.force, args.allow_dry_run):
        print(line)
    print("next: python -m reproduction.report")
    return 0


def _prepare(args: argparse.Namespace, out: Path) -> int:
    classes = args.classes or (2 if args.dry_run else CLASSES)
    if not (args.source / "tiny-imagenet-200").exists() or not (args.source / "imagenet-sample").is_dir():
        raise UserError(f"{args.source} lacks tiny-imagenet-200 or imagenet-sample; give --source, the "
                        "shared data folder (prepare runs on a CPU machine that has the data)")
    parts = prepare_parts(args.source, args.bundle, classes, args.dry_run, args.force)
    header = arithmetic("prepare", parts, BUDGET["prepare"], gpu=False) + [
        f"bundle: {args.bundle}; next: copy the checkout with {args.bundle.name}/ to the GPU machine and run "
        "`python -m reproduction.gpu check` there"]
    rows = run_parts("prepare", parts, out, BUDGET["prepare"], dry_run=args.dry_run, header=header)
    return 0 if all(r["status"] == "ok" for r in rows) else 1


def _gpu_stage(args: argparse.Namespace, out: Path) -> int:
    """check or ablations: refused before anything runs if the plan cannot fit its time limit
    (a dry run in CI checks this too); run folders live in a temporary folder, never in `out`."""
    data = find_data(args.bundle, args.data)
    if not args.dry_run:
        import torch
        if not torch.cuda.is_available():
            raise UserError(f"{args.stage}: no CUDA device is visible; run it on a GPU machine, or give "
                            "--dry-run to rehearse it on the CPU")
    if args.stage == "ablations":
        _check_ablations(args)
    work = Path(tempfile.mkdtemp(prefix=f"gpu-{args.stage}-"))
    header = [f"data: {data}; bundle: {args.bundle}; work: {work}; out: {out}"]
    reserved = PACKING if args.stage == "ablations" else 0.0
    try:
        if args.stage == "check":
            parts = check_parts(data, args.bundle, work, out, args.dry_run)
        else:
            per_run = (BUDGET["ablations"] - 30 - PACKING) / len(args.experiments)  # 30: the fig3 part
            header.append(f"recipe: --set seed={args.seed} {' '.join(recipe(args.epochs))}; {per_run:.0f} s per "
                          "run (a run past it is stopped by SIGTERM, checkpointed and packed as far as it got)")
            parts = ablation_parts(data, work, out, args.seed, args.experiments, per_run, args.dry_run, args.epochs)
        header = arithmetic(args.stage, parts, BUDGET[args.stage], gpu=True, reserved=reserved) + header
        rows = run_parts(args.stage, parts, out, BUDGET[args.stage], dry_run=args.dry_run, header=header,
                         reserved=reserved)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # the packed runs are in `out`; checkpoints are not kept
    return 0 if all(r["status"] == "ok" for r in rows) else 1


def _check_ablations(args: argparse.Namespace) -> None:
    unknown = sorted(set(args.experiments) - _experiment_names())
    if unknown:
        raise UserError(f"--experiments: {', '.join(unknown)} unknown; see reproduction/experiments.py")
    if args.epochs < 1:
        raise UserError(f"--epochs must be >= 1, got {args.epochs}")


def _experiment_names() -> set[str]:
    from reproduction.experiments import EXPERIMENTS
    return set(EXPERIMENTS)


if __name__ == "__main__":
    sys.exit(main())
