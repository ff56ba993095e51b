"""Stream a source through the §2 conversion into the packed format, in resumable chunks.

Work happens in chunks of `chunk_size` records per split. A worker converts a chunk and commits
it to DIR/.partial/ (data and index first, then a small <chunk>.json marker, each written to a
temporary name and moved into place with os.replace). A rerun reuses every chunk whose marker
is present and whose files have the recorded sizes. The final <split>.jpg.bin / .index.npy /
.names.txt, stats.npz and, last, manifest.json are assembled only when all chunks exist, so a
directory without manifest.json is never a finished set.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
import zlib
from collections import Counter, deque
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from . import image, stats
from .sources import Record, Source, with_holdout

FORMAT = "alexnet-packed/1"
TOOL_VERSION = "1"
WORK = ".partial"


@dataclass(frozen=True)
class Options:
    quality: int = 95                 # JPEG quality of re-encoded images
    resample: str = "bicubic"         # PIL filter for the §2 rescale
    workers: int = os.cpu_count() or 1
    chunk_size: int = 1000            # records per resumable unit of work
    num_classes: int | None = None    # keep only the first K classes (sorted order)
    limit_per_class: int | None = None  # keep only the first N files of each class per split
    val_limit_per_class: int | None = None  # the same for the splits other than train (default: limit_per_class)
    holdout: int | None = None        # hold out the first N train images per class as val; the source's val becomes test
    stats: str = "computed"           # "computed" | "cuda-convnet2"
    constants: Path | None = None     # cuda-convnet2 constants (.npz), for the option and the comparison
    strict_counts: bool = False       # a count that differs from the official one is an error
    hash_sources: bool = True
    keep_work: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.quality <= 100:
            raise ValueError(f"quality must be in 1..100, got {self.quality}")
        if self.resample not in image.RESAMPLE:
            raise ValueError(f"resample must be one of {sorted(image.RESAMPLE)}, got {self.resample!r}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if not 1 <= self.chunk_size <= 1_000_000:  # uint32 per-chunk sums need chunk_size * 255 < 2**32
            raise ValueError(f"chunk_size must be in 1..1000000, got {self.chunk_size}")
        if self.stats not in ("computed", "cuda-convnet2"):
            raise ValueError(f"stats must be 'computed' or 'cuda-convnet2', got {self.stats!r}")
        if self.stats == "cuda-convnet2" and (self.constants is None or not Path(self.constants).is_file()):
            raise ValueError(f"--stats cuda-convnet2 needs the constants file; not found: {self.constants}")
        for name in ("num_classes", "limit_per_class", "val_limit_per_class", "holdout"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")


class PrepError(Exception):
    """A prep that cannot go on; the message says what to do."""


@dataclass(frozen=True)
class ChunkTask:
    work: Path
    cid: str                 # e.g. "train-000012"
    split: str
    items: list[tuple[str, int, object, str | None]]  # (name, label, bytes/array or None, skip reason)
    native_size: int | None
    stats_size: int | None   # the stored side when this chunk's images go into the statistics
    quality: int
    resample: str


# ---------------------------------------------------------------- one chunk (in a worker) -----

def process_chunk(task: ChunkTask) -> dict:
    """Convert one chunk and commit its files; return the marker's contents."""
    start = time.perf_counter()
    blobs, rows, names, skipped, converted = [], [], [], [], []
    sums = stats.StatSums.zeros(task.stats_size) if task.stats_size else None
    offset, passthrough = 0, 0
    for name, label, data, skip in task.items:
        if skip is None and ("\n" in name or "\r" in name):
            skip = "name contains a line break (names.txt holds one name per line)"
        if not _utf8(name):  # names.txt and the manifest are UTF-8; listed with its bytes escaped
            name, skip = _printable(name), skip or "file name is not valid UTF-8"
        if skip is None:
            out = image.convert(data, native_size=task.native_size, quality=task.quality,
                                resample=task.resample)
            skip = out.skip_reason
        if skip is not None:
            skipped.append({"split": task.split, "name": name, "reason": skip})
            continue
        if out.converted_from:
            converted.append({"split": task.split, "name": name, "from": out.converted_from})
        passthrough += out.passthrough
        blobs.append(out.jpeg)
        rows.append((offset, len(out.jpeg), label))
        names.append(name)
        offset += len(out.jpeg)
        if sums is not None:
            sums.add_image(out.pixels)
    index = np.array(rows, np.int64).reshape(-1, 3)
    bin_path, npz_path = _chunk_paths(task.work, task.cid)
    _atomic_write(bin_path, lambda f: [f.write(b) for b in blobs])
    arrays = {"index": index, "names": np.array(names, dtype=str)}
    if sums is not None:
        arrays.update(sums.to_arrays())
    _atomic_write(npz_path, lambda f: np.savez(f, **arrays))
    marker = {"cid": task.cid, "records": len(task.items), "stored": len(rows),
              "bin_bytes": bin_path.stat().st_size, "npz_bytes": npz_path.stat().st_size,
              "first": task.items[0][0], "last": task.items[-1][0], "skipped": skipped,
              "converted": converted, "passthrough": passthrough,
              "seconds": round(time.perf_counter() - start, 3)}
    _atomic_write(task.work / f"{task.cid}.json", lambda f: f.write(json.dumps(marker).encode()))
    return marker


