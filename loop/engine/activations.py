"""DeepSpeed's offloader of checkpointed activations (Arctic Long Sequence Training's, in
deepspeed.runtime.activation_checkpointing), for a model under any engine: the inputs that gradient checkpointing
keeps moved to CPU memory between forward and backward. loop/model/memory.py decides where it applies; this
module only wraps DeepSpeed's own, so nothing outside the engine package imports DeepSpeed."""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch


def offloader() -> AbstractContextManager:
    """DeepSpeed's CheckpointHiddenStatesOffload: inside it, a tensor marked as a checkpoint's input (mark_inputs)
    is copied to pinned CPU memory on a side stream when autograd keeps it, the newest one left on the GPU
    (its backward comes first), and copied back when backward needs it; every other saved tensor is left alone,
    parameters included (ZeRO-3's gathered weights are never copied). torch's save_on_cpu would move every
    saved tensor, synchronously. A CPU-only device has no side stream and nothing to offload to: a no-op there.
    One object serves every micro-batch; each forward and its backward run inside it (it is emptied on exit)."""
    from deepspeed.runtime.activation_checkpointing.offload_activations import CheckpointHiddenStatesOffload

    return CheckpointHiddenStatesOffload()


def mark_inputs(layer: torch.nn.Module, offload: AbstractContextManager) -> None:
    """The hidden states `layer` hands its checkpoint function are marked for `offload`. DeepSpeed's own marker
    marks the layer call's argument, which ZeRO-3's forward hooks replace (detached) before the checkpoint keeps
    it, so under ZeRO-3 nothing would move: the mark is put here, on what the checkpoint actually keeps."""
    checkpoint: Callable = layer._gradient_checkpointing_func

    @functools.wraps(checkpoint)
    def marked(function, *args, **kwargs):
        hidden = args[0] if args and torch.is_tensor(args[0]) else None
        active = hidden is not None and offload in _active()
        if active:
            offload.mark(hidden)
        try:
            return checkpoint(function, *args, **kwargs)
        finally:
            if active:
                offload._consume_mark(hidden)  # a mark autograd did not take (no gradient): not left behind

    layer._gradient_checkpointing_func = marked


def _active() -> list:
    from deepspeed.runtime.activation_checkpointing.offload_activations import _manager_stack

    return _manager_stack()
