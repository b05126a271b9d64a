"""Resumable state: checkpoints that a crash cannot corrupt, finding and loading them, pruning, pins.

A checkpoint is written into `.tmp-step_N`, renamed to `step_N` when every process has finished,
and only then marked with a `COMPLETE` file. Resume takes the newest complete checkpoint that is
intact (integrity.py: every file there, with its saved size and digest, nothing but plain data in it,
and a loop state the loop writes), naming what is wrong with the ones it passes over, and refuses a
config that would change what a step means; all of that is decided before the run writes anything
(`plan_resume`), the weights are read once the model is built (`restore`): on another number of processes
from a copy re-partitioned beside the checkpoint, the accumulation steps set to keep the global batch. The
tools read checkpoints through `usable`, the same verification. A pinned checkpoint (a background upload still
reads it) is never pruned. Turning a checkpoint into a model is export.py's job.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from loop import config as config_mod
from loop.config import ConfigError, RunError
from loop.data import templates
from loop.engine import registry
from loop.engine.safe_load import ConsolidationError, UntrustedCheckpoint
from loop.processes import any_process, main_decides
from loop.state import integrity, progress
from loop.state.integrity import IN_USE, MARKER
from loop.state.progress import STATE_FILE, LoopState

if TYPE_CHECKING:  # tools that only read checkpoints need not import accelerate / transformers
    from accelerate import Accelerator
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger("loop")
RESHARDED = ".resharded-"  # beside a checkpoint: its copy for another number of processes, while it loads


class CheckpointError(RunError, RuntimeError):
    """A checkpoint cannot be written or resumed; the message says what to do."""


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
    found = [p for p in root.iterdir() if re.fullmatch(r"step_\d+", p.name) and (p / MARKER).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def unfinished(root: Path) -> list[str]:
    """Checkpoint folders under root that are not complete, each with what it lacks."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if integrity.folder_step(p) is not None and not (p / MARKER).is_file()]
    return [f"{p.name} ({'a save that never finished' if p.name.startswith('.tmp-') else f'no {MARKER} file'})"
            for p in sorted(found, key=integrity.folder_step)]


def no_space(error: BaseException | None, path: Path) -> str | None:
    """'no space left on device' when that is what happened, whatever the writer's own message says."""
    chain = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or error.__context__
    try:
        free = shutil.disk_usage(path if path.exists() else path.parent).free
    except OSError:
        free = None
    full = any(isinstance(e, OSError) and e.errno == errno.ENOSPC for e in chain)
    if full or (free is not None and free < 16 * 2**20):
        return f"no space left on device at {path} ({(free or 0) / 2**20:.0f} MB free)"
    return None


def warn_if_short_of_space(root: Path) -> None:
    """Before a save: will the next checkpoint fit where the last one did?"""
    found = complete_checkpoints(root)
    needed = integrity.size(found[-1]) if found else 0
    free = shutil.disk_usage(root if root.exists() else root.parent).free
    if needed and free < needed:
        log.warning(f"{free / 2**30:.1f} GB free under {root} and the last checkpoint took {needed / 2**30:.1f} GB: "
                    "the next one may not fit (older ones are pruned only after it is written)")


def save(accelerator: Accelerator, state: LoopState, cfg: config_mod.Config, root: Path, model,
         tokenizer: PreTrainedTokenizerBase, run: str = "") -> Path:
    """Write a checkpoint atomically on every process; prune to the last `keep_last` of this run (`run`, its
    id, is written in the COMPLETE marker: pruning never removes another run's checkpoints).

    Besides the engine's files (ZeRO-3 shards, say) it holds every process's RNG state, the loop state naming
    the engine, the model config, generation config
    and tokenizer (tools/consolidate_checkpoint.py and tools/generate.py need nothing else) and a
    manifest of every file's size.
    """
    name = f"step_{state.step:08d}"
    tmp, final = root / f".tmp-{name}", root / name
    rank = accelerator.process_index

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
            why = no_space(error, tmp) or error or "on another process"
            raise CheckpointError(f"{failure}: {why}; the previous checkpoint is untouched. Free disk space or fix "
                                  "permissions, then resume with --resume_from_checkpoint latest")

    def create() -> None:
        if accelerator.is_main_process:
            warn_if_short_of_space(root)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)

    engine = registry.of(accelerator)
    recorded: dict[str, dict] = {}  # this process's files: size and digest

    def shards() -> None:  # with LoRA only what trains: the frozen base is the model the run started from
        engine.save_state(accelerator, tmp, model, cfg.lora.enabled)
        (tmp / f"random_states_{rank}.pkl").unlink(missing_ok=True)  # accelerate's pickle: ours has none
        integrity.save_rng(tmp, rank)
        recorded.update(integrity.record(tmp, rank))  # right after writing: the pages are still in memory

    def describe() -> None:  # main process, after every process has written its shards
        if not accelerator.is_main_process:
            return
        missing = integrity.missing_files(tmp, accelerator.num_processes, engine)
        if missing:
            raise CheckpointError(f"files missing after every process saved: {missing[:6]} "
                                  "(is the output directory shared by all nodes?)")
        (tmp / STATE_FILE).write_text(dataclasses.replace(state, engine=engine.name).to_json())
        config_mod.save(cfg, tmp / "run_config.yaml")
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.config.save_pretrained(tmp)
        unwrapped.generation_config.save_pretrained(tmp)
        templates.save_tokenizer(tokenizer, tmp)
        if cfg.lora.enabled:
            unwrapped.peft_config["default"].save_pretrained(tmp)  # adapter_config.json: what the weights are
        integrity.write_manifest(tmp, {name: e for files in everyone for name, e in files.items()})

    together(create, f"cannot create {tmp}")
    together(shards, f"writing checkpoint {final} failed")
    from accelerate.utils import gather_object

    everyone = gather_object([recorded])  # every process reached here: `together` raises on all or none
    together(describe, f"writing checkpoint {final} failed")
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        marker = final / f".{MARKER}"
        marker.write_text(f"step {state.step}\n" + (f"run {run}\n" if run else ""))
        marker.rename(final / MARKER)
        _fsync_dir(final)
        _fsync_dir(root)
        prune(root, cfg.training.keep_last, run)
    accelerator.wait_for_everyone()
    return final


