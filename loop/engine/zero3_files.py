"""ZeRO-3's checkpoint files, DeepSpeed's engine's `Layout`: their names, how a checkpoint folder is recognised,
DeepSpeed's engine held to the safe reader (safe_load.py: nothing is unpickled) for resume, and the reader
of each rank's fp32 master partition that consolidation streams from (`weights`; loop/state/consolidate.py
writes the model).

The partition protocol is DeepSpeed's `zero_to_fp32`: on every rank the param groups form one flat space,
and each parameter takes ceil(numel / world) elements of it at a running offset. Reading it by hand lets
consolidation `pread` each slice instead of building the whole model in memory.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from loop.engine.interface import Weights
from loop.engine.safe_load import ConsolidationError, UntrustedCheckpoint, torch_load

SHARDS = "pytorch_model"  # the tag folder accelerate's save_state uses


def recognises(names: list[str]) -> bool:
    """Whether a checkpoint's files (names relative to its folder) include DeepSpeed's shards."""
    return any(n.startswith(f"{SHARDS}/") for n in names)


def model_states(rank: int) -> str:
    return f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt"


def rank_of(name: str) -> int | None:
    """The process that wrote a shard file (its rank is in the name); None for any other file."""
    found = re.search(r"(?:^|/|_)zero_pp_rank_(\d+)_mp_rank_\d+_(?:model|optim)_states\.pt$", name)
    return int(found.group(1)) if found else None


def missing_shards(folder: Path, world_size: int) -> list[str]:
    """The files of the accelerate save_state layout each process must have written, that are not there."""
    shards, missing = folder / SHARDS, []
    for r in range(world_size):
        if not (shards / model_states(r)).is_file():
            missing.append(f"{SHARDS}/{model_states(r)}")
        if not list(shards.glob(f"*zero_pp_rank_{r}_mp_rank_00_optim_states.pt")):
            missing.append(f"{SHARDS}/*zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
    return missing


def safe_checkpoint_engine(engine):
    """DeepSpeed's own checkpoint engine reading through `torch_load`. The instance is kept (only its class
    changes), so what DeepSpeed configured on it, such as zip serialization for every later save, stays."""

    class SafeCheckpointEngine(type(engine)):
        def load(self, path: str, map_location=None):
            return torch_load(path, map_location=map_location)

    engine.__class__ = SafeCheckpointEngine
    return engine


MASTER = "fp32_flat_groups"  # the fp32 master weights; "exp_avg" and "exp_avg_sq" name Adam's moments


class RankFile:
    """Reads ranges of one rank's fp32 master partition (or, `part`, one of Adam's moments, laid out the same way
    per sub-group) straight from its file."""

    def __init__(self, path: Path, part: str = MASTER):
        self.path = path
        try:
            state = torch_load(path, meta=True)["optimizer_state_dict"]
        except UntrustedCheckpoint as e:
            raise ConsolidationError(str(e)) from None
        if state.get("zero_stage") != 3:
            raise ConsolidationError(f"{path}: not a ZeRO stage 3 optimizer state (stage {state.get('zero_stage')})")
        if part == MASTER:
            flat = state[MASTER]
        else:
            moments = state["optimizer_state_dict"]["state"]
            flat = [moments[k][part] for k in sorted(moments)]
        self.groups = []  # (first element in the flat space, numel, byte offset in the file)
        start = 0
        for t in flat:
            offset = t.untyped_storage()._checkpoint_offset + t.storage_offset() * t.element_size()
            self.groups.append((start, t.numel(), offset))
            start += t.numel()
        self.numel = start
        last = max(offset + n * 4 for _, n, offset in self.groups)
        if path.stat().st_size < last:  # the pickle read fine, but the data after it is cut short
            raise ConsolidationError(f"{path}: truncated ({path.stat().st_size} bytes, data runs to {last})")
        self.fd: int | None = None  # opened by merged_tensors for the duration of the read

    def read(self, start: int, count: int, out: torch.Tensor) -> torch.Tensor:
        """Read `count` fp32 elements from `start` of the flat space into `out` (no extra copy)."""
        view, done = memoryview(out.numpy()).cast("B"), 0
        for first, numel, offset in self.groups:
            lo, hi = max(start, first), min(start + count, first + numel)
            if lo >= hi:
                continue
            want = (hi - lo) * 4
            got = os.preadv(self.fd, [view[done * 4 : done * 4 + want]], offset + (lo - first) * 4)
            if got != want:
                raise ConsolidationError(f"{self.path}: truncated (short read at element {lo})")
            done += hi - lo
        return out

    def open(self) -> None:
        self.fd = os.open(self.path, os.O_RDONLY)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


@dataclass
class Plan:
    """What the model holds, read from rank 0's model-state file before any weight is read."""

    buffers: dict[str, torch.Tensor]
    shapes: dict[str, tuple[int, ...]]  # trainable parameters, in flat-partition order
    aliases: dict[str, str]  # tied weights: name -> the name it shares storage with


