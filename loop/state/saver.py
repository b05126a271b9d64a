"""The checkpoint component of the loop: it decides when to save (every `save_every` steps, at the last step,
and at once when the run must stop), saves (checkpoints.py), says so, and hands the checkpoint to the Hub
uploads when the run pushes them."""

from __future__ import annotations

import logging
from pathlib import Path

from loop.config import Config
from loop.state import checkpoints
from loop.state.progress import LoopState, due


class Saver:
    def __init__(self, accelerator, cfg: Config, root: Path, model, tokenizer, run: str, uploads,
                 total_steps: int) -> None:
        self.accelerator, self.cfg, self.root, self.model, self.tokenizer = accelerator, cfg, root, model, tokenizer
        self.run, self.uploads, self.total_steps = run, uploads, total_steps

    def maybe_save(self, state: LoopState, now: bool = False) -> Path | None:
        """The checkpoint of this step when it is due, or `now` (a preemption); None when nothing was saved."""
        if not self.cfg.output.save or not (now or due(state.step, self.cfg.training.save_every, self.total_steps)):
            return None
        saved = checkpoints.save(self.accelerator, state, self.cfg, self.root, self.model, self.tokenizer, self.run)
        logging.getLogger("loop").info(f"checkpoint {saved}")
        if self.uploads:
            self.uploads.submit(saved)
        return saved
