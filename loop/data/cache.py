"""The prepared-data cache trusted the way a checkpoint is: every file's size and content digest written with
it, checked before a run uses it, and work folders that no two preparers share and no dead one leaves behind.

- A record (meta.json for a prepared folder, rows-KEY.json for a packing kept beside it) lists each file's
  size and XXH3 digest (the `xxhash` package, a dependency of `datasets`; the checkpoints' digest too) and
  a digest of the record itself; it is written last, so a folder without a whole record is not a cache.
  Checking costs little: 1M chatterbot-size dialogues are 126 MB of cache, verified in 15-30 ms from the
  page cache and 50 ms from disk (hashed from memory maps, on a 2-core VM). `check` says in one line why a
  folder cannot be trusted; the caller prepares it again.
- A preparation works in `.tmp-KEY-HOST-PID-RANDOM` (unique across hosts and PID namespaces, which repeat
  PIDs) and holds an flock on a file inside it while it lives; a work folder whose lock anyone can take is
  a dead preparation's and is removed by the next run that looks its data up (a lock, not a PID: a PID
  says nothing on another node or in another container).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import mmap
import os
import secrets
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import xxhash

LOCK = ".lock"  # held (flock) by the preparation working in the folder
WORK, STALE = ".tmp-", ".stale-"  # a preparation's work folder; a folder that did not verify, being removed
UNLOCKED_AFTER = 600  # seconds: a work folder without its lock file (its preparer died before making it)


class Unverified(Exception):
    """A cache folder or file that cannot be trusted; the message says why in a few words."""


def digest(path: Path) -> str:
    """A file's XXH3 digest, hashed from a memory map: reading it in blocks costs 15 times as long (copies)."""
    with path.open("rb") as f:
        if not os.fstat(f.fileno()).st_size:
            return xxhash.xxh3_128().hexdigest()
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as view:
            return xxhash.xxh3_128(view).hexdigest()


def _own_digest(record: dict) -> str:
    return xxhash.xxh3_128(json.dumps(record, sort_keys=True).encode()).hexdigest()


def temporary(path: Path) -> Path:
    """A name beside `path` to write it under first, unique across hosts and PID namespaces (same suffix)."""
    return path.with_name(f".{path.stem}.{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}{path.suffix}")


def write_record(path: Path, names: list[str], values: dict) -> None:
    """`values` with the size and digest of each file `names` (beside `path`) and the record's own digest,
    written under a temporary name and renamed: a reader sees a whole record or none."""
    files = {name: [(path.parent / name).stat().st_size, digest(path.parent / name)] for name in names}
    record = {**values, "files": files}
    tmp = temporary(path)
    tmp.write_text(json.dumps({**record, "digest": _own_digest(record)}, indent=1))
    tmp.replace(path)


def check(path: Path) -> dict:
    """The record at `path` (without its digests) once it and every file it lists verify; Unverified if not
    (PermissionError when a file cannot be read at all)."""
    try:
        record = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise Unverified(f"{path.name} is missing") from None
    except PermissionError:  # not damage: the caller says the folder cannot be read
        raise
    except (OSError, ValueError) as e:  # ValueError: JSON (and UTF-8) that does not parse, e.g. truncated
        raise Unverified(f"{path.name} is unreadable ({type(e).__name__})") from None
    if not isinstance(record, dict) or record.pop("digest", None) != _own_digest(record):
        raise Unverified(f"{path.name} does not match its digest")
    for name, (size, expected) in record["files"].items():
        file = path.parent / name
        try:
            if file.stat().st_size != size:
                raise Unverified(f"{name} is {file.stat().st_size} bytes, not {size}")
            if digest(file) != expected:
                raise Unverified(f"{name} does not match its digest")
        except PermissionError:
            raise
        except OSError as e:
            raise Unverified(f"{name} is missing or unreadable ({type(e).__name__})") from None
    return record


def clean_stale(root: Path) -> None:
    """Remove the work folders of preparations that died (their lock is free), and folders left half removed."""
    try:
        entries = [e for e in root.iterdir() if e.name.startswith((WORK, STALE)) and e.is_dir()]
    except OSError:
        return
    for entry in entries:
        if entry.name.startswith(STALE):
            shutil.rmtree(entry, ignore_errors=True)
            continue
        try:
            fd = os.open(entry / LOCK, os.O_RDWR)
        except FileNotFoundError:  # died before it made its lock, or is making it now: judged by age
            with contextlib.suppress(OSError):
                if time.time() - entry.stat().st_mtime > UNLOCKED_AFTER:
                    shutil.rmtree(entry, ignore_errors=True)
            continue
        except OSError:  # not ours to judge (read-only, or gone)
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            shutil.rmtree(entry, ignore_errors=True)
        except OSError:  # alive: its preparer holds the lock
            pass
        finally:
            os.close(fd)


@contextlib.contextmanager
def work_folder(root: Path, key: str) -> Iterator[Path]:
    """A fresh folder to prepare `key` in, locked for as long as this preparation lives, removed after (it is
    gone already once `publish` renamed it)."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{WORK}{key}-{socket.gethostname()}-{os.getpid()}-", dir=root))
    fd = os.open(tmp / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        os.close(fd)


def publish(tmp: Path, folder: Path) -> None:
    """Rename the finished work folder to the cache folder; a folder already there that does not verify
    (what a crash or a corruption left) is moved aside and removed first. A verified one is another
    preparation of the same data that finished first: it is kept."""
    for _ in range(3):
        try:
            tmp.rename(folder)
            return
        except OSError:
            if not folder.exists():
                raise
        try:
            check(folder / "meta.json")
            return
        except Unverified:
            aside = Path(tempfile.mkdtemp(prefix=f"{STALE}{folder.name}-", dir=folder.parent))
            with contextlib.suppress(FileNotFoundError):  # another preparer moved it first
                folder.rename(aside / folder.name)
            shutil.rmtree(aside, ignore_errors=True)
    raise OSError(f"{folder} keeps being replaced by another preparation")
