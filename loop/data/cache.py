"""The prepared-data cache trusted the way a checkpoint is: every file's size and content digest written with
it, checked before a run uses it, and work folders that no two preparers share and no dead one leaves behind.

- A record (meta.json for a prepared folder, rows-KEY.json for a packing kept beside it) lists each file's
  size and XXH3 digest (the `xxhash` package, a dependency of `datasets`; the checkpoints' digest too) and
  a digest of the record itself; it is written last, so a folder without a whole record is not a cache.
  `check` says in one line why a folder cannot be trusted; the caller prepares it again.
- Each file is hashed once, not at every start: 1M realistic dialogues are 3 GB of cache, about 1 s to hash
  from the page cache and 7-15 s from disk, and its mapped pages were 2.3-2.9 GB of the start's peak PSS (1M
  short ones: 126 MB, 15-50 ms). What verified is stamped beside the record
  (meta.verified: each file's size, mtime, ctime, inode and device, with the record's digest and its own),
  and a later check hashes only a file whose stamp differs. The kernel sets ctime at every write, truncation,
  replacement or change of times, and user space cannot set it back, so any change to a file through the
  file system is hashed again; a stamp that is missing, cut, edited or of another record means every file is
  hashed. Only a file changed before the hashing began is stamped (against the file system's own clock), so
  a change in the same clock tick is not missed. Not caught: damage below the file system (a disk's bit rot,
  which changes no ctime); delete meta.verified to hash every file at the next start.
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
STAMP = ".verified"  # beside a record (meta.verified): what of its files verified by content, and as what
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
    written under a temporary name and renamed: a reader sees a whole record or none. Its stamp too (what was
    hashed: the next check hashes nothing that has not changed since)."""
    clock = _clock(path)
    try:
        stats = {name: (path.parent / name).stat() for name in names}
        files = {name: [stats[name].st_size, digest(path.parent / name)] for name in names}
        record = {**values, "files": files}
        own = _own_digest(record)
        tmp = temporary(path)
        tmp.write_text(json.dumps({**record, "digest": own}, indent=1))
        tmp.replace(path)
        _stamp(path, own, stats, clock, {})
        clock = None
    finally:
        _drop(clock)


def check(path: Path) -> dict:
    """The record at `path` (without its digests) once it and every file it lists verify; Unverified if not
    (PermissionError when a file cannot be read at all). A file is hashed unless the record's stamp says it
    verified and it has not changed since."""
    try:
        record = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise Unverified(f"{path.name} is missing") from None
    except PermissionError:  # not damage: the caller says the folder cannot be read
        raise
    except (OSError, ValueError) as e:  # ValueError: JSON (and UTF-8) that does not parse, e.g. truncated
        raise Unverified(f"{path.name} is unreadable ({type(e).__name__})") from None
    own = record.pop("digest", None) if isinstance(record, dict) else None
    if own is None or own != _own_digest(record):
        raise Unverified(f"{path.name} does not match its digest")
    stats, stamped = {}, _stamped(path, own)
    for name, (size, _) in record["files"].items():
        stats[name] = _stat(path.parent / name)
        if stats[name].st_size != size:
            raise Unverified(f"{name} is {stats[name].st_size} bytes, not {size}")
    unchanged = {name: stamped[name] for name in stats if stamped.get(name) == _key(stats[name])}
    if len(unchanged) < len(stats):
        clock = _clock(path)  # before hashing: a file changed after it, as it is hashed or later, is not stamped
        try:
            for name, (_, expected) in record["files"].items():
                if name not in unchanged and _read(path.parent / name, digest) != expected:
                    raise Unverified(f"{name} does not match its digest")
            _stamp(path, own, stats, clock, unchanged)
            clock = None
        finally:
            _drop(clock)
    return record


def _stat(file: Path) -> os.stat_result:
    return _read(file, os.stat)


def _read(file: Path, how):
    try:
        return how(file)
    except PermissionError:
        raise
    except OSError as e:
        raise Unverified(f"{file.name} is missing or unreadable ({type(e).__name__})") from None


def _key(stat: os.stat_result) -> list[int]:
    """What changes with a file's content: ctime is set by the kernel at every write, truncation, rename onto it
    and times set by hand (user space cannot set it); inode and device change when it is replaced or copied."""
    return [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino, stat.st_dev]


def _stamped(path: Path, own: str) -> dict[str, list[int]]:
    """The stamp beside the record at `path`: each file's `_key` when it last verified by content. Nothing
    (every file hashed) for a stamp that is missing, cut or edited, or that was written for another record."""
    try:
        stamp = json.loads(path.with_suffix(STAMP).read_bytes())
        if stamp.pop("digest") == _own_digest(stamp) and stamp["record"] == own:
            return {name: list(key) for name, key in stamp["files"].items()}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        pass
    return {}


def _clock(path: Path) -> tuple[Path, int] | None:
    """The stamp's temporary file, made now, and the time its file system gave it: a file whose ctime is earlier
    was last changed before the hashing that follows, and any later change gives it a later ctime (the same
    clock: on a network file system, the server's). None where the folder is read-only (nothing is stamped)."""
    tmp = temporary(path.with_suffix(STAMP))
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except OSError:
        return None
    try:
        return tmp, os.fstat(fd).st_mtime_ns
    finally:
        os.close(fd)


def _stamp(path: Path, own: str, stats: dict[str, os.stat_result], clock: tuple[Path, int] | None,
           unchanged: dict[str, list[int]]) -> None:
    """Write the stamp of the record at `path` (digest `own`): the files `unchanged` since their stamp, and those
    just hashed (`stats`, taken before) that changed before `clock` and not since. Renamed into place."""
    if clock is None:
        return
    tmp, since = clock
    files = dict(unchanged)
    for name, stat in stats.items():
        with contextlib.suppress(OSError):
            if name not in files and stat.st_ctime_ns < since and _key((path.parent / name).stat()) == _key(stat):
                files[name] = _key(stat)
    stamp = {"record": own, "files": files}
    with contextlib.suppress(OSError):  # a stamp not written costs the next start a hash, nothing else
        tmp.write_text(json.dumps({**stamp, "digest": _own_digest(stamp)}))
        tmp.replace(path.with_suffix(STAMP))
    _drop(clock)


def _drop(clock: tuple[Path, int] | None) -> None:
    if clock is not None:
        with contextlib.suppress(OSError):
            clock[0].unlink()


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
