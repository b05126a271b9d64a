"""Supervised fine-tuning, the first objective: the cross-entropy of every trained (assistant) token, a step
normalised by the trained tokens of all its micro-batches on every process, so that the loss is the mean
over tokens and not a mean of per-micro-batch means. It reads dialogues (loop/data/prepare.py: validated,
tokenized and packed into a cache folder)."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from loop.config import Config
from loop.data.batches import Batch, Step
from loop.data.prepare import Prepared, open_prepared, prepare
from loop.data.records import DataError
from loop.model.head import summed_cross_entropy
from loop.processes import main_decides
from loop.training.objective import CardSection, Objective, Plugin

NO_STATISTICS = torch.zeros(0)


def loss_sum(model, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    loss = summed_cross_entropy(model, batch)
    return loss, NO_STATISTICS.to(loss.device)


def trained_tokens(step: Step) -> int:
    return step.trained


def batch_tokens(batch: Batch) -> torch.Tensor:
    return torch.tensor(batch["target_index"].numel(), dtype=torch.float32)


SFT = Objective("sft", loss_sum, trained_tokens, batch_tokens)


def prepare_here(cfg: Config, tokenizer) -> Prepared:
    return open_prepared(prepare(cfg.data, tokenizer), cfg.data, cfg.training.seed)


def prepare_run(accelerator, cfg: Config, tokenizer) -> Prepared:
    """The main process prepares the data (or finds it in the cache) and every process memory-maps the same
    folder; a data error the main process finds ends every process with it, instead of leaving them waiting.
    A process that cannot see the main's cache folder (node-local disks) prepares its own copy."""
    folder = Path(main_decides(accelerator, lambda: str(prepare(cfg.data, tokenizer)), (DataError,)))
    if not (folder / "meta.json").is_file():
        folder = prepare(cfg.data, tokenizer, progress=False)
    return open_prepared(folder, cfg.data, cfg.training.seed)


def check_data(cfg: Config, tokenizer) -> None:
    prepare(cfg.data, tokenizer)  # into the cache the training processes then start from


def card(cfg: Config, final_eval: dict[str, float]) -> CardSection:
    return CardSection(tags=[], hyperparameters={}, results="", data=cfg.data.format,
                       trained="trained on multi-turn dialogues with `loop`, a hand-written Accelerate + DeepSpeed "
                               "training\nloop. Only assistant turns were trained.")


def perplexity(result: dict[str, float]) -> dict[str, float]:
    return {"eval/perplexity": math.exp(min(result["eval/loss"], 50))}


PLUGIN = Plugin("sft", loss=lambda cfg: SFT, prepare=prepare_here, prepare_run=prepare_run, check_data=check_data,
                card=card, eval_scalars=perplexity)
