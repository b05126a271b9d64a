"""How the processes of a run agree before they act together (a collective every process joins, so none is
left waiting in another): whether any of them saw something, and one decision taken by the main process.

May import: loop.config.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from datetime import timedelta
from typing import TypeVar

import torch

T = TypeVar("T")


def any_process(accelerator, flag: bool) -> bool:
    """True on every process if `flag` is true on any."""
    t = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return accelerator.reduce(t, reduction="sum").item() > 0


def main_decides(accelerator, decide: Callable[[], T], errors: tuple[type[Exception], ...]) -> T:
    """`decide()` on the main process only, its result (or the error, of the kinds in `errors`, that it
    raised) on every process: one process reads the files, all act on what it found."""
    from accelerate.utils import broadcast_object_list

    found: list = [None]
    if accelerator.is_main_process:
        try:
            found = [decide()]
        except errors as e:
            found = [e]
    if accelerator.num_processes > 1:
        broadcast_object_list(found)
    if isinstance(found[0], Exception):
        raise found[0]
    return found[0]


def fail_together(say: Callable[[], None], line: str, wait: float = 30.0) -> None:
    """Every process of a launch stopping on the same error: the main process says it (`say`) before any
    process exits, and torchrun's failure summary, the last thing a user reads, names it too.

    Under torchrun, the first process to exit non-zero gets the others killed, so a main process still
    printing the line lost it. Here each process counts itself in on the launch's store (torchrun's agent
    holds it; no process group is needed, since most errors come before there is one), the main process
    says the line and waits for all to have come, and only then do they leave together. A process whose
    main process never comes (it did not fail) says the line itself after `wait` seconds. Each writes the
    line into its elastic error file (TORCHELASTIC_ERROR_FILE, in the format of torch's
    elastic.multiprocessing.errors), which the launcher's summary shows instead of "To enable traceback"."""
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if error_file := os.environ.get("TORCHELASTIC_ERROR_FILE"):
        try:
            with open(error_file, "w") as f:
                json.dump({"message": line, "timestamp": int(time.time())}, f)
        except OSError:
            pass  # the console line below still says it
    store = launch_store(rank, world, wait) if world > 1 else None
    if store is None:
        if rank == 0:
            say()
        return
    try:
        store.add("loop/failed", 1)
        if rank == 0:
            say()
            deadline = time.monotonic() + wait
            while store.add("loop/failed", 0) < world and time.monotonic() < deadline:
                time.sleep(0.05)
            store.set("loop/said", "1")
        else:
            store.wait(["loop/said"], timedelta(seconds=wait))
    except RuntimeError:  # the main process went another way: this one says it rather than lose it
        if rank != 0:
            say()


def launch_store(rank: int, world: int, wait: float):
    """The launch's key-value store: the process group's when there is one, else torchrun's own (None
    outside a launch)."""
    from torch.distributed import distributed_c10d, rendezvous

    try:
        if torch.distributed.is_initialized():
            return distributed_c10d._get_default_store()
        if "MASTER_ADDR" not in os.environ:
            return None
        store, _, _ = next(rendezvous("env://", rank=rank, world_size=world, timeout=timedelta(seconds=wait)))
        return store
    except (RuntimeError, ValueError, StopIteration):
        return None
