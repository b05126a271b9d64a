"""Direct preference optimisation, the second objective: for each pair, how much more the policy than the
reference prefers the chosen answer to the rejected one, pushed up through a log-sigmoid (or IPO's square).

A sequence's log-probability is the sum over its completion (the last assistant turn and its end token),
computed inside the output projection chunk by chunk (loop/model/head.py), never as float32 logits of the
whole micro-batch. A step is normalised by the pairs of all its micro-batches on every process, so the loss
is the mean over every pair of the step for any split into processes and accumulation steps. The statistics
are TRL's, summed per pair: rewards (beta times the log-ratio to the reference), their accuracy and margin,
and the policy's log-probabilities. It reads preference pairs (loop/data/preference.py), trains without
dropout, and computes its reference before training (reference.py) unless the reference is live.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from loop.config import Config, DpoSettings
from loop.data import pairs, preference
from loop.data.batches import Batch, Step
from loop.data.prepare import Prepared
from loop.data.records import DataError
from loop.model import sequence_parallel
from loop.processes import main_decides
from loop.training import reference
from loop.training.objective import CardSection, Objective, Plugin
from loop.training.sequences import sequence_log_probs

STATISTICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
              "logps/rejected")


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


def one_share(summed: torch.Tensor) -> torch.Tensor:
    """With sequence parallelism every process sharing a row computes its pairs' whole loss (from the
    log-probabilities summed over the row, sequence_parallel.whole_row_sum): each reports 1/size of it, so the
    step's sum over processes counts a pair once, and keeps the whole gradient, which flows only through its own
    chunk's tokens, so the processes' gradients add up to the pair's."""
    size = sequence_parallel.current().size
    return summed if size == 1 else summed - (summed * (1 - 1 / size)).detach()


def pairs_in_step(step: Step) -> int:
    return len(step.piece_lengths) // 2


def pairs_in_batch(batch: Batch) -> torch.Tensor:
    share = sequence_parallel.current().size  # the processes sharing a row all see its pairs
    return torch.tensor(batch["sequence_ids"].shape[0] // 2 / share, dtype=torch.float32)


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
        return one_share(losses.sum()), one_share(statistics)

    return Objective("dpo", loss_sum, pairs_in_step, pairs_in_batch, STATISTICS)


def prepare_here(cfg: Config, tokenizer) -> Prepared:
    return preference.prepare(cfg.data, cfg.dpo, tokenizer)


def prepare_run(accelerator, cfg: Config, tokenizer) -> Prepared:
    """Preference pairs are records of their own, prepared in memory: the main process first (a data error it
    finds ends every process with it), then the others."""
    made: list[Prepared] = []
    main_decides(accelerator, lambda: made.append(prepare_here(cfg, tokenizer)), (DataError,))
    return made[0] if made else prepare_here(cfg, tokenizer)


def check_data(cfg: Config, tokenizer) -> None:
    preference.load(cfg.data)  # listed, counted and refused as the run would


def reference_pass(accelerator, model, cfg: Config, planners: dict, added_tokens: list[int], attention: str) -> dict:
    """The starting model's log-probabilities of every pair, before a checkpoint replaces it (computed once,
    cached, read again on resume); a live reference needs none."""
    if cfg.dpo.reference != "precomputed":
        return planners
    key = reference.cache_key(cfg, planners, added_tokens, str(accelerator.mixed_precision), attention,
                              accelerator.num_processes)
    return reference.attach(accelerator, model, cfg, planners, key,
                            Path(cfg.data.cache_dir or Path(cfg.output.output_dir) / "reference"))


REFERENCE = {"precomputed": "the starting model's log-probabilities, computed once before training",
             "live": "the base with the LoRA adapter switched off, at every step"}


def card(cfg: Config, final_eval: dict[str, float]) -> CardSection:
    p, accuracy = cfg.dpo, final_eval.get("eval/rewards/accuracies")
    return CardSection(
        tags=["dpo"], data="preference pairs",
        hyperparameters={"objective": "DPO (direct preference optimization)", "DPO beta": p.beta,
                         "DPO loss": p.loss + (f", label smoothing {p.label_smoothing}" if p.label_smoothing else ""),
                         "reference": REFERENCE[p.reference]},
        trained="preference-tuned with DPO on pairs of answers with `loop`, a hand-written Accelerate + DeepSpeed "
                "training\nloop. Only the last assistant turn of each answer counted in its log-probability.",
        results="; final eval reward accuracy (chosen preferred to rejected): "
                + ("not measured" if accuracy is None else f"{accuracy:.1%}"))


PLUGIN = Plugin("dpo", loss=lambda cfg: objective(cfg.dpo), prepare=prepare_here, prepare_run=prepare_run,
                check_data=check_data, card=card, batch_keys=pairs.pair_keys(), dropout=False,
                before_training=reference_pass,
                eval_words=lambda result: f", reward accuracy {result['eval/rewards/accuracies']:.1%}",
                console={"train/rewards/accuracies": "reward acc {:.0%}"},
                sequence_label=lambda i: f"pair {i // 2}, {('chosen', 'rejected')[i % 2]}, ", dialogues=False)
