"""The loop's own state, saved in every checkpoint beside the model, optimizer and RNG states: with the seed,
its step fixes the position in the data order, so a resumed run continues exactly."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass
class LoopState:
    """Everything the loop needs besides model, optimizer and RNG states to continue exactly."""

    step: int = 0  # optimizer steps done; with the seed, this fixes the position in the data order
    epoch: int = 0  # for readers: derived from step and the steps per epoch
    step_in_epoch: int = 0
    tokens_seen: int = 0
    tokens_trained: int = 0
    samples_seen: int = 0
    skipped_steps: int = 0
    world_size: int = 1
    data_fingerprint: str = ""  # of the train and eval dialogues (loop/data/prepare.py)
    eval_losses: list = dataclasses.field(default_factory=list)  # [step, eval loss] so far, for the model card

    def advance(self, tokens: int, rows: int, trained: int, skipped: bool, steps_per_epoch: int) -> None:
        """Count one optimizer step (a skipped one trained nothing)."""
        self.step += 1
        self.epoch, self.step_in_epoch = divmod(self.step, steps_per_epoch)
        self.tokens_seen += tokens
        self.samples_seen += rows
        if skipped:
            self.skipped_steps += 1
        else:
            self.tokens_trained += trained
