"""Resumable state: checkpoints that a crash cannot corrupt, finding and loading them, pruning, pins.

A checkpoint is written into `.tmp-step_N`, renamed to `step_N` when every process has finished,
and only then marked with a `COMPLETE` file. Resume takes the newest complete checkpoint that is
intact (integrity.py: every file there, with its saved size and digest, nothing but plain data in it,
and a loop state the loop writes), naming what is wrong with the ones it passes over (resuming.py decides
and loads it). The tools read checkpoints through `usable`, the same verification. A pinned checkpoint (a
background upload still reads it) is never pruned. Turning a checkpoint into a model is export.py's job.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

from loop import config as config_mod
from loop.config import RunError
from loop.data import templates
from loop.engine import registry
from loop.processes import any_process
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


def last_good(root: Path) -> str:
    """The newest complete checkpoint, for messages that say where to resume from."""
    found = complete_checkpoints(root)
    return str(found[-1]) if found else "none"
