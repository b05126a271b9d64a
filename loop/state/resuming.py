"""Where a run starts: the checkpoint to resume from, chosen, checked and compared with this run before the run
writes anything (`plan`), and read once the model is built (`restore`). On another number of processes, or
another sequence-parallel size, the accumulation steps are set to keep the global batch, and the checkpoint is
read from a copy re-partitioned beside it; a config that changes what a step means is refused."""

from __future__ import annotations

import dataclasses
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from loop import config as config_mod
from loop.config import ConfigError
from loop.engine import registry
from loop.engine.safe_load import ConsolidationError, UntrustedCheckpoint
from loop.processes import main_decides
from loop.state import integrity
from loop.state.checkpoints import (
    RESHARDED,
    CheckpointError,
    choose_intact,
    complete_checkpoints,
    new_run_id,
    no_space,
    run_of,
    unfinished,
)
from loop.state.progress import LoopState

if TYPE_CHECKING:
    from accelerate import Accelerator


Note = tuple[int, str]  # (logging level, text): what resuming has to say, and how loudly


@dataclass
class Resume:
    """Where a run starts: a fresh state, or a checkpoint (chosen, checked and compared, not yet loaded)."""

    state: LoopState
    notes: list[Note]
    path: Path | None = None
    run: str = field(default_factory=new_run_id)  # a resumed run keeps the id of the run it continues
    written_by: int = 0  # how many processes wrote the checkpoint (0: fresh)


def plan(accelerator: Accelerator, cfg: config_mod.Config, root: Path, data_fingerprint: str) -> Resume:
    """Everything resume checks, before the run writes anything: the checkpoint (the newest intact one for
    `latest`), its loop state, and the config compared with the one it was saved with.

    `latest` with no checkpoint yet starts fresh, so one job script serves the first run and every requeue.
    """
    engine = registry.of(accelerator)
    fresh = LoopState(world_size=accelerator.num_processes, data_fingerprint=data_fingerprint, engine=engine.name)
    spec = cfg.output.resume_from_checkpoint
    if not spec:
        return Resume(fresh, [])
    if spec == "latest" and not complete_checkpoints(root):
        left = unfinished(root)
        if left:
            return Resume(fresh, [(logging.WARNING, f"--resume_from_checkpoint latest: no complete checkpoint under "
                                                    f"{root}, only {', '.join(left[:5])}; starting fresh from step 0 "
                                                    "(they are left as they are)")])
        return Resume(fresh, [(logging.INFO, f"--resume_from_checkpoint latest: no complete checkpoint under {root} "
                                             "yet; starting fresh")])
    # One process checks the files; all use its choice.
    path, state, passed_over = main_decides(accelerator, lambda: choose_intact(spec, root), (CheckpointError,))
    saved = registry.of_checkpoint(path, state.engine)
    if saved is not engine:
        raise CheckpointError(
            f"{path} was written by {saved.title} and this run uses {engine.title}: a checkpoint resumes only "
            f"under the engine that wrote it. Turn it into a model with `python tools/consolidate_checkpoint.py "
            f"{path} MODEL_DIR` and start a new run from MODEL_DIR (model.name_or_path), which restarts the "
            "optimizer state; or launch as the run that wrote it was")
    notes = [(logging.WARNING, note) for note in passed_over]
    saved_cfg = yaml.safe_load((path / "run_config.yaml").read_text())
    written_by = state.world_size
    notes += keep_global_batch(accelerator, cfg, saved_cfg, path, written_by)
    notes += compare(cfg, saved_cfg, state, data_fingerprint)
    state = dataclasses.replace(state, world_size=accelerator.num_processes)  # what its next checkpoint holds
    return Resume(state, [*notes, (logging.INFO, f"resumed from {path} at step {state.step}")], path, run_of(path),
                  written_by)


