"""What a checkpoint holds can be trusted, or is refused with the file named.

- Nothing in a checkpoint folder is unpickled: DeepSpeed's `.pt` files and accelerate's `.bin` files are
  read with `torch.load(weights_only=True)` and an explicit allowlist (loop/engine/safe_load.py; DeepSpeed's
  engine and accelerate's loader are given the same reader for resume), RNG states are safetensors.
- Every file's size and content digest are recorded at save time (`MANIFEST.json`), each process hashing
  the files it wrote right after writing them (`record`), the main process the rest (`write_manifest`).
- Before a checkpoint is used (resume, consolidation, export, generation), `problems` says, file by file,
  why it cannot be trusted: a file missing, added, resized or changed (its digest), a symbolic link or a
  name outside the folder, a file the safe reader refuses, or a loop state the loop would not write.

DeepSpeed, accelerate and torch.distributed.checkpoint check at most that files exist, so the digests are
kept here: xxHash's XXH3 (the `xxhash` package, a dependency of `datasets`), about 13 GB/s on one core.
"""

from __future__ import annotations

import fnmatch
import json
import os
import random
import re
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath

import numpy as np
import torch
import xxhash
from safetensors import safe_open
from safetensors.torch import save_file

from loop.config import first_line
from loop.engine import registry
from loop.engine.interface import Engine
from loop.engine.safe_load import UntrustedCheckpoint, torch_load
from loop.state import progress

MANIFEST = "MANIFEST.json"
MARKER = "COMPLETE"  # written (via .COMPLETE) once the checkpoint is whole: loop/state/checkpoints.py
IN_USE = ".in_use"  # a background job (upload) still reads this checkpoint: do not prune it
WRITTEN_AFTER = {MANIFEST, MARKER, f".{MARKER}", IN_USE}  # the files the manifest cannot list
# What evaluating a checkpoint writes into it afterwards (loop/evaluation/during_training.py: the code
# evaluation's per-problem results): results about the checkpoint, which nothing that resumes or exports reads.
EVALUATED = "eval/"
ALGORITHM = "xxh3_128"
CHUNK = 16 * 2**20


def rng_file(folder: Path, rank: int) -> Path:
    return folder / f"rng_state_{rank}.safetensors"


def save_rng(folder: Path, rank: int) -> None:
    """This process's Python, NumPy and torch (CPU and CUDA) generator states, without pickle."""
    version, py_state, gauss = random.getstate()
    kind, np_key, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    tensors = {"python": torch.tensor(py_state, dtype=torch.int64), "numpy": torch.from_numpy(np_key.astype(np.int64)),
               "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors |= {f"cuda_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    meta = {"python_version": str(version), "python_gauss": json.dumps(gauss), "numpy_kind": kind,
            "numpy_pos": str(np_pos), "numpy_has_gauss": str(np_has_gauss), "numpy_gauss": repr(float(np_gauss))}
    # One metadata key: safetensors writes several in a random order, and the same state would give other bytes.
    save_file(tensors, str(rng_file(folder, rank)), metadata={"state": json.dumps(meta, sort_keys=True)})


def load_rng(folder: Path, rank: int) -> None:
    """Restore what `save_rng` wrote; a state that cannot be restored is an error, not a warning."""
    path = rng_file(folder, rank)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta, t = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(meta["state"]) if "state" in meta else meta  # one key per field before 2026-12
        random.setstate((int(meta["python_version"]), tuple(t["python"].tolist()), json.loads(meta["python_gauss"])))
        np.random.set_state((meta["numpy_kind"], t["numpy"].numpy().astype(np.uint32), int(meta["numpy_pos"]),
                             int(meta["numpy_has_gauss"]), float(meta["numpy_gauss"])))
        torch.set_rng_state(t["torch"])
        cuda = [t[f"cuda_{i}"] for i in range(sum(k.startswith("cuda_") for k in t))]
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda)
    except Exception as e:  # noqa: BLE001 - missing, truncated or foreign file
        raise UntrustedCheckpoint(f"{path}: the random number generator state cannot be restored "
                                  f"({type(e).__name__}: {first_line(e, 200)}); resuming would not be exact") from None


def missing_files(folder: Path, world_size: int, engine: Engine) -> list[str]:
    """Files every process must have written (its RNG state and the engine's files); a checkpoint lacking any
    is never marked complete."""
    missing = [rng_file(folder, r).name for r in range(world_size) if not rng_file(folder, r).is_file()]
    return missing + engine.layout.missing(folder, world_size)


def writer(name: str) -> int | None:
    """The process that writes a file of a checkpoint, when its name says (shards, RNG states)."""
    found = re.fullmatch(r"rng_state_(\d+)\.safetensors", name)
    return int(found.group(1)) if found else registry.writer(name)


def digest(path: Path) -> str:
    h = xxhash.xxh3_128()
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            h.update(view[:n])
    return h.hexdigest()


def _digests(folder: Path, names: list[str]) -> dict[str, str]:
    """Digests of several files at once: xxhash and file reads release the GIL."""
    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1, len(names)))) as pool:
        return dict(zip(names, pool.map(lambda n: digest(folder / n), names)))


def _files(folder: Path) -> list[str]:
    """Every file and symbolic link under `folder`, as relative names (links are not followed)."""
    found = []
    for here, dirs, files in os.walk(folder):
        rel = Path(here).relative_to(folder)
        found += [(rel / name).as_posix() for name in files]
        found += [(rel / name).as_posix() for name in dirs if os.path.islink(os.path.join(here, name))]
    return sorted(found)


def record(folder: Path, rank: int) -> dict[str, dict]:
    """Size and digest of the files this process wrote (its shards and RNG state), right after it wrote them."""
    names = [n for n in _files(folder) if writer(n) == rank]
    return {n: {"size": (folder / n).stat().st_size, ALGORITHM: d} for n, d in _digests(folder, names).items()}


