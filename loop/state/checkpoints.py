"""Resumable state: checkpoints that a crash cannot corrupt, finding and loading them, pruning, pins.

A checkpoint is written into `.tmp-step_N`, renamed to `step_N` when every process has finished,
and only then marked with a `COMPLETE` file. Resume takes the newest complete checkpoint that is
intact (integrity.py: every file there, with its saved size, and nothing but plain data in it),
naming what is wrong with the ones it passes over, and refuses a config that would change what a step
means. A pinned checkpoint (a background upload still reads it) is never pruned. Turning a checkpoint
into a model is export.py's job.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from loop import config as config_mod
from loop.config import ConfigError
from loop.data import templates
from loop.engine import deepspeed, zero3_files
from loop.processes import any_process, main_decides
from loop.state import integrity
from loop.state.progress import LoopState

if TYPE_CHECKING:  # tools that only read checkpoints need not import accelerate / transformers
    from accelerate import Accelerator
    from transformers import PreTrainedTokenizerBase

MARKER = "COMPLETE"
IN_USE = ".in_use"  # a background job (upload) still reads this checkpoint: do not prune it
STATE_FILE = "loop_state.json"
log = logging.getLogger("loop")


class CheckpointError(RuntimeError):
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
    found = [p for p in root.glob("step_*") if (p / MARKER).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def missing_files(path: Path, world_size: int, zero_shards: bool) -> list[str]:
    """Files every process must have written; a checkpoint lacking any is never marked complete."""
    missing = [integrity.rng_file(path, r).name for r in range(world_size) if not integrity.rng_file(path, r).is_file()]
    return missing + (zero3_files.missing_shards(path, world_size) if zero_shards else [])


def _no_space(error: BaseException | None, path: Path) -> str | None:
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
         tokenizer: PreTrainedTokenizerBase) -> Path:
    """Write a checkpoint atomically on every process; prune to the last `keep_last`.

    Besides the ZeRO-3 shards it holds every process's RNG state, the model config, generation config
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
            why = _no_space(error, tmp) or error or "on another process"
            raise CheckpointError(f"{failure}: {why}; the previous checkpoint is untouched. Free disk space or fix "
                                  "permissions, then resume with --resume_from_checkpoint latest")

    def create() -> None:
        if accelerator.is_main_process:
            warn_if_short_of_space(root)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)

    zero = deepspeed.is_active(accelerator)

    def shards() -> None:  # with LoRA only what trains: the frozen base is the model the run started from
        accelerator.save_state(str(tmp), **(deepspeed.save_state_options(cfg.lora.enabled) if zero else {}))
        (tmp / f"random_states_{rank}.pkl").unlink(missing_ok=True)  # accelerate's pickle: ours has none
        integrity.save_rng(tmp, rank)
        if cfg.lora.enabled and not zero and accelerator.is_main_process:
            keep_trainable(tmp / "model.safetensors", accelerator.unwrap_model(model))

    def describe() -> None:  # main process, after every process has written its shards
        if not accelerator.is_main_process:
            return
        missing = missing_files(tmp, accelerator.num_processes, zero)
        if missing:
            raise CheckpointError(f"files missing after every process saved: {missing[:6]} "
                                  "(is the output directory shared by all nodes?)")
        (tmp / STATE_FILE).write_text(json.dumps(dataclasses.asdict(state), indent=2))
        config_mod.save(cfg, tmp / "run_config.yaml")
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.config.save_pretrained(tmp)
        unwrapped.generation_config.save_pretrained(tmp)
        templates.save_tokenizer(tokenizer, tmp)
        if cfg.lora.enabled:
            unwrapped.peft_config["default"].save_pretrained(tmp)  # adapter_config.json: what the weights are
        integrity.write_manifest(tmp)

    together(create, f"cannot create {tmp}")
    together(shards, f"writing checkpoint {final} failed")
    together(describe, f"writing checkpoint {final} failed")
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