def _utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:  # a name os.fsdecode carried as lone surrogates
        return False


def _printable(name: str) -> str:
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _worker_init() -> None:
    # Ctrl-C reaches the whole process group: only the parent acts on it (it terminates the
    # pool). A worker killed mid-get would leave the pool's queue lock held and hang terminate().
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_worker)


def _exit_worker(signum, frame):
    raise SystemExit(0)  # unwinds, so the queue lock a waiting worker holds is released


def stop_pool(pool, grace: float = 3.0) -> None:
    """Pool.terminate() and join, killing (SIGKILL) any worker still alive after `grace` seconds.

    terminate() sends each worker SIGTERM and waits for it. CPython runs a signal's handler
    between bytecodes, so a SIGTERM that lands just before a worker blocks on the task queue's
    lock is never acted on, and terminate() waited for that worker forever (seen on a 2-core AMD
    EPYC: the suite's Ctrl-C of a 2-worker prep hung; a loop of such stops hit it 16 times in
    400). By then the parent holds that lock itself, so a worker killed while it waits for the
    lock leaves nothing held."""
    workers = list(pool._pool)  # no public API lists them
    finished = threading.Event()

    def reap() -> None:
        if not finished.wait(grace):
            for p in workers:
                if p.exitcode is None:
                    p.kill()

    reaper = threading.Thread(target=reap, name="stop_pool", daemon=True)
    reaper.start()
    try:
        pool.terminate()
        pool.join()
    finally:
        finished.set()
        reaper.join()


def _chunk_paths(work: Path, cid: str) -> tuple[Path, Path]:
    return work / f"{cid}.bin", work / f"{cid}.npz"


def _atomic_write(path: Path, write: Callable) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
    os.replace(tmp, path)


def _finished_marker(work: Path, cid: str) -> dict | None:
    """The chunk's marker when the chunk is complete on disk (marker present, sizes match)."""
    try:
        marker = json.loads((work / f"{cid}.json").read_text())
    except (OSError, ValueError):
        return None
    bin_path, npz_path = _chunk_paths(work, cid)
    ok = (bin_path.is_file() and bin_path.stat().st_size == marker["bin_bytes"]
          and npz_path.is_file() and npz_path.stat().st_size == marker["npz_bytes"])
    return marker if ok else None


# ---------------------------------------------------------------- the run ---------------------

class Progress:
    """A progress line with img/s on stderr, at most every `every` seconds."""

    def __init__(self, label: str, total: int | None, every: float = 2.0):
        self.label, self.total, self.every = label, total, every
        self.start = self.last = time.perf_counter()
        self.done = self.converted = 0

    def update(self, records: int, converted: bool, final: bool = False) -> None:
        self.done += records
        self.converted += records if converted else 0
        now = time.perf_counter()
        if final or now - self.last >= self.every:
            self.last = now
            rate = self.converted / max(now - self.start, 1e-9)
            total = f"/{self.total:,}" if self.total else ""
            print(f"[{self.label}] {self.done:,}{total} images, {rate:,.0f} img/s converted",
                  file=sys.stderr, flush=True)


