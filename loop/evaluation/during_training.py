"""Code evaluation inside the run: at its checkpoints (or every N steps), the live model answers the problems,
split across processes (under ZeRO-3 every process joins every forward pass), each process runs its share of
programs contained, and the main process gathers the verdicts, logs pass@k and the time to every tracker and
train.log, saves the per-sample results next to the step's checkpoint and keeps the curve for the model card.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from accelerate.utils import gather_object

from loop.config import Config, ConfigError, EvaluationSettings, Sandbox
from loop.engine import registry
from loop.evaluation import generation, sandbox, scoring, tasks
from loop.report.card import RunSummary

UNCONTAINED = ("evaluation.sandbox: none: model-written programs run uncontained, with this user's rights "
               "and environment (the model card says so)")


def preflight(settings: EvaluationSettings) -> None:
    """Refuse, before any work, an evaluation this machine cannot run (one line, what to install); the
    problems are read (a bad file is a ProblemsError), and the sandbox must run a program here."""
    if settings.tasks == "none":
        return
    tasks.load(settings.tasks)
    problem = sandbox.check(settings.sandbox)
    if problem:
        raise ConfigError(f"evaluation.sandbox: {problem}")
    if settings.sandbox == "none":
        logging.getLogger("loop").warning(UNCONTAINED)


def describe_sandbox(kind: Sandbox) -> str:
    """How the programs ran, for the model card."""
    return "each contained by bubblewrap" if kind == "bubblewrap" else "**uncontained** (evaluation.sandbox: none)"


class CodeEval:
    """The evaluation of one run; calling it at a step evaluates when the settings say so."""

    def __init__(self, cfg: Config, accelerator, tokenizer, end_token: str, summary: RunSummary, start_step: int,
                 total_steps: int) -> None:
        self.settings, self.accelerator, self.tokenizer = cfg.evaluation, accelerator, tokenizer
        self.enabled = cfg.evaluation.tasks != "none"
        if not self.enabled:
            return
        self.stop_id = tokenizer.convert_tokens_to_ids(end_token)
        self.name = tasks.name_of(cfg.evaluation.tasks)
        self.problems = tasks.load(cfg.evaluation.tasks, cfg.evaluation.limit)
        self.seed, self.total_steps, self.out = cfg.training.seed, total_steps, Path(cfg.output.output_dir)
        self.history = self.out / "eval" / f"{self.name}.history.jsonl"
        self.curve = summary.code_scores.setdefault(f"{self.name} pass@1", [])
        summary.code_note = describe_sandbox(cfg.evaluation.sandbox)
        if accelerator.is_main_process:
            self.curve += resumed_curve(self.history, start_step)

    def due(self, step: int, checkpoint: Path | None) -> bool:
        every = self.settings.every
        if step == 0:
            return self.settings.at_start
        if step == self.total_steps:
            return True
        return checkpoint is not None if every == 0 else step % every == 0

    def __call__(self, model, step: int, checkpoint: Path | None) -> None:
        if not self.enabled or not self.due(step, checkpoint):
            return
        acc, settings = self.accelerator, self.settings
        mine = self.problems[acc.process_index::acc.num_processes]
        share = math.ceil(len(self.problems) / acc.num_processes)  # every process generates as many (ZeRO-3)
        synced = registry.of(acc).synced_generation(acc)
        answers, generate_s = generation.answers(
            acc.unwrap_model(model), self.tokenizer, mine + [self.problems[0]] * (share - len(mine)), settings,
            self.stop_id, synced, self.seed + step, acc.is_main_process, f"{self.name}")
        samples = tasks.samples(mine, answers, settings.samples_per_task)  # without the padding's
        scored, execute_s = scoring.execute(self.problems, samples, settings, show=acc.is_main_process)
        everything = gather_object([(scored, generate_s, execute_s)])
        if acc.is_main_process:
            self.record(step, checkpoint, everything)

    def record(self, step: int, checkpoint: Path | None, everything: list) -> None:
        """Write, log and keep what the processes found: their samples in problem order, the slowest's times."""
        order = {p["task_id"]: i for i, p in enumerate(self.problems)}
        scored = sorted((s for part, _, _ in everything for s in part), key=lambda s: order[s["task_id"]])
        summary = scoring.summarize(scored) | {
            "step": step, "tasks": self.settings.tasks, "sandbox": self.settings.sandbox,
            "generate_s": max(g for _, g, _ in everything), "execute_s": max(e for _, _, e in everything)}
        folder = checkpoint / "eval" if checkpoint else self.out / "eval" / f"step_{step:08d}"
        written = scoring.write(folder, self.name, scored, summary, self.problems)
        self.history.parent.mkdir(parents=True, exist_ok=True)
        with self.history.open("a") as f:
            f.write(json.dumps(summary) + "\n")
        self.curve[:] = [(s, v) for s, v in self.curve if s != step] + [(step, summary["pass@1"])]
        scalars = {k: v for k, v in summary.items() if k.startswith("pass@") or k.endswith("_s")}
        self.accelerator.log({f"eval/{self.name}/{k}": v for k, v in scalars.items()}, step=step)
        logging.getLogger("loop").info(f"step {step}: {scoring.describe(self.name, summary)}; results in {written}")


def resumed_curve(history: Path, start_step: int) -> list[tuple[int, float]]:
    """The scores an earlier part of this run logged up to the step it resumes from (the last one per step);
    the history file is rewritten without what a crashed part logged after it."""
    if not history.is_file():
        return []
    kept: dict[int, dict] = {}
    for line in history.read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:  # a line cut short by a crash
            continue
        if entry.get("step", math.inf) <= start_step:
            kept[entry["step"]] = entry
    history.write_text("".join(json.dumps(e) + "\n" for _, e in sorted(kept.items())))
    return [(step, e["pass@1"]) for step, e in sorted(kept.items())]
