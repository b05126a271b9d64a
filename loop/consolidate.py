"""Turn a sharded ZeRO-3 checkpoint into a Hugging Face model directory, streaming.

DeepSpeed's `zero_to_fp32` builds the whole model in memory (its lazy mode memory-maps the rank
files, and every page it touches counts in resident memory), writes pickles by default, and fails on
tied weights with safetensors. Written by hand here, with the same merge protocol: the rank files are
opened on the meta device to learn where each fp32 partition lies in the file; each parameter's
slices are read with `pread` (ranks in parallel threads), merged, cast and streamed straight into
its pre-planned safetensors shard. Peak memory is the largest tensor, about twice, plus the
interpreter; it does not grow with the model or the shard size. loop/export.py stages the output
folder and adds the config and tokenizer.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from loop import integrity


class ConsolidationError(RuntimeError):
    """The input is not a complete ZeRO-3 checkpoint; the message names the file."""


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)I?B?\s*", text.upper())
    if not m:
        raise ValueError(f"--max-shard-size: cannot read {text!r} (use e.g. 5GB, 200MB)")
    return int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2) or " "))


class RankFile:
    """Reads ranges of one rank's fp32 master partition straight from its file."""

    def __init__(self, path: Path):
        self.path = path
        try:
            state = integrity.torch_load(path, meta=True)["optimizer_state_dict"]
        except integrity.UntrustedCheckpoint as e:
            raise ConsolidationError(str(e)) from None
        if state.get("zero_stage") != 3:
            raise ConsolidationError(f"{path}: not a ZeRO stage 3 optimizer state (stage {state.get('zero_stage')})")
        self.groups = []  # (first element in the flat space, numel, byte offset in the file)
        start = 0
        for t in state["fp32_flat_groups"]:
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
    states = integrity.torch_load(next(tag.glob("zero_pp_rank_0_mp_rank_00_model_states.pt")), map_location="cpu",
                                  mmap=True)
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
    """Find the DeepSpeed tag folder, check that every rank's two files are there and readable,
    and return it with each rank's partition layout, in rank order."""
    if not ckpt.is_dir():
        raise ConsolidationError(f"{ckpt}: not a directory")
    latest = ckpt / "latest"
    if not latest.is_file():
        raise ConsolidationError(f"{ckpt}: not a ZeRO checkpoint (no 'latest' file naming its tag folder)")
    tag = ckpt / latest.read_text().strip()
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
            integrity.torch_load(f, meta=True)
        except integrity.UntrustedCheckpoint as e:
            raise ConsolidationError(str(e)) from None
    by_rank = sorted(optims, key=lambda f: int(re.search(r"zero_pp_rank_(\d+)_", f.name).group(1)))
    return tag, [RankFile(f) for f in by_rank]


SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64",
                     torch.bool: "BOOL", torch.int32: "I32", torch.uint8: "U8"}


def _plan_shards(items: list[tuple[str, tuple[int, ...], torch.dtype]], max_bytes: int) -> list[list[int]]:
    shards, size = [[]], 0
    for i, (_, shape, dtype) in enumerate(items):
        nbytes = math.prod(shape) * dtype.itemsize
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += nbytes
    return shards


def _header(items: list[tuple[str, tuple[int, ...], torch.dtype]]) -> bytes:
    """A safetensors header (8-byte length, JSON, padded to 8 bytes) for tensors written in order."""
    meta, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, dtype in items:
        end = offset + math.prod(shape) * dtype.itemsize
        meta[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    body = json.dumps(meta, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)
    return len(body).to_bytes(8, "little") + body


def write(ckpt: Path, out: Path, dtype: torch.dtype, max_shard_bytes: int = 5 * 1024**3,
          progress: Callable[[str, int], None] | None = None) -> tuple[dict[str, str], dict[str, tuple[int, ...]]]:
    """Write the checkpoint's weights into the folder `out` as safetensors shards; return the tied-weight
    aliases that were left out and every tensor's full shape.

    Shapes and dtypes are known before any weight is read, so every shard's safetensors header is
    written first and each merged tensor is streamed into its file as soon as it is ready: memory
    holds a tensor or two, never a shard. (safetensors' own save_file needs the whole shard in memory
    and copies it once more; the format is simple enough to stream.)
    """
    tag, ranks = check_checkpoint(ckpt)
    plan = read_plan(tag)
    cast = lambda t: t.to(dtype) if t.is_floating_point() else t  # noqa: E731
    items = [(k, tuple(v.shape), cast(v).dtype) for k, v in plan.buffers.items()]
    items += [(k, s, dtype) for k, s in plan.shapes.items()]
    shards = _plan_shards(items, max_shard_bytes)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)])
    tensors = merged_tensors(tag, plan, ranks)
    for shard, name in zip(shards, names):
        with open(out / name, "wb") as f:
            f.write(_header([items[i] for i in shard]))
            for i in shard:
                key, tensor = next(tensors)
                assert key == items[i][0], (key, items[i][0])
                tensor = cast(tensor).contiguous()
                f.write(memoryview(tensor.view(torch.uint8).numpy()) if tensor.numel() else b"")
                if progress:
                    progress(key, tensor.numel() * tensor.element_size())
    if next(tensors, None) is not None:
        raise ConsolidationError(f"{tag}: more tensors than the model states list; unknown layout")
    if len(shards) > 1:
        total = sum(math.prod(s) * d.itemsize for _, s, d in items)
        index = {"metadata": {"total_size": total},
                 "weight_map": {items[i][0]: names[n] for n, shard in enumerate(shards) for i in shard}}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return plan.aliases, {k: s for k, s, _ in items}


def state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's fp32 master weights as one state dict in memory (tied weights under both names),
    read the same safe way as `write`: nothing is unpickled."""
    tag, ranks = check_checkpoint(ckpt)
    plan = read_plan(tag)
    merged = {name: tensor.clone() for name, tensor in merged_tensors(tag, plan, ranks)}
    merged.update({alias: merged[target] for alias, target in plan.aliases.items() if target in merged})
    return merged


def verify(ckpt: Path, out: Path, dtype: torch.dtype, prompts: list[str]) -> dict[str, float]:
    """Reload `out` with `from_pretrained` and compare it with the checkpoint's fp32 master weights.

    Returns the largest difference of any weight from its cast master value (should be 0), of any
    weight from the fp32 master (the cast's rounding), and of logits on `prompts` between the saved
    model and the fp32 master weights.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    master = state_dict(ckpt)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=dtype).eval()
    saved = model.state_dict()
    missing = [k for k in master if k not in saved]
    if missing:
        raise ConsolidationError(f"{out}: weights missing after reload: {missing[:5]}")
    report = {"max_diff_vs_cast_master": 0.0, "max_diff_vs_fp32_master": 0.0, "max_logit_diff": 0.0}
    for k, v in master.items():
        s = saved[k].float()
        report["max_diff_vs_cast_master"] = max(report["max_diff_vs_cast_master"],
                                                (s - v.to(dtype).float()).abs().max().item())
        report["max_diff_vs_fp32_master"] = max(report["max_diff_vs_fp32_master"], (s - v).abs().max().item())
    if prompts and (out / "tokenizer.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(out)
        reference = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        reference.load_state_dict(master, strict=False)
        with torch.no_grad():
            for p in prompts:
                ids = tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                    return_tensors="pt", return_dict=True)["input_ids"]
                diff = (model(ids).logits.float() - reference(ids).logits).abs().max().item()
                report["max_logit_diff"] = max(report["max_logit_diff"], diff)
    return report
