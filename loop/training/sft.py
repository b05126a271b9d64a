"""Supervised fine-tuning, the first objective: the cross-entropy of every trained (assistant) token, a step
normalised by the trained tokens of all its micro-batches on every process, so that the loss is the mean
over tokens and not a mean of per-micro-batch means."""

from __future__ import annotations

import torch

from loop.data.batches import Batch, Step
from loop.model.head import summed_cross_entropy
from loop.training.objective import Objective

NO_STATISTICS = torch.zeros(0)


def loss_sum(model, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    loss = summed_cross_entropy(model, batch)
    return loss, NO_STATISTICS.to(loss.device)


def trained_tokens(step: Step) -> int:
    return step.trained


def batch_tokens(batch: Batch) -> torch.Tensor:
    return torch.tensor(batch["target_index"].numel(), dtype=torch.float32)


SFT = Objective("sft", loss_sum, trained_tokens, batch_tokens)