def _select(records: Iterator[Record], num_classes: int | None, limit: int | None) -> Iterator[Record]:
    """--classes / --limit-per-class: decided from labels only, before anything is read."""
    seen: dict[int, int] = {}
    for r in records:
        if r.skip is None and num_classes is not None and r.label >= num_classes:
            continue
        if r.skip is None and limit is not None:
            seen[r.label] = seen.get(r.label, 0) + 1
            if seen[r.label] > limit:
                continue
        yield r


def _subset(opts: Options) -> bool:
    return bool(opts.num_classes or opts.limit_per_class or opts.val_limit_per_class or opts.holdout)


def run_split(source: Source, split: str, opts: Options, work: Path,
              pool, on_chunk: Callable[[str], None] | None = None) -> list[dict]:
    """Convert one split chunk by chunk; return the markers of all its chunks in order."""
    limit = opts.limit_per_class if split == "train" or opts.val_limit_per_class is None else opts.val_limit_per_class
    records = _select(source.records(split), opts.num_classes, limit)
    expected = None if _subset(opts) else (source.expected_counts or {}).get(split)
    progress = Progress(f"{source.dataset}:{split}", expected)
    stats_size = (source.native_size or image.PAPER_SIZE) if split == "train" else None
    markers: list[dict | None] = []
    pending: deque = deque()
    for k in range(10**9):
        cid = f"{split}-{k:06d}"
        done = _finished_marker(work, cid)
        # Reading only when needed: a finished chunk's records are pulled (names) but not read.
        items = [(r.name, r.label, None if (done or r.skip) else r.read(), r.skip)
                 for r in islice(records, opts.chunk_size)]
        if not items:
            break
        if done:
            if (done["records"], done["first"], done["last"]) != (len(items), items[0][0], items[-1][0]):
                raise PrepError(f"{work}: chunk {cid} was made from different records than the "
                                "source gives now; rerun with --force to start over")
            markers.append(done)
            progress.update(len(items), converted=False)
            continue
        task = ChunkTask(work, cid, split, items, source.native_size, stats_size, opts.quality, opts.resample)
        markers.append(None)
        pending.append((len(markers) - 1, _submit(pool, task)))
        while len(pending) > (opts.workers + 1 if pool else 0):  # bound memory: chunks in flight
            _collect(pending.popleft(), markers, progress, on_chunk)
    while pending:
        _collect(pending.popleft(), markers, progress, on_chunk)
    progress.update(0, converted=False, final=True)
    return markers


def _submit(pool, task: ChunkTask):
    if pool is None:
        return process_chunk(task)
    return pool.apply_async(process_chunk, (task,))


def _collect(entry, markers: list, progress: Progress, on_chunk: Callable[[str], None] | None) -> None:
    slot, result = entry
    marker = result if isinstance(result, dict) else result.get()
    markers[slot] = marker
    progress.update(marker["records"], converted=True)
    if on_chunk is not None:
        on_chunk(marker["cid"])  # tests use this hook to simulate a crash after k chunks


def assemble_split(out: Path, work: Path, split: str, markers: list[dict],
                   num_classes: int) -> tuple[dict, stats.StatSums | None]:
    """Concatenate the chunks into <split>.jpg.bin/.index.npy/.names.txt; return manifest entry, sums."""
    digest, offset, rows, names = hashlib.sha256(), 0, [], []
    sums = None
    bin_tmp = out / f"{split}.jpg.bin.tmp"
    with open(bin_tmp, "wb") as dst:
        for m in markers:
            bin_path, npz_path = _chunk_paths(work, m["cid"])
            with open(bin_path, "rb") as src:
                while block := src.read(1 << 22):
                    digest.update(block)
                    dst.write(block)
            with np.load(npz_path) as z:
                index = z["index"].copy()
                index[:, 0] += offset
                rows.append(index)
                names.extend(str(n) for n in z["names"])
                if "image_sum" in z:
                    if sums is None:
                        sums = stats.StatSums.from_arrays(z)
                    else:
                        sums.add(stats.StatSums.from_arrays(z))
            offset += m["bin_bytes"]
    index = np.concatenate(rows) if rows else np.zeros((0, 3), np.int64)
    _atomic_write(out / f"{split}.index.npy", lambda f: np.save(f, index.astype(np.int64)))
    _atomic_write(out / f"{split}.names.txt", lambda f: f.write("".join(n + "\n" for n in names).encode()))
    os.replace(bin_tmp, out / f"{split}.jpg.bin")
    per_class = np.bincount(index[:, 2], minlength=num_classes).tolist() if len(index) else [0] * num_classes
    entry = {"count": int(len(index)), "per_class": per_class, "sha256": digest.hexdigest(),
             "bytes": offset, "records_seen": sum(m["records"] for m in markers),
             "passthrough": sum(m["passthrough"] for m in markers)}
    return entry, sums


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def _source_hashes(source: Source, work: Path, enabled: bool) -> list[dict]:
    """sha256 of every source file, streamed; cached in the work dir so a resume skips it."""
    cache = work / "sources.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    entries = [{"path": str(p.resolve()), "bytes": p.stat().st_size,
                "sha256": sha256_file(p) if enabled else None} for p in source.files]
    _atomic_write(cache, lambda f: f.write(json.dumps(entries).encode()))
    return entries


