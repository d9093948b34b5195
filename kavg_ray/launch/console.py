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
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

LOGS_DIR = "logs"


def log_path(sweep_dir: Path, kind: str = "sweep") -> Path:
    """``<sweep>/logs/<kind>-YYYYmmdd-HHMMSS.log`` (nothing is created)."""
    return sweep_dir / LOGS_DIR / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}.log"


def rich_console(echo: Callable[[str], None]) -> Any:
    """A rich Console on the terminal behind ``echo`` when that is a terminal (a live
    progress bar), else None (plain lines: CI, a pipe, a log file)."""
    stream = getattr(echo, "terminal", sys.stdout)
    if not stream.isatty():
        return None
    from rich.console import Console

    return Console(file=stream)


def _open_log(path: Path, staged: bool) -> tuple[int, Path | None]:
    """The fd the output goes to, and the temporary file it is staged in (None: ``path``)."""
    if not staged:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644), None
    log_fd, staged_name = tempfile.mkstemp(prefix="kavg-connect-", suffix=".log")
    os.fchmod(log_fd, 0o644)
    return log_fd, Path(staged_name)


def _move_stage(stage: Path, path: Path) -> int:
    """Append the staged output to ``path`` (its folder created), point fds 1 and 2 at it
    and remove the stage; returns the new fd (to close at the end)."""
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    path.parent.mkdir(parents=True, exist_ok=True)
    final = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    with open(stage, "rb") as staged_out:
        while chunk := staged_out.read(1 << 20):
            os.write(final, chunk)
    os.dup2(final, 1)
    os.dup2(final, 2)
    os.unlink(stage)
    return final


@contextlib.contextmanager
def quiet(path: Path | None, staged: bool = False) -> Iterator[Callable[[str], None]]:
    """Within: fds 1 and 2 append to ``path``; yields an echo to the real stdout.

    ``path`` None: nothing is redirected and the echo prints to stdout (``--verbose``).
    ``staged``: the output goes to a temporary file outside ``path``'s folder until
    ``echo.settle()``, which creates the folder and moves it there: joining a cluster
    that fails writes nothing under the storage (``echo.log``: where the output is now).
    """
    if path is None:

        def plain(line: str) -> None:
            print(line, flush=True)

        plain.log, plain.settle = None, lambda: None  # type: ignore[attr-defined]
        yield plain
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    terminal = os.fdopen(os.dup(saved_out), "w", buffering=1, encoding="utf-8")
    log_fd, stage = _open_log(path, staged)
    fds = [saved_out, saved_err, log_fd]
    try:
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)

        def echo(line: str) -> None:
            terminal.write(line + "\n")
            terminal.flush()

        def settle() -> None:
            nonlocal stage
            if stage is not None:
                fds.append(_move_stage(stage, path))
                stage, echo.log = None, path  # type: ignore[attr-defined]

        echo.terminal = terminal  # type: ignore[attr-defined] - for rich_console
        echo.log, echo.settle = stage or path, settle  # type: ignore[attr-defined]
        yield echo
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os.dup2(saved_out, 1)
        os.dup2(saved_err, 2)
        for fd in fds:
            os.close(fd)
        terminal.close()
