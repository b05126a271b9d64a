"""How the processes of a run agree before they act together (a collective every process joins, so none is
left waiting in another): whether any of them saw something, and one decision taken by the main process.

May import: loop.config.
"""

from __future__ import annotations

from collections.abc import Callable
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
