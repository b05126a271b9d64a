"""Direct preference optimisation, the second objective: for each pair, how much more the policy than the
reference prefers the chosen answer to the rejected one, pushed up through a log-sigmoid (or IPO's square).

A sequence's log-probability is the sum over its completion (the last assistant turn and its end token),
computed inside the output projection chunk by chunk (loop/model/head.py), never as float32 logits of the
whole micro-batch. A step is normalised by the pairs of all its micro-batches on every process, so the loss
is the mean over every pair of the step for any split into processes and accumulation steps. The statistics
are TRL's, summed per pair: rewards (beta times the log-ratio to the reference), their accuracy and margin,
and the policy's log-probabilities.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from loop.config import DpoSettings
from loop.data.batches import Batch, Step
from loop.model.head import target_log_probs
from loop.training.objective import Objective

STATISTICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
              "logps/rejected")


def sequence_log_probs(model, batch: Batch) -> torch.Tensor:
    """Each sequence's summed log-probability of its completion, in the batch's order (float32 vector)."""
    per_target = target_log_probs(model, batch)
    summed = torch.zeros(batch["sequence_ids"].shape[0], dtype=torch.float32, device=per_target.device)
    return summed.index_add(0, batch["target_sequence"], per_target)


@torch.no_grad()
def adapter_off_log_probs(model, batch: Batch) -> torch.Tensor:
    """The reference without a second model: the LoRA base with its adapter switched off (peft's context)."""
    with getattr(model, "module", model).disable_adapter():
        return sequence_log_probs(model, batch)


def pair_losses(policy: torch.Tensor, reference: torch.Tensor, completion_tokens: torch.Tensor,
                settings: DpoSettings) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(each pair's loss, chosen rewards, rejected rewards) from sequence log-probs ordered chosen, rejected."""
    ratio = policy - reference
    chosen, rejected = ratio[0::2], ratio[1::2]
    beta = settings.beta
    if settings.loss == "ipo":  # TRL's IPO: log-ratios per completion token, as the paper's authors intended
        tokens = completion_tokens.to(ratio.dtype).clamp(min=1)
        losses = (chosen / tokens[0::2] - rejected / tokens[1::2] - 1 / (2 * beta)) ** 2
    else:  # DPO; with label smoothing e, the conservative form: e of the pairs are taken to be flipped
        margin, e = beta * (chosen - rejected), settings.label_smoothing
        losses = -(1 - e) * F.logsigmoid(margin) - (e * F.logsigmoid(-margin) if e else 0)
    return losses, beta * chosen.detach(), beta * rejected.detach()


def pairs_in_step(step: Step) -> int:
    return len(step.piece_lengths) // 2


def pairs_in_batch(batch: Batch) -> torch.Tensor:
    return torch.tensor(batch["sequence_ids"].shape[0] // 2, dtype=torch.float32)


def objective(settings: DpoSettings) -> Objective:
    """DPO with these settings: the reference log-probabilities come with each batch (precomputed), or
    from the same model with its adapter switched off (live)."""

    def loss_sum(model, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        policy = sequence_log_probs(model, batch)
        reference = batch["reference_logps"] if settings.reference == "precomputed" else \
            adapter_off_log_probs(model, batch)
        losses, chosen, rejected = pair_losses(policy, reference, batch["completion_tokens"], settings)
        logps = policy.detach()
        statistics = torch.stack([chosen.sum(), rejected.sum(), (chosen > rejected).float().sum(),
                                  (chosen - rejected).sum(), logps[0::2].sum(), logps[1::2].sum()])
        return losses.sum(), statistics

    return Objective("dpo", loss_sum, pairs_in_step, pairs_in_batch, STATISTICS)
