"""Expected failures, said the same way by every command.

An expected failure (bad input, a missing, corrupt or foreign file, an interrupt) ends in one
line on stderr, `error: <what>, <which file>, <what to do>`, exit status 2 (1 for a run the
guard stopped, 130 for Ctrl-C or SIGTERM), and no traceback. An unexpected bug keeps its
traceback. Set REPRODUCTION_DEBUG=1 to see the traceback of an expected failure too (for a bug
report).

    raise UserError(f"{path} is not a checkpoint: re-run training or pass another --checkpoint")

    with reading(path, "checkpoint", "pass a checkpoint.pt written by reproduction.train"):
        state = torch.load(path)          # any failure here names the file and what to do

    def main(argv=None) -> int:
        return run_cli(_main, argv)
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import sys
import tarfile
import threading
import zipfile
import zlib
from pathlib import Path
from typing import Callable, Iterator, Sequence


class UserError(Exception):
    """An expected failure; its message names what, which file, and what to do."""
    exit_code = 2


def debugging() -> bool:
    return os.environ.get("REPRODUCTION_DEBUG", "") not in ("", "0")


# What reading a damaged or foreign file raises (torch.load, np.load, json, tarfile, PIL, pickle).
READ_ERRORS = (OSError, ValueError, KeyError, IndexError, TypeError, AttributeError, EOFError,
               RuntimeError, UnicodeError, pickle.UnpicklingError, zipfile.BadZipFile, tarfile.TarError,
               zlib.error)


@contextlib.contextmanager
def reading(path: str | os.PathLike, what: str, advice: str) -> Iterator[None]:
    """Turn any failure to read `path` as a `what` into one UserError naming the file."""
    try:
        yield
    except UserError:
        raise
    except FileNotFoundError as e:
        inner = f" ({Path(e.filename).name} is missing)" if e.filename and str(e.filename) != str(path) else ""
        raise UserError(f"{path}: no such file{inner} ({what}); {advice}") from None
    except IsADirectoryError:
        raise UserError(f"{path} is a folder, not a {what}; {advice}") from None
    except PermissionError:
        raise UserError(f"{path}: permission denied reading the {what}; {advice}") from None
    except READ_ERRORS as e:
        detail = str(e).splitlines()[0] if str(e).strip() else ""
        detail = detail if len(detail) <= 100 else detail[:100].rsplit(" ", 1)[0] + " ..."
        raise UserError(f"{path} is not a readable {what} ({type(e).__name__}{': ' + detail if detail else ''}); "
                        f"{advice}") from None


def writable_folder(path: str | os.PathLike, what: str = "output folder") -> Path:
    """Create `path` as a folder (and its parents), or say in one line why it cannot be."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{path} is a file, not a folder ({what}); give a folder path")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{path}: cannot create the {what} ({e.strerror or e}); choose another path") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"{path}: the {what} is not writable; choose another path or fix its permissions")
    return path


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (what schedulers and `timeout` send) raises KeyboardInterrupt, as Ctrl-C does."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_cli(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None,
            prefix: str = "error") -> int:
    """Call a command's main, turning expected failures into one line and an exit status."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C is KeyboardInterrupt again
    try:
        return main(argv)
    except UserError as e:
        if debugging():
            raise
        print(f"{prefix}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        if debugging():
            raise
        return 130


def writable_file(path: str | os.PathLike, option: str, *, inputs: Sequence[str | os.PathLike] = ()) -> Path:
    """Check, before any long work, that a command may write the file `path` (named by `option`
    in the message): not one of its `inputs` or a file inside an input folder, not a folder, and
    its folder writable (or creatable). Creates nothing, so a refusal leaves everything as it was."""
    path = Path(path)
    for given in map(Path, inputs):
        if _same_file(path, given) or (given.is_dir() and path.exists() and _inside(path, given)):
            raise UserError(f"{option} {path} would overwrite the input {given}; write to another path")
    if path.is_dir():
        raise UserError(f"{option} {path} is a folder; give a file name")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise UserError(f"{option} {path}: {folder} is a file, not a folder; choose another path")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"{option} {path}: {folder} is not writable; choose another path or fix its permissions")
    if path.exists() and not os.access(path, os.W_OK):
        raise UserError(f"{option} {path} is read-only; choose another path or fix its permissions")
    return path


def _same_file(a: Path, b: Path) -> bool:
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return os.path.realpath(a) == os.path.realpath(b)


def _inside(path: Path, folder: Path) -> bool:
    return Path(os.path.realpath(folder)) in Path(os.path.realpath(path)).parents
