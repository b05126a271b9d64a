"""What the loop asks of the engine under it, as plain data: an `Engine` is a name and the functions the
rest of the loop calls (the step's engine calls, save and load, the model's placement, generation, the
memory model), and its checkpoints' `Layout` (which files each process writes, which process wrote a
file, and the reader that streams a checkpoint's weights for consolidation and export).

Nothing here knows an engine: each engine module (deepspeed.py, fsdp2.py, plain.py) fills one in, and registry.py
lists them. The functions that act on a run take its accelerator; those of a layout take only files, so
tools read checkpoints without one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

Accelerator = Any  # accelerate's; not imported here, so that tools reading checkpoints need not import it


@dataclass(frozen=True)
class Weights:
    """A checkpoint's weights as consolidation streams them: every tensor's shape and stored dtype in the
    order `tensors()` yields them, and the tied weights left out (name -> the name it shares storage with)."""

    tensors: Callable[[], Iterator[tuple[str, torch.Tensor]]]
    shapes: dict[str, tuple[tuple[int, ...], torch.dtype]]
    aliases: dict[str, str]


@dataclass(frozen=True)
class Layout:
    """An engine's checkpoint files, known from their names alone."""

    recognises: Callable[[list[str]], bool]  # whether these file names (relative to the folder) are its checkpoint's
    missing: Callable[[Path, int], list[str]]  # the files each of N processes must write that are not there
    writer: Callable[[str], int | None]  # the process that wrote a file, when its name says
    weights: Callable[[Path], Weights]  # the safe, streaming reader of a complete checkpoint (ConsolidationError)
    # Why its own reader refuses one of its files that the generic checks cannot read (None: fine, or not its).
    unreadable: Callable[[Path], str | None] = lambda path: None


@dataclass(frozen=True)
class Engine:
    """One engine: chosen once where the accelerator is made (registry.choose), handed to whatever acts on it."""

    name: str  # recorded in every checkpoint's loop state: a checkpoint resumes only under its own engine
    title: str  # for messages: "DeepSpeed"
    active: Callable[[Accelerator], bool]  # whether accelerate set up this engine
    configure: Callable[[Accelerator, Any], None]  # fill in its settings from the run's TrainingConfig
    zero_stage: Callable[[Accelerator], int | None]  # how it shards the model states (None: not at all)
    offloads: Callable[[Accelerator], set[str]]  # where it moves model states ("cpu", "nvme"), for the memory check
    describe: Callable[[Accelerator], str]  # how the processes share the work, for the model card
    place_model: Callable[[Accelerator, torch.nn.Module, bool], None]  # before prepare (bool: only adapters train)
    synced_generation: Callable[[Accelerator], bool]  # every process must join every forward pass of generate()
    # Inside the block these parameters hold their whole values, and what is written to them is kept.
    gathered: Callable[[list], AbstractContextManager]
    # The whole weights on the main process, for the final model (a collective: every process calls it).
    full_state_dict: Callable[[Accelerator, Any], dict[str, torch.Tensor]]
    # The engine calls of one optimizer step (loop/engine/step.py).
    backward: Callable[[Accelerator, Any, torch.Tensor, bool], None]
    clip_gradients: Callable[[Accelerator, Any, float], torch.Tensor | float]
    discard_gradients: Callable[[Accelerator, Any, Any], None]
    optimizer_step: Callable[[Accelerator, Any, Any, torch.Tensor | float], torch.Tensor | float]
    # Checkpoints: write this process's part into a folder, read it back (bool: only what trains is saved).
    save_state: Callable[[Accelerator, Path, Any, bool], None]
    load_state: Callable[[Accelerator, Path, Any, bool], None]
    # Write into a folder (the second path) a copy of a verified checkpoint (the first) that this run's number of
    # processes loads; None: its checkpoints resume only on the number of processes that wrote them.
    reshard: Callable[[Accelerator, Path, Path], None] | None
    layout: Layout
    # Building a plain model in this process's memory even inside a run of this engine (which may otherwise
    # shard it as it is built), and the model states' memory: (CPU bytes per node, device bytes per device)
    # for (parameters, largest layer, devices per node, nodes, optimizer offloaded, parameters offloaded).
    outside_init: Callable[[], AbstractContextManager]
    model_states_memory: Callable[[int, int, int, int, bool, bool], tuple[float, float]]
    # It keeps float32 master weights of its own (DeepSpeed), so the model may load in its saved dtype; else the
    # loaded weights are the optimizer's and load in float32.
    master_weights: bool = False