def read_plan(tag: Path) -> Plan:
    states = torch_load(tag / model_states(0), map_location="cpu", mmap=True)
    if states.get("frozen_param_shapes"):
        raise ConsolidationError(f"{tag}: frozen parameters are not supported; use DeepSpeed's zero_to_fp32.py")
    buffers = {k: states["module"][k].clone() for k in states.get("buffer_names", [])}
    shapes = {k: tuple(v) for group in states["param_shapes"] for k, v in group.items()}
    return Plan(buffers, shapes, dict(states.get("shared_params", {})))


def merged_tensors(tag: Path, plan: Plan, ranks: list[RankFile]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, fp32 tensor) for every buffer and parameter, one at a time, in plan order.

    The protocol of DeepSpeed's zero_to_fp32: on every rank the param groups form one flat space,
    and each parameter takes ceil(numel / world) elements of it at a running offset.
    """
    world = len(ranks)
    try:
        for r in ranks:
            r.open()
        yield from plan.buffers.items()
        offset = 0
        with ThreadPoolExecutor(max_workers=min(world, 8)) as pool:
            for name, shape in plan.shapes.items():
                numel = math.prod(shape)
                part = math.ceil(numel / world)
                merged = torch.empty(part * world, dtype=torch.float32)
                list(pool.map(RankFile.read, ranks, [offset] * world, [part] * world, merged.split(part)))
                yield name, merged[:numel].view(shape)
                offset += part
        if offset != ranks[0].numel:
            raise ConsolidationError(f"{tag}: consumed {offset} of {ranks[0].numel} elements per rank; unknown layout")
    finally:
        for r in ranks:
            r.close()


def check_checkpoint(ckpt: Path) -> tuple[Path, list[RankFile]]:
    """Check that every rank's two files are in the shards' folder and readable, and return the folder
    with each rank's partition layout, in rank order. (Whether the checkpoint is complete and intact is
    loop/state's to check first.)"""
    if not ckpt.is_dir():
        raise ConsolidationError(f"{ckpt}: not a directory")
    tag = ckpt / SHARDS  # accelerate's tag, as resume reads it: never wherever DeepSpeed's `latest` file points
    if not tag.is_dir():
        raise ConsolidationError(f"{ckpt}: not a ZeRO checkpoint (no {SHARDS}/ folder of shards)")
    models = sorted(tag.glob("zero_pp_rank_*_mp_rank_00_model_states.pt"))
    optims = sorted(tag.glob("*zero_pp_rank_*_mp_rank_00_optim_states.pt"))
    if not (ckpt / "config.json").is_file():
        raise ConsolidationError(f"{ckpt / 'config.json'}: missing; the checkpoint has no model config to write")
    if not models or not optims:
        raise ConsolidationError(f"{tag}: no ZeRO-3 model/optimizer state files (unknown layout)")
    ranks = lambda files: {int(re.search(r"zero_pp_rank_(\d+)_", f.name).group(1)) for f in files}  # noqa: E731
    expected = set(range(max(ranks(models) | ranks(optims)) + 1))
    prefix = optims[0].name.split("zero_pp_rank_")[0]  # "bf16_", "" or "fp16_" by precision
    for kind, files, pattern in (("model", models, "zero_pp_rank_{}_mp_rank_00_model_states.pt"),
                                 ("optimizer", optims, prefix + "zero_pp_rank_{}_mp_rank_00_optim_states.pt")):
        for r in sorted(expected - ranks(files)):
            raise ConsolidationError(f"{tag / pattern.format(r)}: missing {kind} state file of rank {r}")
    for f in models:
        try:
            torch_load(f, meta=True)
        except UntrustedCheckpoint as e:
            raise ConsolidationError(str(e)) from None
    by_rank = sorted(optims, key=lambda f: int(re.search(r"zero_pp_rank_(\d+)_", f.name).group(1)))
    return tag, [RankFile(f) for f in by_rank]


def weights(ckpt: Path) -> Weights:
    """The checkpoint's fp32 master weights, for consolidation: buffers first, then every parameter merged
    from the ranks' partitions, one at a time."""
    tag, ranks = check_checkpoint(ckpt)
    plan = read_plan(tag)
    shapes = {k: (tuple(v.shape), v.dtype) for k, v in plan.buffers.items()}
    shapes |= {k: (s, torch.float32) for k, s in plan.shapes.items()}
    return Weights(lambda: merged_tensors(tag, plan, ranks), shapes, plan.aliases)
