"""Files a crash never leaves half-written: each is written to a temporary file beside its
place and renamed over it. JSON holds finite numbers only (json's NaN/Infinity are not JSON)."""

from __future__ import annotations

import fcntl
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from reproduction.errors import UserError, reading


class NonFinite(UserError):
    """A run produced a NaN or an infinity; it is never recorded as a result."""
    exit_code = 1


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def read_json_file(path: Path, what: str, advice: str) -> Any:
    """read_json for a file a user handed us: any failure is one line naming the file."""
    with reading(path, what, advice):
        return read_json(path)


def dumps(value: Any, **kw) -> str:
    """JSON with finite numbers only (json's NaN/Infinity are not JSON)."""
    try:
        return json.dumps(value, allow_nan=False, **kw)
    except ValueError:
        raise NonFinite(f"refusing to write a non-finite number into JSON: {nonfinite(value)}") from None


def write_json(path: Path, value: Any) -> None:
    """Write JSON atomically (temporary file in the same folder, then rename)."""
    text = dumps(value, indent=2)
    atomic_write(path, lambda f: f.write(text.encode() + b"\n"))


def finite(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(finite(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(finite(v) for v in value)
    return True


def nonfinite(value: Any, where: str = "") -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return f"{where or 'value'} = {value}"
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else ()
    for k, v in items:
        found = nonfinite(v, f"{where}.{k}" if where else str(k))
        if found:
            return found
    return ""


def atomic_write(path: Path, write: Callable) -> None:
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



def lock_folder(path: Path) -> int | None:
    """An exclusive flock on the folder itself (no lock file to leave behind): its descriptor,
    which holds the lock until closed, or None where another process holds it. OSError where
    the folder cannot be opened."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd
