"""What a checkpoint holds can be trusted, or is refused with the file named.

- Nothing in a checkpoint folder is unpickled: DeepSpeed's `.pt` files are read with
  `torch.load(weights_only=True)` and an explicit allowlist (loop/engine/zero3_files.py; DeepSpeed's
  engine is given the same reader for resume), RNG states are safetensors.
- Every file's size is recorded at save time (`MANIFEST.json`); before a checkpoint is used, every
  file must be there with that size and readable, or the checkpoint counts as broken.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from loop.config import first_line
from loop.engine.zero3_files import UntrustedCheckpoint, torch_load

MANIFEST = "MANIFEST.json"


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
    save_file(tensors, str(rng_file(folder, rank)), metadata=meta)


def load_rng(folder: Path, rank: int) -> None:
    """Restore what `save_rng` wrote; a state that cannot be restored is an error, not a warning."""
    path = rng_file(folder, rank)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta, t = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
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


def write_manifest(folder: Path) -> int:
    """Record every file's size; return the checkpoint's total size in bytes."""
    sizes = {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*"))
             if p.is_file() and p.name != MANIFEST}
    (folder / MANIFEST).write_text(json.dumps(sizes, indent=1))
    return sum(sizes.values())


def size(folder: Path) -> int:
    """A checkpoint's size from its manifest (0 when it has none)."""
    try:
        return sum(json.loads((folder / MANIFEST).read_text()).values())
    except (OSError, ValueError):
        return 0


def problems(folder: Path) -> list[str]:
    """Why a checkpoint cannot be trusted, one line per file; empty when it can."""
    try:
        sizes = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        return [f"{folder / MANIFEST}: missing or unreadable ({type(e).__name__})"]
    found = []
    for name, expected in sizes.items():
        path = folder / name
        if not path.is_file():
            found.append(f"{path}: missing")
        elif path.stat().st_size != expected:
            found.append(f"{path}: {path.stat().st_size} bytes, {expected} when it was saved")
        elif path.suffix == ".pt":
            try:
                torch_load(path, meta=True)
            except UntrustedCheckpoint as e:
                found.append(str(e))
        elif path.suffix in (".json", ".safetensors") and not _readable(path):
            found.append(f"{path}: unreadable")
    return found


def _readable(path: Path) -> bool:
    try:
        if path.suffix == ".json":
            json.loads(path.read_text())
        else:
            with safe_open(str(path), framework="pt") as f:
                f.metadata()
        return True
    except Exception:  # noqa: BLE001 - any failure means unreadable
        return False
