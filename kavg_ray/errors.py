"""The project's errors: one base class that carries the command line's exit code.

The CLI maps :class:`KavgError` once: exit code ``exit_code`` with the message as one line
on stderr, no traceback. Bad input (a spec, a name, a file, an address) is 2 and is raised
before anything is launched; a failure at run time is 1.
"""

from __future__ import annotations

MAX_MESSAGE_CHARS = 1_000


def one_line(text: object) -> str:
    """``text`` with control characters escaped and whitespace runs kept, capped in length."""
    out = "".join(
        c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in str(text)
    )
    if len(out) > MAX_MESSAGE_CHARS:
        out = out[: MAX_MESSAGE_CHARS - 3] + "..."
    return out


class KavgError(Exception):
    """An error meant for the user: a one-line message and the exit code it ends with."""

    exit_code = 1

    def __init__(self, message: object, exit_code: int | None = None) -> None:
        super().__init__(one_line(message))
        if exit_code is not None:
            self.exit_code = exit_code


class BadInputError(KavgError):
    """Input that cannot be run (a spec, a name, a file, an option): exit code 2."""

    exit_code = 2


class ConfigError(BadInputError):
    """A config or sweep spec that cannot be run."""


class ResultsError(BadInputError):
    """A results problem the user can fix (unknown sweep, unreadable file)."""


class SweepError(KavgError):
    """A sweep that cannot start (the cluster cannot place it, the name is taken...)."""

    exit_code = 2


class JobsError(KavgError):
    """A Ray Jobs command that cannot go on: 2 for bad input, 1 for a cluster that fails."""

    def __init__(self, message: object, exit_code: int | None = None) -> None:
        super().__init__(" ".join(str(message).split()), exit_code)


class PlotDataError(BadInputError, ValueError):
    """The frames lack the data a plot needs (no completed trial, no P=1 baseline...)."""
