"""The held-out evaluation inside the run: the objective's loss (and its statistics) over every eval set at the
start, every `training.eval_every` steps and at the last step; to every tracker, one line on the console and
in train.log, and every eval scalar in train.log beside the train ones (for preference tuning: loss, reward
accuracy, margins, chosen and rejected rewards and log-probabilities); kept for the model card."""

from __future__ import annotations

import logging

from loop.report.card import RunSummary
from loop.report.logs import FILE_ONLY
from loop.report.metrics import full_line
from loop.state.progress import LoopState, due
from loop.training.objective import Objective, Plugin
from loop.training.step import evaluate_sources


class Evaluator:
    def __init__(self, model, accelerator, plugin: Plugin, objective: Objective, planners: dict, every: int,
                 total_steps: int, summary: RunSummary) -> None:
        self.model, self.accelerator, self.plugin, self.objective = model, accelerator, plugin, objective
        self.planners, self.every, self.total_steps, self.summary = planners, every, total_steps, summary
        self.rows = sum(len(p.rows) for p in planners.values())

    def maybe_evaluate(self, state: LoopState) -> None:
        """At step 0 (the starting point of the eval curve) and on the schedule; never without eval rows."""
        if self.rows and (state.step == 0 or due(state.step, self.every, self.total_steps)):
            self.evaluate(state)

    def ensure_final(self, state: LoopState) -> None:
        """A run resumed at its last step evaluated nothing: the model card still gets an eval loss."""
        if self.rows and self.summary.eval_loss is None:
            self.evaluate(state)

    def evaluate(self, state: LoopState) -> dict[str, float]:
        result = evaluate_sources(self.model, self.accelerator, self.objective, self.planners)
        self.summary.eval_loss, self.summary.eval_results = result["eval/loss"], result
        state.eval_losses.append([state.step, result["eval/loss"]])
        scalars = result | self.plugin.eval_scalars(result)
        self.accelerator.log(scalars, step=state.step)
        by_source = ", ".join(f"{k.removeprefix('eval/loss/')} {v:.4f}" for k, v in result.items()
                              if k.startswith("eval/loss/"))
        log = logging.getLogger("loop")
        log.info(f"step {state.step}: eval loss {result['eval/loss']:.4f}{self.plugin.eval_words(result)}"
                 + (f" ({by_source})" if by_source else ""))
        log.info(f"step {state.step}: {full_line(scalars)}", extra=FILE_ONLY)
        return result