def _git_info() -> dict:
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=here, capture_output=True, text=True,
                               timeout=5).stdout.strip() != ""
        return {"git_sha": sha or None, "git_dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"git_sha": None, "git_dirty": None}


def _settings(source: Source, opts: Options, source_arg: str) -> dict:
    d = {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(opts).items()}
    d.update(source=source.dataset, source_path=source_arg, native_size=source.native_size)
    return d


# Options that do not change a chunk's bytes: a resume may change them.
NEUTRAL = ("workers", "hash_sources", "keep_work", "strict_counts", "stats", "constants")


def _differing(old: dict, new: dict) -> list[str]:
    keys = (set(old) | set(new)) - set(NEUTRAL)
    return sorted(k for k in keys if old.get(k) != new.get(k))


def _check_work(work: Path, settings: dict) -> None:
    """A work dir from other settings would mix two preps: refuse, and say how to start over."""
    path = work / "settings.json"
    key = {k: v for k, v in settings.items() if k not in NEUTRAL}
    if path.is_file():
        diff = _differing(json.loads(path.read_text()), key)
        if diff:
            raise PrepError(f"{work} holds a partial prep made with other settings ({', '.join(diff)}); "
                            "rerun with the same options, or with --force to start over")
    else:
        work.mkdir(parents=True, exist_ok=True)
        _atomic_write(path, lambda f: f.write(json.dumps(key, sort_keys=True).encode()))


def _expected(source: Source, opts: Options, seen: dict[str, int]) -> dict:
    if source.expected_counts is None:
        return {"counts": None, "checked": False, "reason": "no official counts for this source"}
    if _subset(opts):
        return {"counts": source.expected_counts, "checked": False, "seen": seen,
                "reason": "a subset was asked for (--classes / --limit-per-class)"}
    match = all(seen.get(s) == n for s, n in source.expected_counts.items())
    return {"counts": source.expected_counts, "checked": True, "seen": seen, "match": match}


def prepare(source: Source, out: Path, opts: Options, *, source_arg: str = "", force: bool = False,
            on_chunk: Callable[[str], None] | None = None) -> dict:
    """Prepare `source` into `out`; return the manifest. Idempotent: a finished set is left alone.
    The folder is locked while this process writes it (a second data_prep on it is refused)."""
    if opts.holdout:
        source = with_holdout(source, opts.holdout)
    out = Path(out)
    manifest_path, work = out / "manifest.json", out / WORK
    settings = _settings(source, opts, source_arg)
    if out.exists() and not out.is_dir():
        raise PrepError(f"--out {out} is a file, not a folder; give a folder for the prepared set")
    if manifest_path.is_file() and not force:
        return _complete(out, settings)
    foreign = [_printable(c.id) for c in source.classes if not (_utf8(c.id) and _utf8(c.name))]
    if foreign:  # its images would all be skipped (names.txt is UTF-8): a class with no images
        raise PrepError(f"{source_arg or source.dataset}: class folder name(s) not valid UTF-8: {', '.join(foreign[:5])}; "
                        "rename them (e.g. with convmv) and run again")
    lock = _lock(out)
    try:
        if manifest_path.is_file() and not force:  # another process finished it while we waited to lock
            return _complete(out, settings)
        if force:
            manifest_path.unlink(missing_ok=True)  # first, so a half-redone set never looks complete
            shutil.rmtree(work, ignore_errors=True)
        _check_work(work, settings)
        return _prepare_locked(source, out, opts, settings, source_arg, on_chunk)
    finally:
        os.close(lock)


def _lock(out: Path) -> int:
    """Create `out` and hold an exclusive flock on it (dropped when the descriptor closes)."""
    from reproduction.files import lock_folder
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test.tmp"
        probe.write_bytes(b"")
        probe.unlink()
        fd = lock_folder(out)
    except OSError as e:
        raise PrepError(f"--out {out}: cannot write there ({e.strerror or e}); choose another folder") from None
    if fd is None:
        raise PrepError(f"--out {out} is being prepared by another process now (it holds the folder's lock): "
                        "wait for it to end, or choose another --out")
    return fd


def _complete(out: Path, settings: dict) -> dict:
    """The manifest of a set already complete in `out`, checked against these settings and
    against the files it describes (a hand-edited or foreign manifest is not taken on trust)."""
    manifest_path = out / "manifest.json"
    advice = "use another --out, or --force to redo it"
    try:
        manifest = json.loads(manifest_path.read_text())
        manifest["settings"], manifest["splits"], manifest["dataset"]
    except (ValueError, KeyError, TypeError):
        raise PrepError(f"{manifest_path} is not a data_prep manifest (unreadable, or without settings); "
                        "use another --out, or --force to replace what is there") from None
    diff = _differing(manifest["settings"], settings)
    if diff:
        raise PrepError(f"{out} holds a complete set made with other settings ({', '.join(diff)}); {advice}")
    for split, entry in manifest["splits"].items():
        problem = _split_mismatch(out, split, entry)
        if problem:
            raise PrepError(f"{manifest_path} does not describe the files beside it ({split}: {problem}); {advice}")
    print(f"{manifest_path} exists: the set is complete, nothing to do (--force redoes it)", file=sys.stderr)
    return manifest


def _split_mismatch(out: Path, split: str, entry: dict) -> str | None:
    """What differs between a manifest's split entry and its index and bytes on disk, or None."""
    try:
        index = np.load(out / f"{split}.index.npy")
        size = (out / f"{split}.jpg.bin").stat().st_size
    except (OSError, ValueError) as e:
        return f"{type(e).__name__}: {e}"
    count = entry.get("count") if isinstance(entry, dict) else None
    if count != len(index):
        return f"the manifest says {count} images, {split}.index.npy holds {len(index)}"
    if len(index) and size != int(index[-1, 0] + index[-1, 1]):
        return f"{split}.jpg.bin holds {size:,} bytes, its index ends at {int(index[-1, 0] + index[-1, 1]):,}"
    return None


def _convert_splits(source: Source, opts: Options, work: Path, out: Path, source_arg: str,
                    on_chunk: Callable[[str], None] | None) -> dict[str, list[dict]]:
    """Convert every split into chunks under `work` (in a process pool); their markers per split."""
    pool = multiprocessing.get_context().Pool(opts.workers, initializer=_worker_init) if opts.workers > 1 else None
    markers = {}
    try:
        for s in source.splits:
            try:
                markers[s] = run_split(source, s, opts, work, pool, on_chunk)
            except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, OSError) as e:
                if isinstance(e, OSError) and str(out) in str(getattr(e, "filename", "") or ""):
                    raise  # writing the output failed, not reading the source
                raise PrepError(f"{source_arg or source.dataset}: reading the {s} split failed ({type(e).__name__}: "
                                f"{e}); the source is truncated or damaged. Finished chunks are kept in {work}: "
                                "rerun the same command once the source is whole") from None
    finally:
        if pool is not None:
            stop_pool(pool)
    return markers


