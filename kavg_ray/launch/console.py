"""What a sweep shows on the terminal, and where the rest goes.

Ray, Tune and Ray Train talk a lot: status tables, forwarded worker logs, warnings from
their C++ core. Unless ``--verbose``, :func:`quiet` points this process's file
descriptors 1 and 2 (so Python's ``print``, the ``logging`` handlers Ray installed, the
lines Ray forwards from workers and anything the C++ core writes) at a log file under the
sweep's folder for the duration of the Ray part, and hands back an ``echo`` that still
reaches the terminal: kavg's own lines (a trial's start and end, the progress bar, the
epoch lines of ``kavg train``) are all that shows there.

Imports no Ray.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

LOGS_DIR = "logs"


def log_path(sweep_dir: Path, kind: str = "sweep") -> Path:
    """``<sweep>/logs/<kind>-YYYYmmdd-HHMMSS.log`` (the folder is created)."""
    folder = sweep_dir / LOGS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}.log"


def rich_console(echo: Callable[[str], None]) -> Any:
    """A rich Console on the terminal behind ``echo`` when that is a terminal (a live
    progress bar), else None (plain lines: CI, a pipe, a log file)."""
    stream = getattr(echo, "terminal", sys.stdout)
    if not stream.isatty():
        return None
    from rich.console import Console

    return Console(file=stream)


@contextlib.contextmanager
def quiet(path: Path | None) -> Iterator[Callable[[str], None]]:
    """Within: fds 1 and 2 append to ``path``; yields an echo to the real stdout.

    ``path`` None: nothing is redirected and the echo prints to stdout (``--verbose``).
    """
    if path is None:
        yield lambda line: print(line, flush=True)
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    terminal = os.fdopen(os.dup(saved_out), "w", buffering=1, encoding="utf-8")
    log_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)

        def echo(line: str) -> None:
            terminal.write(line + "\n")
            terminal.flush()

        echo.terminal = terminal  # type: ignore[attr-defined] - for rich_console
        yield echo
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os.dup2(saved_out, 1)
        os.dup2(saved_err, 2)
        for fd in (saved_out, saved_err, log_fd):
            os.close(fd)
        terminal.close()
