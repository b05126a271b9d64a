"""The seam between the optimizer step and what it optimises.

An objective gives, for one device micro-batch, its summed loss and the sums of its statistics; and what
the summed losses of a whole step (every micro-batch of every process) are divided by. The step then takes
the mean of the loss over that normaliser, for any split into processes and accumulation steps, and logs
each statistic as a mean per the same unit. Evaluation sums the same quantities over held-out batches.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from loop.data.batches import Batch, Step


@dataclass(frozen=True)
class Objective:
    name: str
    # (summed loss as a float32 scalar with gradient, summed statistics as a float32 vector) of a device batch
    loss_sum: Callable[[torch.nn.Module, Batch], tuple[torch.Tensor, torch.Tensor]]
    normaliser: Callable[[Step], int]  # what a step's summed loss is divided by, over every process
    batch_weight: Callable[[Batch], torch.Tensor]  # the same for one device batch (evaluation)
    statistics: tuple[str, ...] = ()  # names of the summed statistics, reported per normaliser unit