def _check_not_empty(source: Source, markers: dict[str, list[dict]], source_arg: str) -> None:
    """Before anything final is written: a set with no train or val images is no set."""
    required = [s for s in source.splits if s in ("train", "val")]  # a held-out set's test may be empty
    empty = [s for s in required if sum(m["stored"] for m in markers[s]) == 0]
    if empty:
        seen = {s: sum(m["records"] for m in markers[s]) for s in empty}
        raise PrepError(f"{source_arg or source.dataset}: the {' and '.join(empty)} split(s) hold no images "
                        f"({', '.join(f'{s}: {seen[s]} records, all skipped' if seen[s] else f'{s}: none found' for s in empty)}; "
                        f"split origin {[source.split_origin.get(s, s) for s in empty]}); give a source with "
                        "images in train and val (or --holdout N to carve val out of train)")


def _prepare_locked(source: Source, out: Path, opts: Options, settings: dict, source_arg: str,
                    on_chunk: Callable[[str], None] | None) -> dict:
    """Convert, assemble, write stats.npz and, last, the manifest."""
    work = out / WORK
    classes = source.classes[: opts.num_classes] if opts.num_classes else source.classes
    hashes = _source_hashes(source, work, opts.hash_sources)
    t0 = time.perf_counter()
    markers = _convert_splits(source, opts, work, out, source_arg, on_chunk)
    convert_seconds = time.perf_counter() - t0
    _check_not_empty(source, markers, source_arg)
    splits, sums = {}, None
    for s in source.splits:
        splits[s], split_sums = assemble_split(out, work, s, markers[s], len(classes))
        splits[s]["stored_from"] = source.split_origin.get(s, s)
        sums = split_sums if s == "train" else sums
    expected = _expected(source, opts, {s: splits[s]["records_seen"] for s in source.splits})
    _report_counts(expected, opts.strict_counts)
    converted = [c for ms in markers.values() for m in ms for c in m["converted"]]
    manifest = {
        "format": FORMAT, "dataset": source.dataset,
        "classes": [{"index": c.index, "id": c.id, "name": c.name,
                     **({"ilsvrc_id": c.ilsvrc_id} if c.ilsvrc_id is not None else {})} for c in classes],
        "image_size": source.native_size or image.PAPER_SIZE, "jpeg_quality": opts.quality,
        "geometry": _geometry(source, opts), "splits": splits, "stats": _write_stats(out, sums, opts, source),
        "sources": hashes, "skipped": [s for ms in markers.values() for m in ms for s in m["skipped"]],
        "converted": converted, "converted_counts": dict(Counter(c["from"] for c in converted)),
        "settings": settings, "expected_counts": expected, "notes": source.notes,
        "tool": {"name": "data_prep", "version": TOOL_VERSION, **_git_info()},
        "seconds": {"convert": round(convert_seconds, 1), "total": round(time.perf_counter() - t0, 1)},
    }
    _atomic_write(out / "manifest.json", lambda f: f.write(json.dumps(manifest, indent=1).encode()))
    if not opts.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    return manifest