def keep_trainable(weights: Path, model) -> None:
    """Rewrite a checkpoint's model.safetensors with the trainable parameters only."""
    from safetensors.torch import load_file, save_file

    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    tensors = load_file(weights)
    save_file({k: v for k, v in tensors.items() if k in trainable}, str(weights), metadata={"format": "pt"})


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


def choose_intact(spec: str, root: Path) -> tuple[Path, list[str]]:
    """The checkpoint to resume from and a warning for each newer one passed over as broken. An explicit
    path must be intact; `latest` falls back to the newest intact one."""
    candidates = [find(spec, root)] if spec != "latest" else list(reversed(complete_checkpoints(root)))
    passed_over = []
    for ckpt in candidates:
        broken = integrity.problems(ckpt)
        if not broken:
            return ckpt, passed_over
        passed_over.append(f"checkpoint {ckpt} is broken, not used: " + "; ".join(broken[:5]))
    raise CheckpointError("no intact checkpoint to resume from: " + " | ".join(passed_over))


Note = tuple[int, str]  # (logging level, text): what resuming has to say, and how loudly


def resume(accelerator: Accelerator, model, cfg: config_mod.Config, root: Path,
           data_fingerprint: str) -> tuple[LoopState, list[Note]]:
    """The loop state to start from (restoring model, optimizer and RNG when resuming), and what to log.

    `latest` with no checkpoint yet starts fresh, so one job script serves the first run and every requeue.
    """
    fresh = LoopState(world_size=accelerator.num_processes, data_fingerprint=data_fingerprint)
    spec = cfg.output.resume_from_checkpoint
    if not spec:
        return fresh, []
    if spec == "latest" and not complete_checkpoints(root):
        return fresh, [(logging.INFO, f"--resume_from_checkpoint latest: no complete checkpoint under {root} yet; "
                                      "starting fresh")]
    # One process checks the files; all use its choice.
    path, passed_over = main_decides(accelerator, lambda: choose_intact(spec, root), (CheckpointError,))
    notes = [(logging.WARNING, note) for note in passed_over]
    saved = json.loads((path / STATE_FILE).read_text())
    saved.setdefault("eval_losses", saved.pop("evals", []))  # its name before 2026-12
    state = LoopState(**saved)
    notes += compare(cfg, yaml.safe_load((path / "run_config.yaml").read_text()), state, data_fingerprint)
    restore(accelerator, model, path, state, partial=cfg.lora.enabled)
    return state, [*notes, (logging.INFO, f"resumed from {path} at step {state.step}")]


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


def restore(accelerator: Accelerator, model, path: Path, state: LoopState, partial: bool = False) -> None:
    """Restore model, optimizer and every process's RNG state, reading nothing that can run code. A
    partial checkpoint (LoRA) holds only what trains; the rest is already the model's own."""
    if state.world_size != accelerator.num_processes:
        raise CheckpointError(
            f"{path} was written by {state.world_size} processes and this run has "
            f"{accelerator.num_processes}; ZeRO-3 shards cannot be re-partitioned on load. Either launch "
            f"with --num_processes {state.world_size}, or turn it into a model with "
            f"`python tools/consolidate_checkpoint.py {path} MODEL_DIR` and start a new run from "
            "MODEL_DIR (model.name_or_path), which restarts the optimizer state."
        )
    if deepspeed.is_active(accelerator):
        deepspeed.install_safe_loading(model)
        options = deepspeed.load_state_options(partial)
    else:
        options = {"strict": False} if partial else {}
    try:
        accelerator.load_state(str(path), **options)
        integrity.load_rng(path, accelerator.process_index)
    except zero3_files.UntrustedCheckpoint as e:
        raise CheckpointError(str(e)) from None


def last_good(root: Path) -> str:
    """The newest complete checkpoint, for messages that say where to resume from."""
    found = complete_checkpoints(root)
    return str(found[-1]) if found else "none"
