"""One optimizer step over this process's micro-batches, and the same objective over held-out rows."""

from __future__ import annotations

import math
from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from loop.data.batches import Batch, Step, to_device
from loop.engine import step as engine
from loop.model import memory, moe
from loop.training.objective import Objective


@dataclass
class StepResult:
    loss: float | None  # mean over the step's normaliser (trained tokens), all processes; None: not applied
    grad_norm: torch.Tensor | float  # a device tensor, read only when logged
    nonfinite: str | None  # what was not finite when the step was not applied
    preempted: bool  # a preemption signal reached some process: all of them save and stop
    statistics: dict[str, float] = field(default_factory=dict)  # the objective's, per normaliser unit
    routing: moe.Routing | None = None  # a mixture of experts': the step's load balance (aux_loss in statistics)


def train_step(model, optimizer, accelerator, step: Step, objective: Objective, max_grad_norm: float, timers,
               preempted: bool, router: moe.Recorder | None = None) -> StepResult:
    """One optimizer step, with one host-device synchronisation.

    The engine divides by the accumulation steps and averages over processes; scaling each summed
    micro-batch loss by world * accumulation / (the objective's normaliser of the whole step) makes the
    gradient the mean over the step (every trained token, for supervised fine-tuning), not a mean of
    per-micro-batch means. After the backward passes, one all-reduce gives every process the step's loss
    and statistics, whether any loss (or, without DeepSpeed, the gradient norm) was non-finite, and whether
    any process was signalled to stop; a non-finite step is dropped on every process before the optimizer runs.
    A mixture of experts' router load-balancing loss is added over the whole step (loop/model/moe.py); the
    loss reported is the objective's alone, the balancing loss is `aux_loss` among the statistics.
    """
    normaliser = max(1, objective.normaliser(step))
    scale = accelerator.num_processes * len(step.micro_batches) / normaliser
    balance = router and moe.StepBalance(router, step.tokens, accelerator.num_processes, len(step.micro_batches),
                                         lambda t: accelerator.reduce(t, reduction="sum"), accelerator.device)
    n_stats = len(objective.statistics)
    # Summed over processes: the loss, non-finite losses, non-finite norms, preemption, the statistics, routing.
    summed = torch.zeros(4 + n_stats + (balance.size if balance else 0), device=accelerator.device)
    last = len(step.micro_batches) - 1
    for m, batch in enumerate(step.micro_batches):
        with timers("forward_backward"), memory.offloading(model):  # checkpoints kept on the host if asked
            batch = to_device(batch, accelerator.device)
            with router.recording() if router else nullcontext() as logits:
                loss, statistics = objective.loss_sum(model, batch)
            balancing = balance.add(logits, batch["token_index"]) if balance else 0.0
            summed[0] += loss.detach()
            summed[1] += (~torch.isfinite(loss + balancing)).float()
            summed[4 : 4 + n_stats] += statistics.detach()
            engine.backward(accelerator, model, loss * scale + balancing, m == last)
    grad_norm = engine.clip_gradients(accelerator, model, max_grad_norm)
    if torch.is_tensor(grad_norm):
        summed[2] += (~torch.isfinite(grad_norm)).float()
    summed[3].fill_(float(preempted))  # `summed[3] = x` would copy x from pageable memory: a synchronisation
    if balance:
        summed[4 + n_stats :] = balance.sums()
    total, bad_loss, bad_norm, stop, *rest = accelerator.reduce(summed, reduction="sum").tolist()
    stats, routing = rest[:n_stats], balance.value(rest[n_stats:]) if balance else None
    if bad_loss or bad_norm:
        engine.discard_gradients(accelerator, model, optimizer)
        return StepResult(None, grad_norm, "loss" if bad_loss else "gradient norm", bool(stop))
    with timers("optimizer"):
        grad_norm = engine.optimizer_step(accelerator, model, optimizer, grad_norm)
    if isinstance(grad_norm, float) and not math.isfinite(grad_norm):  # DeepSpeed found it and skipped the update
        return StepResult(None, grad_norm, "gradient norm", bool(stop))
    statistics = {name: value / normaliser for name, value in zip(objective.statistics, stats)}
    if routing:
        statistics["aux_loss"] = routing.aux_loss
    return StepResult(total / normaliser, grad_norm, None, bool(stop), statistics, routing)


@torch.no_grad()
def held_out_sums(model, accelerator, objective: Objective, batches: Iterable[Batch], count: int | None = None
                  ) -> torch.Tensor:
    """The objective over this process's held-out batches, summed over every process: [summed loss, summed
    normaliser (trained tokens, for supervised fine-tuning), summed statistics...]."""
    from tqdm import tqdm

    model.eval()
    total = torch.zeros(2 + len(objective.statistics), dtype=torch.float64, device=accelerator.device)
    for batch in tqdm(batches, total=count, desc="eval", leave=False, disable=not accelerator.is_main_process):
        batch = to_device(batch, accelerator.device)
        loss, statistics = objective.loss_sum(model, batch)
        total[0] += loss.double()
        total[1] += objective.batch_weight(batch).to(total.device, torch.float64)
        total[2:] += statistics.double()
    model.train()
    return accelerator.reduce(total, reduction="sum")


def evaluate_sources(model, accelerator, objective: Objective, planners: dict) -> dict[str, float]:
    """The held-out loss (and the objective's statistics) per normaliser unit over every eval set, and, for a
    mixture, each source's own loss as eval/loss/NAME."""
    sums = {name: held_out_sums(model, accelerator, objective, p.shard(), p.shard_batches)
            for name, p in planners.items()}
    total = torch.stack(list(sums.values())).sum(0)
    mean = (total / total[1].clamp(min=1)).tolist()
    out = {"eval/loss": mean[0]} | {f"eval/{name}": v for name, v in zip(objective.statistics, mean[2:])}
    if len(sums) > 1:
        out |= {f"eval/loss/{name}": (t[0] / t[1].clamp(min=1)).item() for name, t in sums.items()}
    return out
