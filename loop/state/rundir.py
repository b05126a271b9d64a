"""The run's output directory: one run at a time, and nothing in it before the run is known to be sound.

Before any work, `check_writable` says (writing nothing) whether the directory can be written at all and
whether another run holds it. A run claims the directory only after its config, data and resume have been
checked: it takes an advisory lock (`.run.lock`, held for the run's life, released by the OS whatever way
the process ends), then writes the resolved config and starts `train.log`, replaying what was logged
before. A second run on the same directory is refused with the first one's host and process id; a lock
file left behind by a run that is gone is taken over with a warning.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from loop.config import ConfigError, first_line
from loop.processes import any_process

LOCK = ".run.lock"
PREEMPTED = "PREEMPTED"  # written when a run exits 75, read by tools/launch.py to exit 75 too


class DirectoryInUse(RuntimeError):
    """Another run holds the output directory."""


def check_writable(output_dir: Path, what: str = "output.output_dir") -> None:
    """Refuse, writing nothing, an output directory that cannot be created or written (a file stands in its
    way, a read-only file system, no permission) or that another run holds."""
    existing = next(p for p in [output_dir, *output_dir.absolute().parents] if os.path.lexists(p))
    if not existing.is_dir():
        raise ConfigError(f"{what}: {existing} is {'a file' if existing.exists() else 'a broken link'}, not a "
                          f"directory, so {output_dir} cannot be created; choose another {what}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{what}: {existing} is not writable (a read-only file system, or no permission), so "
                          f"{output_dir} cannot be written; choose another {what}")
    lock = output_dir / LOCK
    if lock.is_file():
        fd = os.open(lock, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released at once, with the file: only a probe
        except BlockingIOError:
            raise in_use(output_dir, os.read(fd, 4096).decode(errors="replace").strip()) from None
        finally:
            os.close(fd)


def in_use(output_dir: Path, holder: str) -> DirectoryInUse:
    return DirectoryInUse(f"output.output_dir {output_dir} is in use by another run ({holder or 'unknown'}); "
                          "wait for it to end or choose another output_dir")


@contextmanager
def claimed(output_dir: Path, is_main: bool) -> Iterator[str | None]:
    """Hold the output directory's lock (main process) for the block; yields a warning when a stale
    lock was taken over."""
    if not is_main:
        yield None
        return
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(output_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:  # check_writable passed, and then the disk filled or the directory went read-only
        raise ConfigError(f"output.output_dir: cannot write {output_dir} ({first_line(e)})") from None
    held = False
    try:
        previous = os.read(fd, 4096).decode(errors="replace").strip()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise in_use(output_dir, previous) from None
        held = True
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
                  .encode(), 0)
        yield (f"took over the lock of a run that is gone ({previous})" if previous else None)
    finally:
        if held:  # a run that ends (even preempted or failing) leaves no name: only one that died does
            os.ftruncate(fd, 0)
        os.close(fd)  # releases the lock


def claim(held: ExitStack, output_dir: Path, accelerator) -> str | None:
    """Claim the directory (main process) for as long as `held` is open, every process agreeing on the
    outcome so that none is left waiting when it is refused; returns the stale-lock warning, if any."""
    took_over, refused = None, None
    try:
        took_over = held.enter_context(claimed(output_dir, accelerator.is_main_process))
    except (DirectoryInUse, ConfigError) as e:
        refused = e
    if any_process(accelerator, refused is not None):
        raise refused or DirectoryInUse(f"output.output_dir {output_dir}: refused by the main process")
    return took_over


def start_log_file(output_dir: Path, log: logging.Logger) -> None:
    """Send the log to OUTPUT_DIR/train.log too, beginning with what was logged before the claim; the run
    has begun, so an earlier run's preemption mark goes."""
    from logging.handlers import MemoryHandler

    (output_dir / PREEMPTED).unlink(missing_ok=True)

    file = logging.FileHandler(output_dir / "train.log")
    file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    file.addFilter(lambda record: getattr(record, "only", "file") == "file")
    for early in [h for h in log.handlers if isinstance(h, MemoryHandler)]:
        early.setTarget(file)
        early.close()  # flushes the early lines into the file
        log.removeHandler(early)
    log.addHandler(file)