def keep_global_batch(accelerator: Accelerator, cfg: config_mod.Config, saved: dict, path: Path,
                      written_by: int) -> list[Note]:
    """On another number of processes than wrote the checkpoint, or another sequence-parallel size, keep the
    global batch (the rows of every step, planned from the seed, the epoch and the global batch only:
    loop/data/batches.py) by setting the accumulation steps so that data-parallel groups x accumulation stays as
    it was; refuse where that cannot be, or where the engine's checkpoints cannot be re-partitioned.
    `cfg.training` and the engine's settings are changed in place."""
    world, t = accelerator.num_processes, cfg.training
    sp_before = int((saved.get("parallelism") or {}).get("sequence_parallel_size", 1))
    width_before, width = written_by // sp_before, world // cfg.parallelism.sequence_parallel_size
    if written_by == world and width == width_before:
        return []
    engine = registry.of(accelerator)
    if written_by != world and engine.reshard is None:
        raise CheckpointError(
            f"{path} was written by {written_by} processes and this run has {world}; {engine.title} checkpoints "
            f"resume only on as many processes as wrote them. Launch with --num_processes {written_by}, or turn it "
            f"into a model with `python tools/consolidate_checkpoint.py {path} MODEL_DIR` and start a new run from "
            "MODEL_DIR (model.name_or_path), which restarts the optimizer state.")
    before = int((saved.get("training") or {}).get("gradient_accumulation_steps", t.gradient_accumulation_steps))
    micro = width_before * before  # micro-batches of rows per optimizer step, over all data-parallel groups
    sp = cfg.parallelism.sequence_parallel_size
    if micro % width:
        raise CheckpointError(
            f"{path} was written by {_processes(written_by, sp_before)} x {before} accumulation steps = {micro} "
            f"micro-batches a step, which {_processes(world, sp)} cannot split evenly; launch with a number of "
            + (f"processes that divides {micro}" if sp == 1 else f"data-parallel groups that divides {micro}"))
    if t.gradient_accumulation_steps not in (before, micro // width):
        return []  # the global batch itself changed: compare() refuses it, as any change of what a step is
    t.gradient_accumulation_steps = micro // width
    accelerator.gradient_accumulation_steps = t.gradient_accumulation_steps
    engine.configure(accelerator, t)  # the engine's batch settings, before the model is built and prepared
    saved.setdefault("training", {})["gradient_accumulation_steps"] = t.gradient_accumulation_steps  # not a change
    shards = "its shards are re-partitioned on load, and " if written_by != world else ""
    return [(logging.INFO, f"{path} was written by {_processes(written_by, sp_before)} and this run has "
                           f"{world if sp == 1 else _processes(world, sp)}: {shards}the accumulation steps set to "
                           f"{t.gradient_accumulation_steps} (from {before}) so that every step trains on the "
                           "same rows")]


def _processes(n: int, sequence_parallel: int) -> str:
    if sequence_parallel == 1:
        return f"{n} processes"
    return f"{n} processes ({n // sequence_parallel} data-parallel groups of {sequence_parallel})"


def compare(cfg: config_mod.Config, saved: dict, state: LoopState, data_fingerprint: str) -> list[Note]:
    """Refuse a resume whose config changes the data order or what a step means (unless
    output.allow_config_change); return a warning for every other change, which applies."""
    identity, other = config_mod.differences(saved, cfg)
    if state.data_fingerprint and state.data_fingerprint != data_fingerprint:
        identity.append("the training data's content (the files hold other dialogues than when it was saved)")
    if identity and not cfg.output.allow_config_change:
        raise ConfigError(
            "resuming with a config that changes the data order or what a step means: " + "; ".join(identity)
            + ". Start a new output_dir, or pass --allow_config_change true to resume anyway")
    notes = [(logging.WARNING, f"resuming with changed settings (applied): {'; '.join(other)}")] if other else []
    if identity:
        notes.append((logging.WARNING, f"resuming with --allow_config_change despite: {'; '.join(identity)}"))
    return notes


def restore(accelerator: Accelerator, model, resume: Resume, partial: bool = False) -> None:
    """Restore model, optimizer and every process's RNG state from the planned checkpoint (nothing to do
    for a fresh start), reading nothing that can run code. A partial checkpoint (LoRA) holds only what
    trains; the rest is already the model's own."""
    if resume.path is None:
        return
    from loop.engine.accelerator import safe_state_loading

    engine = registry.of(accelerator)
    folder = resume.path
    if resume.written_by not in (0, accelerator.num_processes):  # a copy beside it: the checkpoint stays as it is
        folder = resume.path.parent / f"{RESHARDED}{resume.path.name}"

        def build() -> None:
            shutil.rmtree(folder, ignore_errors=True)  # a crash's leftover
            engine.reshard(accelerator, resume.path, folder)

        try:
            main_decides(accelerator, build, (ConsolidationError, UntrustedCheckpoint, OSError))
        except (ConsolidationError, UntrustedCheckpoint, OSError) as e:
            shutil.rmtree(folder, ignore_errors=True)
            raise CheckpointError(f"cannot re-partition {resume.path} for {accelerator.num_processes} processes: "
                                  f"{no_space(e, folder) or e}; it is untouched") from None
    try:
        with safe_state_loading():
            engine.load_state(accelerator, folder, model, partial)
        integrity.load_rng(folder, accelerator.process_index)
    except UntrustedCheckpoint as e:
        raise CheckpointError(str(e)) from None
    finally:
        if folder != resume.path:
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                shutil.rmtree(folder, ignore_errors=True)
