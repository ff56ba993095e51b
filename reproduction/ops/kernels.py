"""The CPU kernels of the fast path (`kernels.c`: the LRN operator's forward and backward, §5's
update in one pass), built with the system's C compiler on first use and called through ctypes.

Built once per source, compiler and CPU into ~/.cache/reproduction (or $XDG_CACHE_HOME), in
about a second; a user needs `cc` or `gcc` (or $CC), nothing else (no Python headers, no
ninja). Where no compiler is found `library()` returns None and the callers use their plain
PyTorch forms, saying so once. `-march=native`: the build is for this CPU (its AVX-512 / AMX
units), hence the CPU's model and flags in the cache key.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

SOURCE = Path(__file__).with_name("kernels.c")
# -ffp-contract=off: no fused multiply-adds, so each product and sum is rounded as written.
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-ffp-contract=off", "-fPIC", "-shared", "-pthread"]

_lib = None
_lock = threading.Lock()
_tried = False


def library():
    """The compiled kernels (a ctypes library), built on first use; None where they cannot be."""
    global _lib, _tried
    if _tried:
        return _lib
    with _lock:
        if not _tried:
            try:
                _lib = _load(_build())
            except (OSError, subprocess.SubprocessError, RuntimeError) as e:
                print(f"warning: the CPU kernels could not be built ({e}); using plain PyTorch for the LRN "
                      f"and the update instead (the same formulas, slower). Install a C compiler (gcc) "
                      f"for the fast ones.", file=sys.stderr)
            _tried = True
    return _lib


def _build() -> Path:
    compiler = shlex.split(os.environ.get("CC", "")) or [shutil.which("cc") or shutil.which("gcc") or ""]
    if not compiler[0]:
        raise RuntimeError("no C compiler (cc or gcc) on PATH")
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join([*compiler, *FLAGS, _cpu()]).encode()).hexdigest()[:16]
    for cache in _caches():
        target = cache / f"kernels-{key}.so"
        if target.exists():
            return target
        try:
            cache.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=cache, prefix=".kernels-", suffix=".so")
        except OSError:
            continue  # an unwritable cache (a read-only home): the next one
        os.close(fd)
        try:
            done = subprocess.run([*compiler, *FLAGS, str(SOURCE), "-o", tmp, "-lm"], capture_output=True,
                                  text=True, timeout=120)
            if done.returncode:
                raise RuntimeError(f"{shlex.join(compiler)} failed: {done.stderr.strip()[-500:]}")
            os.replace(tmp, target)  # a concurrent build of the same key writes the same bytes
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return target
    raise RuntimeError(f"no writable cache folder ({', '.join(map(str, _caches()))})")


def _caches() -> list[Path]:
    """Where the built library goes: ~/.cache/reproduction (or $XDG_CACHE_HOME), else a folder
    of this user's in the system's temporary directory."""
    home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "reproduction"
    return [home, Path(tempfile.gettempdir()) / f"reproduction-{os.getuid() if hasattr(os, 'getuid') else 'user'}"]


def _load(path: Path):
    lib = ctypes.CDLL(str(path))
    i64, p, f32, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float, ctypes.c_int
    strides = ctypes.POINTER(i64)
    lib.lrn.argtypes = [p, p, p, i32, i64, i64, i64, strides, strides, strides, i32, i32, f32, f32, f32, i32, i32]
    lib.lrn.restype = i32
    lib.paper_sgd.argtypes = [p, p, p, i64, f32, f32, f32, i32]
    lib.paper_sgd.restype = None
    return lib


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    pick = lambda key: next((l.split(":", 1)[1].strip() for l in lines if l.startswith(key)), "")
    return f"{pick('model name')} {pick('flags')}"
