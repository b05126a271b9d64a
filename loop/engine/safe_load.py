"""Reading any engine's checkpoint files without running code: `torch.load(weights_only=True)` with an
explicit allowlist (also given to DeepSpeed's engine and accelerate's loader for resume), and the two
errors every checkpoint reader raises."""

from __future__ import annotations

import importlib
from pathlib import Path

import torch

from loop.config import RunError, first_line

# The only classes an engine's checkpoint files may name (today DeepSpeed's ZeRO stage enum and loss scaler);
# an engine whose library is not installed adds none.
ALLOWED_CLASSES = ("deepspeed.runtime.zero.config.ZeroStageEnum", "deepspeed.runtime.fp16.loss_scaler.LossScaler")


class UntrustedCheckpoint(RunError, RuntimeError):
    """A checkpoint file is missing, truncated, or holds something other than plain data."""


class ConsolidationError(RunError, RuntimeError):
    """The input is not a complete checkpoint that an engine can turn into a model; the message names the file."""


def safe_globals() -> list:
    found = []
    for dotted in ALLOWED_CLASSES:
        module, _, name = dotted.rpartition(".")
        try:
            found.append(getattr(importlib.import_module(module), name))
        except ImportError:
            continue
    return found


def torch_load(path: str | Path, map_location=None, meta: bool = False, mmap: bool = False):
    """torch.load that refuses anything but tensors and plain data (no code runs); on the meta device
    no tensor data is read, only where it lies in the file."""
    try:
        with torch.serialization.safe_globals(safe_globals()):
            return torch.load(path, map_location="meta" if meta else map_location, weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - a tampered or truncated file shows up in many ways
        # torch names the class a pickle asked for a few lines into its message: that is the line to show.
        named = [line.strip() for line in str(e).splitlines() if "Unsupported global" in line]
        reason = named[0][:200] if named else first_line(e, 200)
        raise UntrustedCheckpoint(f"{path}: unreadable, truncated or not plain data ({type(e).__name__}: "
                                  f"{reason})") from None
