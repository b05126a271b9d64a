"""Resumable state: checkpoints that a crash cannot corrupt, finding and loading them, pruning, pins.

A checkpoint is written into `.tmp-step_N`, renamed to `step_N` when every process has finished,
and only then marked with a `COMPLETE` file. Resume picks the newest directory with that marker, so
a run killed mid-write falls back to the previous checkpoint. A pinned checkpoint (a background
upload still reads it) is never pruned. Turning a checkpoint into a model is loop/export.py's job.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from loop import config as config_mod
from loop.preemption import any_process

if TYPE_CHECKING:  # tools that only read checkpoints need not import accelerate / transformers
    from accelerate import Accelerator
    from transformers import PreTrainedTokenizerBase

MARKER = "COMPLETE"
IN_USE = ".in_use"  # a background job (upload) still reads this checkpoint: do not prune it
STATE_FILE = "loop_state.json"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or resumed; the message says what to do."""


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


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def complete_checkpoints(root: Path) -> list[Path]:
    """Finished checkpoints under root, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step_*") if (p / MARKER).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def missing_files(path: Path, world_size: int, deepspeed: bool) -> list[str]:
    """Files every process must have written; a checkpoint lacking any is never marked complete."""
    missing = [f"random_states_{r}.pkl" for r in range(world_size) if not (path / f"random_states_{r}.pkl").is_file()]
    if deepspeed:
        shards = path / "pytorch_model"
        for r in range(world_size):
            if not (shards / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt").is_file():
                missing.append(f"pytorch_model/zero_pp_rank_{r}_mp_rank_00_model_states.pt")
            if not list(shards.glob(f"*zero_pp_rank_{r}_mp_rank_00_optim_states.pt")):
                missing.append(f"pytorch_model/*zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
    return missing


def save(accelerator: Accelerator, state: LoopState, cfg: config_mod.Config, root: Path, model,
         tokenizer: PreTrainedTokenizerBase) -> Path:
    """Write a checkpoint atomically on every process; prune to the last `keep_last`.

    Besides the ZeRO-3 shards it holds the model config, generation config and tokenizer, so that
    tools/consolidate_checkpoint.py and tools/generate.py need nothing else.
    """
    name = f"step_{state.step:08d}"
    tmp, final = root / f".tmp-{name}", root / name

    def together(action, failure: str) -> None:
        """Run this process's part; if it failed on any process, every process raises together.

        The agreement is the only collective here, so a failing process never leaves the others
        waiting in a different one.
        """
        error = None
        try:
            action()
        except Exception as e:  # noqa: BLE001 - any write failure must reach every process
            error = e
        if any_process(accelerator, error is not None):
            if accelerator.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(f"{failure} ({error or 'on another process'}); the previous checkpoint is "
                                  "untouched. Free disk space or fix permissions, then resume.")

    def create() -> None:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)

    def finish() -> None:  # main process, after every process has written its shards
        if not accelerator.is_main_process:
            return
        missing = missing_files(tmp, accelerator.num_processes, accelerator.state.deepspeed_plugin is not None)
        if missing:
            raise CheckpointError(f"files missing after every process saved: {missing[:6]} "
                                  "(is the output directory shared by all nodes?)")
        (tmp / STATE_FILE).write_text(json.dumps(dataclasses.asdict(state), indent=2))
        config_mod.save(cfg, tmp / "run_config.yaml")
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.config.save_pretrained(tmp)
        unwrapped.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    together(create, f"cannot create {tmp}")
    together(lambda: accelerator.save_state(str(tmp)), f"writing checkpoint {final} failed")
    together(finish, f"writing checkpoint {final} failed")
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        marker = final / f".{MARKER}"
        marker.write_text(f"step {state.step}\n")
        marker.rename(final / MARKER)
        _fsync_dir(final)
        _fsync_dir(root)
        prune(root, cfg.training.keep_last)
    accelerator.wait_for_everyone()
    return final


def prune(root: Path, keep_last: int) -> None:
    """Remove all but the newest `keep_last` complete checkpoints (pinned ones stay) and stale temps."""
    for old in complete_checkpoints(root)[:-keep_last]:
        if not (old / IN_USE).exists():
            shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


def pin(checkpoint: Path) -> None:
    """Keep `checkpoint` from being pruned until `unpin`."""
    (checkpoint / IN_USE).touch()


def unpin(checkpoint: Path) -> None:
    (checkpoint / IN_USE).unlink(missing_ok=True)


def find(spec: str, root: Path) -> Path:
    """Resolve `latest` or a path to a complete checkpoint directory."""
    if spec == "latest":
        found = complete_checkpoints(root)
        if not found:
            raise CheckpointError(f"--resume_from_checkpoint latest: no complete checkpoint under {root}")
        return found[-1]
    path = Path(spec)
    if not (path / MARKER).is_file():
        raise CheckpointError(f"--resume_from_checkpoint {path}: not a complete checkpoint (no {MARKER} file)")
    return path


def load(accelerator: Accelerator, path: Path) -> LoopState:
    """Restore model, optimizer and every process's RNG states, and return the loop state."""
    state = LoopState(**json.loads((path / STATE_FILE).read_text()))
    if state.world_size != accelerator.num_processes:
        raise CheckpointError(
            f"{path} was written by {state.world_size} processes and this run has "
            f"{accelerator.num_processes}; ZeRO-3 shards cannot be re-partitioned on load. Either launch "
            f"with --num_processes {state.world_size}, or turn it into a model with "
            f"`python tools/consolidate_checkpoint.py {path} MODEL_DIR` and start a new run from "
            "MODEL_DIR (model.name_or_path), which restarts the optimizer state."
        )
    accelerator.load_state(str(path))
    return state


def resume(accelerator: Accelerator, spec: str | None, root: Path) -> tuple[LoopState, str | None]:
    """The loop state to start from (restoring model, optimizer and RNG when resuming), and what to log.

    `latest` with no checkpoint yet starts fresh, so one job script serves the first run and every requeue.
    """
    fresh = LoopState(world_size=accelerator.num_processes)
    if not spec:
        return fresh, None
    if spec == "latest" and not complete_checkpoints(root):
        return fresh, f"--resume_from_checkpoint latest: no complete checkpoint under {root} yet; starting fresh"
    path = find(spec, root)
    state = load(accelerator, path)
    return state, f"resumed from {path} at step {state.step}"


def last_good(root: Path) -> str:
    """The newest complete checkpoint, for messages that say where to resume from."""
    found = complete_checkpoints(root)
    return str(found[-1]) if found else "none"
