"""Expected failures, said the same way by every command.

An expected failure (bad input, a missing, corrupt or foreign file, an interrupt) ends in one
line on stderr, `error: <what>, <which file>, <what to do>`, exit status 2 (130 for Ctrl-C or
SIGTERM), and no traceback. An unexpected bug keeps its traceback. Set
REPRODUCTION_DEBUG=1 to see the traceback of an expected failure too (for a bug report).

    raise UserError(f"{path} is not a checkpoint: re-run training or pass another --checkpoint")

    def main(argv=None) -> int:
        return run_cli(_main, argv)
"""

from __future__ import annotations

import os
import sys
from typing import Callable, Sequence


class UserError(Exception):
    """An expected failure; its message names what, which file, and what to do."""


def debugging() -> bool:
    return os.environ.get("REPRODUCTION_DEBUG", "") not in ("", "0")


def run_cli(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None,
            prefix: str = "error") -> int:
    """Call a command's main, turning expected failures into one line and an exit status."""
    try:
        return main(argv)
    except UserError as e:
        if debugging():
            raise
        print(f"{prefix}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if debugging():
            raise
        return 130
