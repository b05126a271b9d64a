"""The run's output directory: one run at a time, and nothing in it before the run is known to be sound.

Before any work, `check_writable` says (writing nothing) whether the directory can be written at all and
whether another run holds it, and `check_fresh` refuses a fresh run (no --resume_from_checkpoint) into a
directory where another run left checkpoints, a model or logs: writing over it would mix the two runs' logs
and models. With output.overwrite_output_dir the claim moves that run into OUTPUT_DIR/previous-TIME/ first.

A run claims the directory only after its config, data and resume have been
checked: it takes an advisory lock (`.run.lock`, held for the run's life, released by the OS whatever way
the process ends), then writes the resolved config and starts `train.log`, replaying what was logged
before. A second run on the same directory is refused with the first one's host and process id; a lock
file left behind by a run that is gone is taken over with a warning (after waiting for a killed run on this
host to finish exiting, which can outlast a requeue's start). Right after the claim, a run of several
processes checks that they all see the same directory (`check_shared`), so that nodes without a shared file
system are refused before the first step, not at the first checkpoint.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import secrets
import signal
import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path

from loop.config import ConfigError, UserError, first_line
from loop.processes import any_process, main_decides

LOCK = ".run.lock"
NOT_A_RUN = (LOCK, "reference")  # the lock and the reference log-probabilities' cache (keyed by its content)
ASIDE = "previous-"  # where --overwrite_output_dir moves an earlier run: OUTPUT_DIR/previous-YYYYmmdd-HHMMSS/
PREEMPTED = "PREEMPTED"  # written when a run stops on a signal (step, exit code); tools/launch.py exits so too
MARKER = ".same-folder-"  # MARKER + TOKEN-RANK: what each process writes to show the directory it sees


class DirectoryInUse(UserError, RuntimeError):
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
            holder = os.read(fd, 4096).decode(errors="replace").strip()
            if not take(fd, holder):
                raise in_use(output_dir, holder)
        finally:
            os.close(fd)  # released at once, with the file: only a probe


def earlier_run(output_dir: Path) -> list[Path]:
    """What an earlier run left in the directory (checkpoints, models, logs, config), oldest name first."""
    if not output_dir.is_dir():
        return []
    return sorted(p for p in output_dir.iterdir() if p.name not in NOT_A_RUN and not p.name.startswith((ASIDE, MARKER)))


def describe(found: list[Path]) -> str:
    said = []
    for p in found[:6]:
        steps = sorted(c.name for c in p.glob("step_*")) if p.name == "checkpoints" else []
        said.append(f"checkpoints/ ({', '.join(steps[-2:])})" if steps else p.name + ("/" if p.is_dir() else ""))
    return ", ".join(said) + (f" and {len(found) - 6} more" if len(found) > 6 else "")


def check_fresh(output_dir: Path, resume: str | None, overwrite: bool) -> None:
    """Refuse, writing nothing, a fresh run into a directory another run has written to."""
    found = [] if resume or overwrite else earlier_run(output_dir)
    if found:
        raise ConfigError(f"output.output_dir {output_dir} holds another run ({describe(found)}); continue it with "
                          "--resume_from_checkpoint latest, or start over with --overwrite_output_dir true (which "
                          f"moves it into {output_dir / (ASIDE + 'TIME')}/), or choose another --output_dir")


def move_aside(output_dir: Path) -> str | None:
    """Move what an earlier run left into OUTPUT_DIR/previous-TIME/ (nothing is deleted); says where."""
    found = earlier_run(output_dir)
    if not found:
        return None
    said, aside = describe(found), output_dir / f"{ASIDE}{time.strftime('%Y%m%d-%H%M%S')}"
    aside.mkdir()
    for p in found:
        p.rename(aside / p.name)
    return f"--overwrite_output_dir: moved the earlier run ({said}) into {aside}; delete it when done"


DYING_GRACE = 60.0  # seconds to wait for a killed run's lock: its exit can outlast a requeue's start


def take(fd: int, holder: str) -> bool:
    """Take the lock on `fd`; False while a live run holds it. A run killed on this host (`kill -9`, a
    requeue) keeps the lock until the kernel has finished its exit, which can take seconds while it is
    stuck in disk I/O: its successor waits for that instead of being refused."""
    deadline, said = time.monotonic() + DYING_GRACE, False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if not holder_is_dying(holder) or time.monotonic() > deadline:
                return False
            if not said:
                logging.getLogger("loop").info(f"waiting for a killed run to finish exiting ({holder})")
                said = True
            time.sleep(0.1)


def holder_is_dying(holder: str) -> bool:
    """Whether the lock's holder ("pid N on HOST since ...") is a process on this host that is gone, a
    zombie, or has SIGKILL pending: its lock is on the way out (a holder on another host: never)."""
    words = holder.split()
    if len(words) < 4 or words[0] != "pid" or not words[1].isdigit() or words[3] != socket.gethostname():
        return False
    try:
        status = Path(f"/proc/{words[1]}/status").read_text()
    except OSError:  # gone (or no /proc: then we cannot tell, and a gone holder's lock is free already)
        return True
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    pending = int(fields.get("SigPnd", "0"), 16) | int(fields.get("ShdPnd", "0"), 16)
    return fields.get("State", "").split()[:1] in (["Z"], ["X"]) or bool(pending & 1 << (signal.SIGKILL - 1))


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
    lock = output_dir / LOCK
    for _ in range(3):  # a run that ends removes its lock file: one opened just before is not the lock any more
        try:
            output_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:  # check_writable passed, and then the disk filled or the directory went read-only
            raise ConfigError(f"output.output_dir: cannot write {output_dir} ({first_line(e)})") from None
        previous = os.read(fd, 4096).decode(errors="replace").strip()
        if not take(fd, previous):
            os.close(fd)
            raise in_use(output_dir, previous)
        with contextlib.suppress(FileNotFoundError):
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                break
        os.close(fd)
    else:
        raise in_use(output_dir, "its lock file keeps changing")
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
                  .encode(), 0)
        yield (f"took over the lock of a run that is gone ({previous})" if previous else None)
    finally:  # a run that ends (even preempted or failing) leaves no lock file: only one that died does
        with contextlib.suppress(OSError):
            lock.unlink()
        os.close(fd)  # releases the lock


def claim(held: ExitStack, output_dir: Path, accelerator, overwrite: bool = False) -> list[str]:
    """Claim the directory (main process) for as long as `held` is open, every process agreeing on the
    outcome so that none is left waiting when it is refused; with `overwrite`, an earlier run is moved
    aside once the lock is held. Returns what to warn about (a stale lock taken over, a run moved)."""
    said: list[str | None] = []
    refused = None
    try:
        said.append(held.enter_context(claimed(output_dir, accelerator.is_main_process)))
        if overwrite and accelerator.is_main_process:
            said.append(move_aside(output_dir))
    except (DirectoryInUse, ConfigError) as e:
        refused = e
    except OSError as e:
        refused = ConfigError(f"output.overwrite_output_dir: cannot move the earlier run aside ({first_line(e)})")
    if any_process(accelerator, refused is not None):
        raise refused or DirectoryInUse(f"output.output_dir {output_dir}: refused by the main process")
    return [s for s in said if s]


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


def check_shared(output_dir: Path, accelerator) -> None:
    """Refuse (every process, one line) a run whose processes do not all see the same output directory: each
    writes a marker (its rank, host and a token new to this run) into it, and the main process must find every
    one. Otherwise each node would write its shards of a checkpoint into its own folder, and the run would be
    refused only when the first checkpoint is put together (integrity.missing_files)."""
    if accelerator.num_processes == 1:
        return
    from accelerate.utils import gather_object

    token = main_decides(accelerator, lambda: secrets.token_hex(8), ())
    rank, host = accelerator.process_index, socket.gethostname()
    mine = output_dir / f"{MARKER}{token}-{rank}"
    with suppress(OSError):  # a node whose directory does not exist writes nothing: the main process cannot find it
        mine.write_text(f"{rank} {host} {token}\n")
    hosts = gather_object([host])  # every process's host, in rank order; every marker is written by now

    def unseen() -> list[int]:
        def found(r: int) -> bool:
            try:
                return (output_dir / f"{MARKER}{token}-{r}").read_text() == f"{r} {hosts[r]} {token}\n"
            except OSError:  # missing, or not readable: not seen either way
                return False

        return [r for r in range(accelerator.num_processes) if not found(r)]

    missing = main_decides(accelerator, unseen, ())  # the main process has read them all before any goes
    with suppress(OSError):  # an error on one process only would leave the others waiting
        mine.unlink(missing_ok=True)
    if missing:
        ranks: dict[str, list[str]] = {}
        for r in missing:
            ranks.setdefault(hosts[r], []).append(str(r))
        where = "; ".join(f"{h} (rank {', '.join(rs[:4])}{', ...' if len(rs) > 4 else ''})" for h, rs in ranks.items())
        raise ConfigError(f"output.output_dir {output_dir} is not the same folder for every process: the main "
                          f"process on {hosts[0]} cannot see what {len(missing)} process(es) on {where} wrote "
                          "there; put it on a file system every node shares (NFS, Lustre, ...), given by the "
                          "same absolute path: each checkpoint needs every process's files in one folder")