def run_of(checkpoint: Path) -> str:
    """The id of the run that wrote a checkpoint ("" for checkpoints from before runs had ids)."""
    lines = (checkpoint / MARKER).read_text().splitlines() if (checkpoint / MARKER).is_file() else []
    return next((line.split(" ", 1)[1] for line in lines if line.startswith("run ")), "")


def new_run_id() -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{os.urandom(3).hex()}"


def prune(root: Path, keep_last: int, run: str = "") -> None:
    """Remove all but the newest `keep_last` complete checkpoints of run `run` (pinned ones, and other runs',
    stay) and stale temps."""
    for old in [c for c in complete_checkpoints(root) if run_of(c) == run][:-keep_last]:
        if not (old / IN_USE).exists():
            shutil.rmtree(old, ignore_errors=True)
    for stale in [*root.glob(".tmp-*"), *root.glob(f"{RESHARDED}*")]:
        shutil.rmtree(stale, ignore_errors=True)


def pin(checkpoint: Path) -> None:
    """Keep `checkpoint` from being pruned until `unpin`."""
    (checkpoint / IN_USE).touch()


def unpin(checkpoint: Path) -> None:
    (checkpoint / IN_USE).unlink(missing_ok=True)


def find(spec: str, root: Path, what: str = "--resume_from_checkpoint") -> Path:
    """Resolve `latest` or a path to a complete checkpoint directory."""
    if spec == "latest":
        found = complete_checkpoints(root)
        if not found:
            raise CheckpointError(f"{what} latest: no complete checkpoint under {root}")
        return found[-1]
    path = Path(spec)
    if not path.is_dir():
        raise CheckpointError(f"{what} {path}: not a directory")
    if not (path / MARKER).is_file():
        raise CheckpointError(f"{what} {path}: not a complete checkpoint (no {MARKER} file; a save that never "
                              "finished, or not written by loop/train.py)")
    return path


def choose_intact(spec: str, root: Path, what: str = "--resume_from_checkpoint") -> tuple[Path, LoopState, list[str]]:
    """The checkpoint to use, its loop state, and a warning for each newer one passed over as broken. An
    explicit path must be intact; `latest` falls back to the newest intact one."""
    candidates = [find(spec, root, what)] if spec != "latest" else list(reversed(complete_checkpoints(root)))
    passed_over = []
    for ckpt in candidates:
        broken = integrity.problems(ckpt)
        if not broken:
            return ckpt, progress.from_json((ckpt / STATE_FILE).read_text()), passed_over
        passed_over.append(f"checkpoint {ckpt} is broken, not used: " + "; ".join(broken[:5]))
    raise CheckpointError(f"no intact checkpoint under {root}: " + " | ".join(passed_over))


def is_checkpoint(path: Path) -> bool:
    """Whether `path` is a run's checkpoint (complete or not) or a run's checkpoints/ folder."""
    return path.is_dir() and ((path / STATE_FILE).exists() or (path / integrity.MANIFEST).exists()
                              or (path / MARKER).exists() or integrity.folder_step(path) is not None
                              or bool(complete_checkpoints(path) or unfinished(path)))


def usable(path: Path, what: str = "checkpoint") -> tuple[Path, LoopState, list[str]]:
    """What a tool may read: one complete, intact checkpoint, or a run's checkpoints/ folder's newest intact
    one (with a warning for each newer one passed over). CheckpointError says why there is none."""
    if complete_checkpoints(path) or unfinished(path):
        if not complete_checkpoints(path):
            raise CheckpointError(f"{what} {path}: no complete checkpoint, only {', '.join(unfinished(path)[:5])}")
        return choose_intact("latest", path, what)
    return choose_intact(str(path), path.parent, what)


Note = tuple[int, str]  # (logging level, text): what resuming has to say, and how loudly


@dataclass
class Resume:
    """Where a run starts: a fresh state, or a checkpoint (chosen, checked and compared, not yet loaded)."""

    state: LoopState
    notes: list[Note]
    path: Path | None = None
    run: str = field(default_factory=new_run_id)  # a resumed run keeps the id of the run it continues
    written_by: int = 0  # how many processes wrote the checkpoint (0: fresh)


def plan_resume(accelerator: Accelerator, cfg: config_mod.Config, root: Path, data_fingerprint: str) -> Resume:
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


def last_good(root: Path) -> str:
    """The newest complete checkpoint, for messages that say where to resume from."""
    found = complete_checkpoints(root)
    return str(found[-1]) if found else "none"
