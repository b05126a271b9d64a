"""The engine calls of an optimizer step, handed to the engine chosen with the accelerator (registry.of):
DeepSpeed's clips and skips non-finite steps itself, accelerate's own path (one process, or DDP) does it
here. No branch on the engine here or in loop/training/step.py, which reads the same for every engine."""

from __future__ import annotations

import torch

from loop.engine import registry


def backward(accelerator, model, loss: torch.Tensor, last_micro_batch: bool) -> None:
    """Backward of one micro-batch; gradients are reduced across processes after the last one."""
    registry.of(accelerator).backward(accelerator, model, loss, last_micro_batch)


def clip_gradients(accelerator, model, max_grad_norm: float) -> torch.Tensor | float:
    """The gradient norm, clipped to `max_grad_norm` (0: not clipped), before the optimizer step; an engine
    that clips inside its step reports the norm from there, so here it is not known yet (nan)."""
    return registry.of(accelerator).clip_gradients(accelerator, model, max_grad_norm)


def discard_gradients(accelerator, model, optimizer) -> None:
    """Drop the step's gradients without applying them (a non-finite step)."""
    registry.of(accelerator).discard_gradients(accelerator, model, optimizer)


def optimizer_step(accelerator, model, optimizer, grad_norm: torch.Tensor | float) -> torch.Tensor | float:
    """Apply the gradients; return the gradient norm (DeepSpeed's own, which is inf or nan when it found the
    step non-finite and skipped it)."""
    return registry.of(accelerator).optimizer_step(accelerator, model, optimizer, grad_norm)
