"""A ZeRO-3 checkpoint re-partitioned for another number of processes (issue 42.1): a copy, written into a
folder of its own, of a verified checkpoint's shards laid out as DeepSpeed would have written them with M
processes, which DeepSpeed's own loader then reads as if they had been (it refuses any other world size:
"DP world size of N but the current world size is M").

Why the loop's own reshard and not DeepSpeed's universal checkpoint (ds_to_universal + `load_universal`):
the conversion unpickles every shard with DeepSpeed's own torch.load (the loop reads checkpoints only through
safe_load.torch_load, nothing executable), writes one folder per parameter and optimizer state (a second
layout to verify and to clean up), and loading it needs `checkpoint.load_universal` in the DeepSpeed config,
another code path than the one every same-size resume takes. The partition protocol is small and already
read here for consolidation (zero3_files.py): every parameter takes ceil(numel / world) elements of each
rank's flat space, and Adam's moments are laid out as the fp32 masters are; so the masters and moments are
merged one parameter at a time from the old ranks and cut for the new ones, and everything else (the step
count, the hyperparameters, the loss scaler) is copied. The optimizer state comes out exact, and a resume
continues exactly as on the old number of processes.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
from pathlib import Path

import torch

from loop.engine import zero3_files
from loop.engine.safe_load import ConsolidationError, torch_load
from loop.engine.zero3_files import MASTER, SHARDS, Plan, RankFile, model_states

SUB_GROUP_SIZE = 1_000_000_000  # DeepSpeed's default zero_optimization.sub_group_size


def sub_groups(groups: list[dict[str, tuple[int, ...]]], world: int, size: int) -> list[tuple[int, list[str]]]:
    """(param group, parameter names) of each sub-group ZeRO-3 forms over `world` processes: each param group
    is cut after the parameter whose partitions pass `size` elements (deepspeed stage3._create_fp16_sub_groups)."""
    found = []
    for g, group in enumerate(groups):
        names = list(group)
        parts = [math.ceil(math.prod(group[n]) / world) for n in names]
        if size >= sum(parts):
            found.append((g, names))
            continue
        current, total = [], 0
        for i, (name, part) in enumerate(zip(names, parts)):
            current.append(name)
            total += part
            if total >= size or i == len(names) - 1:
                found.append((g, current))
                current, total = [], 0
    return found


def sub_group_size(ds_config: dict) -> int:
    return int((ds_config.get("zero_optimization") or {}).get("sub_group_size", SUB_GROUP_SIZE))


def write(ckpt: Path, folder: Path, world: int, size: int) -> None:
    """Write into `folder` (empty or absent) the shards of checkpoint `ckpt` (intact: loop/state verified it) for
    `world` processes whose ZeRO-3 sub-groups hold up to `size` elements, and every process's RNG state (a new
    process takes that of the old process of its rank modulo the old count). ConsolidationError says why not."""
    tag, masters = zero3_files.check_checkpoint(ckpt)
    old = len(masters)
    states = torch_load(tag / model_states(0), map_location="cpu", mmap=True)
    if states.get("frozen_param_fragments"):
        raise ConsolidationError(f"{tag / model_states(0)}: frozen parameters are partitioned here; this checkpoint "
                                 f"resumes only on {old} processes")
    groups = [{k: tuple(v) for k, v in group.items()} for group in states["param_shapes"]]
    first = torch_load(masters[0].path, map_location="cpu", mmap=True)
    optim = first["optimizer_state_dict"]
    inner = optim["optimizer_state_dict"]
    before = sub_groups(groups, old, sub_group_size(first.get("ds_config") or {}))
    sizes = [sum(math.ceil(math.prod(groups[g][n]) / old) for n in names) for g, names in before]
    if sizes != [t.numel() for t in optim[MASTER]]:
        raise ConsolidationError(f"{masters[0].path}: sub-groups of {[t.numel() for t in optim[MASTER]]} elements, "
                                 f"not the {sizes} of DeepSpeed's layout; cannot re-partition it")
    state = inner.get("state") or {}
    moments = [k for k, v in state.get(0, {}).items() if torch.is_tensor(v) and v.numel() == sizes[0] and v.dim()]
    first_of = {g: j for j, (g, _) in reversed(list(enumerate(before)))}  # a param group's first old sub-group
    after = sub_groups(groups, world, size)
    plan = Plan({}, {n: s for group in groups for n, s in group.items()}, {})
    readers = {part: [RankFile(r.path, part) for r in masters] for part in [MASTER, *moments]}
    ds_config = dict(first.get("ds_config") or {})  # what the copy's layout follows, for whoever reads it next
    ds_config["zero_optimization"] = dict(ds_config.get("zero_optimization") or {}, sub_group_size=size)
    out = folder / SHARDS
    out.mkdir(parents=True)
    prefix = masters[0].path.name.split("zero_pp_rank_")[0]  # "bf16_" by precision
    for rank in range(world):
        flat = {part: cut(tag, plan, readers[part], rank, world, after) for part in readers}
        per_group = [{k: v for k, v in state[first_of[g]].items() if k not in moments} if state else {}
                     for g, _ in after]
        mine = {"state": {j: {**per_group[j], **{k: flat[k][j] for k in moments}} for j in range(len(after))}
                if state else {},
                "param_groups": [dict(inner["param_groups"][first_of[g]], params=[j])
                                 for j, (g, _) in enumerate(after)]}
        optimizer = dict(optim, partition_count=world, optimizer_state_dict=mine, **{MASTER: flat[MASTER]})
        name = f"{prefix}zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
        torch.save(dict(first, optimizer_state_dict=optimizer, ds_config=ds_config), out / name)
        torch.save(dict(states, dp_world_size=world, ds_config=ds_config), out / model_states(rank))
    for rank in range(world):
        shutil.copyfile(ckpt / f"rng_state_{rank % old}.safetensors", folder / f"rng_state_{rank}.safetensors")


def cut(tag: Path, plan: Plan, ranks: list[RankFile], rank: int, world: int,
        after: list[tuple[int, list[str]]]) -> list[torch.Tensor]:
    """One new rank's flat partition of one part (masters or a moment), per sub-group: every parameter merged
    from the old ranks, one at a time, and its `rank`-th ceil(numel / world) elements kept (zeros past the end)."""
    pieces = []
    for _, full in zero3_files.merged_tensors(tag, dataclasses.replace(plan, buffers={}), ranks):
        part = math.ceil(full.numel() / world)
        mine = full.reshape(-1)[rank * part : (rank + 1) * part]
        pieces.append(torch.cat([mine, mine.new_zeros(part - mine.numel())]) if mine.numel() < part else mine.clone())
    sizes = [sum(math.ceil(math.prod(plan.shapes[n]) / world) for n in names) for _, names in after]
    return [t.clone() for t in torch.cat(pieces).split(sizes)] if pieces else [torch.zeros(0) for _ in sizes]


def reshard(accelerator, ckpt: Path, folder: Path) -> None:
    """The checkpoint's shards for this run's number of processes and ZeRO-3 settings, written into `folder`."""
    write(ckpt, folder, accelerator.num_processes, sub_group_size(accelerator.state.deepspeed_plugin.deepspeed_config))