def _geometry(source: Source, opts: Options) -> str:
    if source.native_size:
        return (f"stored at the native {source.native_size}x{source.native_size}, unscaled; the loader "
                "upsamples to 256x256 (bilinear, align_corners=False, antialias=False)")
    return (f"§2: shorter side rescaled to 256 with PIL {opts.resample} (long side rounded), "
            "then the central 256x256 (offset floor(excess/2))")


def _report_counts(expected: dict, strict: bool) -> None:
    if not expected.get("checked") or expected["match"]:
        return
    msg = f"WARNING: image counts {expected['seen']} differ from the official {expected['counts']}"
    print("!" * 80 + "\n" + msg + "\n" + "!" * 80, file=sys.stderr, flush=True)
    if strict:
        raise PrepError(msg + " (--strict-counts)")


def _write_stats(out: Path, sums: stats.StatSums | None, opts: Options, source: Source) -> dict:
    """stats.npz: computed (§4.1) or Krizhevsky's constants; the manifest gets both side by side."""
    if sums is None or sums.images == 0:
        raise PrepError("the train split stored no image: no statistics can be computed")
    computed = stats.finish(sums)
    reference = stats.from_constants(opts.constants) if opts.constants and Path(opts.constants).is_file() else None
    chosen = reference if opts.stats == "cuda-convnet2" else computed
    if opts.stats == "cuda-convnet2":
        stats.save(out / "stats.computed.npz", computed)
    stats.save(out / "stats.npz", chosen)
    entry = {"source": opts.stats, "count": int(chosen["count"]), **stats.summary(chosen)}
    entry["computed_on"] = ("the stored pixels before JPEG encoding (the source pixels when stored unchanged)"
                            + (f"; mean at native {source.native_size}x{source.native_size}, upsampled "
                               "once by the loader's bilinear rule; covariance over native pixels"
                               if source.native_size else ""))
    if reference is not None:
        entry["vs_krizhevsky"] = stats.compare(computed, reference)
    return entry
