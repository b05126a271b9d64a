"""Errors a user can fix, said in one line: the config's own error, a did-you-mean for near misses, and
the first line of any library's exception (the rest is a traceback the user did not ask for)."""

from __future__ import annotations

import difflib
import stat
from collections.abc import Iterable
from pathlib import Path


class UserError(Exception):
    """Something the user can fix or must know, said in one line with no traceback (the first process says it,
    every process exits with `exit_code`): 2 for bad input (config, data, a folder in use), 1 for a run that
    cannot go on (a checkpoint, a non-finite step). Each user-facing error derives from it, so an entry point
    catches this one class."""

    exit_code = 2


class RunError(UserError):
    """The input was fine, but the run cannot go on (exit 1): a checkpoint, an export, a non-finite step."""

    exit_code = 1


class NonFiniteStep(RunError, FloatingPointError):
    """A step was not finite and training.on_nonfinite says stop."""


class ConfigError(UserError, ValueError):
    """A config value is unknown, mistyped or impossible; the message names the key."""


def did_you_mean(word: object, options: Iterable[object]) -> str:
    """' (did you mean "x"?)' for a near miss among `options`, else nothing."""
    found = difflib.get_close_matches(str(word), [str(o) for o in options], n=1, cutoff=0.6)
    return f' (did you mean "{found[0]}"?)' if found else ""


def first_line(error: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (its type when it has none), at most `limit` characters."""
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:limit]


def not_a_file(path: Path) -> str | None:
    """Why `path` cannot be opened as a file, or None: checked before opening, since a named pipe would block
    the read forever and a directory named `*.jsonl` fails inside it."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return "does not exist"
    except OSError as e:
        return f"cannot be read ({e.strerror or type(e).__name__})"
    if stat.S_ISREG(mode):
        return None
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))
    return f"is {next((kind for test, kind in kinds if test(mode)), 'not a regular file')}, not a file"

