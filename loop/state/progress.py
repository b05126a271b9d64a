"""The loop's own state, saved in every checkpoint beside the model, optimizer and RNG states: with the seed,
its step fixes the position in the data order, so a resumed run continues exactly. Read back only through
`from_json`, which refuses a state that is not what the loop writes (a bad one makes its checkpoint broken)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from loop.config import first_line

STATE_FILE = "loop_state.json"
RENAMED = {"evals": "eval_losses"}  # old key -> its name since 2026-12


def due(step: int, every: int, last: int) -> bool:
    """The schedule every component of the loop keeps (logging, evaluation, samples, checkpoints): every
    `every` steps (0: never) and at the last step."""
    return step == last or (every > 0 and step % every == 0)


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
    engine: str = ""  # the engine that wrote the checkpoint (loop/engine/registry.py); "" before 2026-12
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

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)


COUNTERS = ("step", "epoch", "step_in_epoch", "tokens_seen", "tokens_trained", "samples_seen", "skipped_steps",
            "world_size")


def from_json(text: str, folder_step: int | None = None) -> LoopState:
    """The state a checkpoint's loop_state.json holds, or ValueError saying what is wrong with it: keys,
    types and ranges as the loop writes them, counters consistent with each other and, when the checkpoint's
    folder is named step_N, a step of N."""
    try:
        data = json.loads(text)
    except ValueError as e:
        raise ValueError(f"not JSON ({first_line(e, 120)})") from None
    if not isinstance(data, dict):
        raise ValueError(f"not a JSON object but {type(data).__name__}")
    for old, new in RENAMED.items():
        if old in data and new not in data:
            data[new] = data.pop(old)
    unknown = sorted(set(data) - {f.name for f in dataclasses.fields(LoopState)})
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(map(repr, unknown[:5]))}")
    if "step" not in data:
        raise ValueError("no 'step'")
    for key in COUNTERS:
        value = data.get(key, 0 if key != "world_size" else 1)
        if type(value) is not int:  # bool is an int to isinstance; 1e9 and "5" are not steps
            raise ValueError(f"{key}: {value!r} is not a whole number")
        if value < (1 if key == "world_size" else 0):
            raise ValueError(f"{key}: {value} is out of range")
    for key in ("data_fingerprint", "engine"):
        if not isinstance(data.get(key, ""), str):
            raise ValueError(f"{key}: {data[key]!r} is not a string")
    state = LoopState(**data)
    for key in ("epoch", "step_in_epoch", "skipped_steps"):
        if getattr(state, key) > state.step:
            raise ValueError(f"{key}: {getattr(state, key)} is more than the step, {state.step}")
    if state.tokens_trained > state.tokens_seen:
        raise ValueError(f"tokens_trained: {state.tokens_trained} is more than tokens_seen, {state.tokens_seen}")
    if not isinstance(state.eval_losses, list) or not all(_eval_point(p, state.step) for p in state.eval_losses):
        raise ValueError(f"eval_losses: not a list of [step, loss] pairs up to step {state.step}")
    if folder_step is not None and state.step != folder_step:
        raise ValueError(f"step: {state.step}, but the checkpoint's folder is step {folder_step}'s")
    return state


def _eval_point(point, step: int) -> bool:
    if not isinstance(point, list) or len(point) != 2:
        return False
    at, loss = point
    return type(at) is int and 0 <= at <= step and type(loss) in (int, float)  # a diverged run's loss is nan