def write_manifest(folder: Path, recorded: dict[str, dict]) -> int:
    """Write every file's size and digest (those the processes recorded, the main process's own hashed
    now); return the checkpoint's total size in bytes."""
    names = [n for n in _files(folder) if n not in WRITTEN_AFTER]
    entries = {n: recorded[n] for n in names if n in recorded}
    rest = _digests(folder, [n for n in names if n not in recorded])
    entries |= {n: {"size": (folder / n).stat().st_size, ALGORITHM: d} for n, d in rest.items()}
    (folder / MANIFEST).write_text(json.dumps({"algorithm": ALGORITHM, "files": dict(sorted(entries.items()))},
                                              indent=1))
    return sum(e["size"] for e in entries.values())


def read_manifest(folder: Path) -> dict[str, dict]:
    """name -> {"size": bytes, ALGORITHM: digest}; a manifest from before digests has sizes only."""
    raw = json.loads((folder / MANIFEST).read_text())
    if isinstance(raw, dict) and all(type(v) is int for v in raw.values()):  # written before 2026-12: sizes
        return {name: {"size": size} for name, size in raw.items()}
    files = raw.get("files") if isinstance(raw, dict) and raw.get("algorithm") == ALGORITHM else None
    if not isinstance(files, dict) or not all(isinstance(e, dict) and type(e.get("size")) is int
                                              and isinstance(e.get(ALGORITHM), str) for e in files.values()):
        raise ValueError(f"not a manifest of sizes and {ALGORITHM} digests")
    return files


def size(folder: Path) -> int:
    """A checkpoint's size from its manifest (0 when it has none)."""
    try:
        return sum(e["size"] for e in read_manifest(folder).values())
    except (OSError, ValueError):
        return 0


def folder_step(folder: Path) -> int | None:
    """N for a folder named step_N (or .tmp-step_N), else None."""
    found = re.fullmatch(r"(?:\.tmp-)?step_(\d+)", folder.name)
    return int(found.group(1)) if found else None


def problems(folder: Path) -> list[str]:
    """Why a checkpoint cannot be trusted, one line per file; empty when it can."""
    try:
        entries = read_manifest(folder)
    except (OSError, ValueError, AttributeError) as e:
        return [f"{folder / MANIFEST}: missing or unreadable ({type(e).__name__}: {first_line(e, 120)})"]
    root = folder.resolve()
    on_disk = _files(folder)
    found = [f"{folder / n}: a symbolic link; a checkpoint holds its own files only" for n in on_disk
             if os.path.islink(folder / n)]
    found += [f"{folder / n}: not in the manifest (added after the checkpoint was saved)" for n in on_disk
              if n not in entries and n not in WRITTEN_AFTER and not n.startswith(EVALUATED)
              and not os.path.islink(folder / n)]
    sized = []
    for name, entry in entries.items():
        path = folder / name
        if not _inside(root, name):
            if not os.path.islink(path):  # a link was named above
                found.append(f"{path}: outside the checkpoint folder or behind a symbolic link, refused")
            continue
        try:
            info = os.lstat(path)
        except OSError:
            found.append(f"{path}: missing")
            continue
        if not stat.S_ISREG(info.st_mode):
            found += [] if stat.S_ISLNK(info.st_mode) else [f"{path}: not a regular file"]
        elif info.st_size != entry["size"]:
            found.append(f"{path}: {info.st_size} bytes, {entry['size']} when it was saved")
        else:
            sized.append(name)
    hashed = _digests(folder, [n for n in sized if ALGORITHM in entries[n]])
    for name in sized:
        if name in hashed and hashed[name] != entries[name][ALGORITHM]:
            found.append(f"{folder / name}: content differs from when it was saved ({ALGORITHM} {hashed[name]}, "
                         f"{entries[name][ALGORITHM]} recorded)")
        elif reason := _unreadable(folder / name):
            found.append(reason)
    return found + _state_problems(folder, entries)


def _inside(root: Path, name: str) -> bool:
    """Whether a manifest's name is a plain relative path to a file inside the checkpoint, with no symbolic
    link on the way."""
    pure = PurePosixPath(name)
    plain = not pure.is_absolute() and ".." not in pure.parts and pure.as_posix() == name
    return plain and (root / name).resolve() == root / name


def _unreadable(path: Path) -> str | None:
    """Why the safe readers refuse a file (None when they read it): pickles with anything but plain data,
    truncated archives, safetensors or JSON that do not parse."""
    try:
        if path.suffix in (".pt", ".bin"):
            torch_load(path, meta=True)
        elif path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                f.metadata()
        return registry.unreadable(path)  # an engine's own files (DCP's index and the items of its data files)
    except UntrustedCheckpoint as e:
        return str(e)
    except Exception as e:  # noqa: BLE001 - any failure means unreadable
        return f"{path}: unreadable ({type(e).__name__}: {first_line(e, 120)})"


def _state_problems(folder: Path, entries: dict[str, dict]) -> list[str]:
    """The loop state is one the loop writes, for this folder's step, and every process's files are there."""
    path = folder / progress.STATE_FILE
    try:
        state = progress.from_json(path.read_text(), folder_step(folder))
    except OSError:
        return [] if progress.STATE_FILE in entries else [f"{path}: missing"]  # else said above
    except ValueError as e:
        return [f"{path}: {e}"]
    try:
        engine = registry.get(state.engine) if state.engine else registry.of_files(list(entries))
    except KeyError as e:
        return [f"{path}: {e.args[0]}"]
    return [f"{folder / name}: missing (every process writes one)" for name in
            missing_files(folder, state.world_size, engine) if not fnmatch.filter(entries, name)]  # else said above
