"""The engine calls of an optimizer step, for whichever engine the run has: DeepSpeed's (which clips and
skips non-finite steps itself) or accelerate's own path (one process, or DDP). The one place that branches
on the engine, so that the step in loop/training/step.py reads the same for both."""

from __future__ import annotations

import math

import torch

from loop.engine import deepspeed


def backward(accelerator, model, loss: torch.Tensor, last_micro_batch: bool) -> None:
    """Backward of one micro-batch; gradients are reduced across processes after the last one."""
    if deepspeed.is_active(accelerator):
        deepspeed.backward(model, loss, last_micro_batch)
    else:
        accelerator.sync_gradients = last_micro_batch
        accelerator.backward(loss)


def clip_gradients(accelerator, model, max_grad_norm: float) -> torch.Tensor | float:
    """The gradient norm, clipped to `max_grad_norm` (0: not clipped), before the optimizer step; DeepSpeed
    clips inside its step and reports the norm from there, so here it is not known yet (nan)."""
    if deepspeed.is_active(accelerator):
        return float("nan")
    return accelerator.clip_grad_norm_(model.parameters(), max_grad_norm or math.inf)


def discard_gradients(accelerator, model, optimizer) -> None:
    """Drop the step's gradients without applying them (a non-finite step)."""
    (model.optimizer if deepspeed.is_active(accelerator) else optimizer).zero_grad()


def optimizer_step(accelerator, model, optimizer, grad_norm: torch.Tensor | float) -> torch.Tensor | float:
    """Apply the gradients; return the gradient norm (DeepSpeed's own, which is inf or nan when it found the
    step non-finite and skipped it)."""
    if deepspeed.is_active(accelerator):
        return deepspeed.optimizer_step(model)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm
