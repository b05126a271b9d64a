"""AdamW parameter groups and the learning-rate schedule.

The schedule is a pure function of the optimizer step, set on the param groups before each step
(as nanoGPT does). Nothing is stepped per process, so it is right for any number of processes, and
a resumed run needs no scheduler state.
"""

from __future__ import annotations

import math

import torch

from loop.config import TrainingConfig


def param_groups(model: torch.nn.Module, cfg: TrainingConfig) -> list[dict]:
    """Weight decay on matrices only: biases, norms and embeddings are left alone (configurable)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_embedding_or_norm = any(k in name for k in ("wte", "wpe", "embed", "ln_", "norm"))
        exempt = name.endswith("bias") or (is_embedding_or_norm and not cfg.decay_embeddings_and_norms)
        (no_decay if exempt else decay).append(p)
    return [{"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: torch.nn.Module, cfg: TrainingConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; `fused` runs one kernel for all of them (CUDA and CPU)."""
    return torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                             eps=cfg.adam_eps, fused=cfg.fused_optimizer or None)


def warmup_steps(cfg: TrainingConfig, total_steps: int) -> int:
    return cfg.warmup_steps if cfg.warmup_steps > 0 else math.ceil(cfg.warmup_ratio * total_steps)


def lr_at(step: int, total_steps: int, cfg: TrainingConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warm-up, then the chosen decay."""
    warm = warmup_steps(cfg, total_steps)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    if cfg.lr_schedule == "constant":
        return cfg.lr
    progress = (step - warm) / max(1, total_steps - warm)
    progress = min(1.0, progress)
    floor = cfg.lr * cfg.min_lr_ratio
    if cfg.lr_schedule == "linear":
        return floor + (cfg.lr - floor) * (1 - progress)
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
