"""The engines the loop can train with, keyed by name, and the one a run uses: chosen once where the
accelerator is made (`choose`, from what accelerate set up) and asked for by whatever acts on the run
(`of`). A checkpoint names the engine that wrote it (its loop state), or is recognised by its files.

A new engine (as FSDP2 was added): one module in loop/engine/ that fills in an `Engine` (interface.py), and its line
in ENGINES below; outside loop/engine/ only what the engine adds to the interface is used (FSDP2 added
`master_weights`, read by model/load.py, and `Layout.unreadable`, read by state/integrity.py).
"""

from __future__ import annotations

import contextlib
import os
import weakref
from collections.abc import Iterator
from pathlib import Path

from loop.config import ConfigError
from loop.engine import deepspeed, fsdp2, plain
from loop.engine.interface import Engine, Weights
from loop.engine.safe_load import ConsolidationError

# Tried in this order when the accelerator is made; accelerate's own path last, as what is left.
ENGINES: dict[str, Engine] = {e.name: e for e in (deepspeed.ENGINE, fsdp2.ENGINE, plain.ENGINE)}
DEFAULT = deepspeed.ENGINE.name  # what the shipped accelerate configs launch
_chosen: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # accelerator -> its engine


def get(name: str) -> Engine:
    if name not in ENGINES:
        raise KeyError(f"engine {name!r} is not one this loop has ({', '.join(ENGINES)})")
    return ENGINES[name]


def choose(accelerator) -> Engine:
    """The engine accelerate set up for this accelerator, remembered for `of`; called where it is made."""
    engine = next((e for e in ENGINES.values() if e.active(accelerator)), None)
    if engine is None:  # a launch config's mistake, said in one line (exit 2)
        fsdp1 = "FSDP" in str(accelerator.distributed_type)
        raise ConfigError(f"accelerate set up {accelerator.distributed_type}, which no engine of this loop drives "
                          f"({', '.join(ENGINES)})" + ("; FSDP needs fsdp_version: 2 in the accelerate config "
                                                   "(accelerate_configs/fsdp2.yaml)" if fsdp1 else ""))
    _chosen[accelerator] = engine
    return engine


def of(accelerator) -> Engine:
    """The engine chosen when this accelerator was made."""
    return _chosen.get(accelerator) or choose(accelerator)


def of_files(names: list[str]) -> Engine:
    """The engine whose checkpoint files these are (names relative to the checkpoint's folder); accelerate's own
    path when no other's are there (its layout then names the files that are missing)."""
    return next((e for e in ENGINES.values() if e.layout.recognises(names)), plain.ENGINE)


def of_checkpoint(folder: Path, recorded: str = "") -> Engine:
    """The engine that wrote a checkpoint: the one its loop state records, else the one its files show."""
    return get(recorded) if recorded else of_files(_names(folder))


def weights(ckpt: Path) -> Weights:
    """The safe, streaming reader of a checkpoint's weights, by the engine whose files it holds (none: the
    default engine's reader says what is missing). ConsolidationError names the file that is wrong."""
    if not ckpt.is_dir():
        raise ConsolidationError(f"{ckpt}: not a directory")
    names = _names(ckpt)
    engine = next((e for e in ENGINES.values() if e.layout.recognises(names)), ENGINES[DEFAULT])
    return engine.layout.weights(ckpt)


def _names(folder: Path) -> list[str]:
    return [os.path.relpath(os.path.join(here, n), folder) for here, _, files in os.walk(folder) for n in files]


def unreadable(path: Path) -> str | None:
    """Why an engine's own reader refuses a checkpoint file (DCP's index, say), when it does."""
    return next((why for e in ENGINES.values() if (why := e.layout.unreadable(path))), None)


def writer(name: str) -> int | None:
    """The process that wrote a checkpoint file of any engine, when its name says."""
    return next((rank for e in ENGINES.values() if (rank := e.layout.writer(name)) is not None), None)


@contextlib.contextmanager
def outside_init() -> Iterator[None]:
    """Build a plain model in this process's memory, whatever engine the run has (some shard a model as it is
    built, in a collective the other processes would never join)."""
    with contextlib.ExitStack() as stack:
        for engine in ENGINES.values():
            stack.enter_context(engine.outside_init())
        yield
