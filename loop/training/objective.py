"""The seams between the run and what it optimises.

`Objective` is the step's: for one device micro-batch, its summed loss and the sums of its statistics; and
what the summed losses of a whole step (every micro-batch of every process) are divided by. The step then
takes the mean of the loss over that normaliser, for any split into processes and accumulation steps, and
logs each statistic as a mean per the same unit. Evaluation sums the same quantities over held-out batches.

`Plugin` is the run's: everything else an objective needs from the run, declared by its module (sft.py,
dpo.py) and picked by training.objective (registry.py), so that no code outside loop/training/ asks which
objective runs. The report stage may not import this stage, so what the objective says about itself there
(its console statistics, its model-card section) is plain data.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypedDict

import torch

from loop.config import Config
from loop.data.batches import Batch, Step
from loop.data.packing import Row
from loop.data.prepare import Prepared


@dataclass(frozen=True)
class Objective:
    name: str
    # (summed loss as a float32 scalar with gradient, summed statistics as a float32 vector) of a device batch
    loss_sum: Callable[[torch.nn.Module, Batch], tuple[torch.Tensor, torch.Tensor]]
    normaliser: Callable[[Step], int]  # what a step's summed loss is divided by, over every process
    batch_weight: Callable[[Batch], torch.Tensor]  # the same for one device batch (evaluation)
    statistics: tuple[str, ...] = ()  # names of the summed statistics, reported per normaliser unit


class CardSection(TypedDict):
    """The objective's part of the model card (loop/report/card.py), as plain text."""

    tags: list[str]  # Hub tags besides the shared ones
    hyperparameters: dict[str, object]  # rows before the shared ones
    trained: str  # how the model was made, after "A chat model fine-tuned from BASE, "
    results: str  # added to the results line (the final eval loss is there already)
    data: str  # what the training files held


# Before training, with the prepared engine: (accelerator, model, cfg, planners by name ("train", "eval/NAME"),
# the template's added tokens, the attention) -> the planners to train and evaluate with.
BeforeTraining = Callable[[Any, torch.nn.Module, Config, dict, list[int], str], dict]


def no_hook(accelerator, model, cfg: Config, planners: dict, added_tokens: list[int], attention: str) -> dict:
    return planners


@dataclass(frozen=True)
class Plugin:
    """What a run needs from one objective, besides its loss."""

    name: str  # training.objective's value
    loss: Callable[[Config], Objective]  # the step's seam, with this run's settings
    prepare: Callable[[Config, Any], Prepared]  # the data it trains on, prepared in this process (a tool)
    prepare_run: Callable[[Any, Config, Any], Prepared]  # the same on every process of a run (accelerator first)
    check_data: Callable[[Config, Any], None]  # what a launcher checks (and caches) before starting processes
    card: Callable[[Config, dict[str, float]], CardSection]  # (config, the final eval's scalars) -> card section
    batch_keys: Callable[[Batch, list[Row]], Batch] | None = None  # what it adds to each batch (a Planner's extra)
    dropout: bool = True  # False: the model trains (and the attention is chosen) with every dropout rate at 0
    before_training: BeforeTraining = no_hook  # runs once the engine is prepared, before a checkpoint is restored
    eval_scalars: Callable[[dict[str, float]], dict[str, float]] = lambda result: {}  # logged beside eval/loss
    eval_words: Callable[[dict[str, float]], str] = lambda result: ""  # after "eval loss X" in the eval line
    console: dict[str, str] = field(default_factory=dict)  # train scalar -> its format in the console line
    sequence_label: Callable[[int], str] = lambda i: ""  # what sequence i of the prepared columns is (a tool)
    dialogues: bool = True  # its data are dialogues as the chat template renders them (False: e.g. pairs)
