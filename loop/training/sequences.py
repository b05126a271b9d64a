"""A sequence's log-probability of its completion: what the DPO loss compares, and what its reference pass
(reference.py) computes once with the starting model."""

from __future__ import annotations

import torch

from loop.data.batches import Batch
from loop.model import sequence_parallel
from loop.model.head import target_log_probs


def sequence_log_probs(model, batch: Batch) -> torch.Tensor:
    """Each sequence's summed log-probability of its completion, in the batch's order (float32 vector); with
    sequence parallelism, over the whole row (each process holds the sums of its chunk's targets)."""
    per_target = target_log_probs(model, batch)
    summed = torch.zeros(batch["sequence_ids"].shape[0], dtype=torch.float32, device=per_target.device)
    return sequence_parallel.whole_row_sum(summed.index_add(0, batch["target_sequence"], per_target))
