"""Turn a training checkpoint into a Hugging Face model directory, streaming, whichever engine wrote it: the
engine's reader (loop/engine, `registry.weights`) yields the weights one tensor at a time, and they are cast
and streamed straight into pre-planned safetensors shards.

For ZeRO-3, DeepSpeed's `zero_to_fp32` builds the whole model in memory (its lazy mode memory-maps the rank
files, and every page it touches counts in resident memory), writes pickles by default, and fails on tied
weights with safetensors; the engine's reader instead `pread`s each parameter's slices from the rank files
(same merge protocol, ranks in parallel threads). Peak memory is the largest tensor, about twice, plus the
interpreter; it does not grow with the model or the shard size. export.py stages the output folder and adds
the config and tokenizer.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path

import torch

from loop.engine import registry
from loop.engine.safe_load import ConsolidationError

__all__ = ["ConsolidationError", "parse_size", "state_dict", "verify", "write"]


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)I?B?\s*", text.upper())
    if not m:
        raise ValueError(f"--max-shard-size: cannot read {text!r} (use e.g. 5GB, 200MB)")
    return int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2) or " "))


SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64",
                     torch.bool: "BOOL", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8"}


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
    weights = registry.weights(ckpt)
    cast = lambda t: t.to(dtype) if t.is_floating_point() else t  # noqa: E731
    items = [(k, s, dtype if d.is_floating_point else d) for k, (s, d) in weights.shapes.items()]
    shards = _plan_shards(items, max_shard_bytes)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)])
    tensors = weights.tensors()
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
        raise ConsolidationError(f"{ckpt}: more tensors than the checkpoint lists; unknown layout")
    if len(shards) > 1:
        total = sum(math.prod(s) * d.itemsize for _, s, d in items)
        index = {"metadata": {"total_size": total},
                 "weight_map": {items[i][0]: names[n] for n, shard in enumerate(shards) for i in shard}}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return weights.aliases, {k: s for k, s, _ in items}


def state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's weights (a ZeRO-3 run's fp32 master weights) as one state dict in memory (tied weights
    under both names), read the same safe way as `write`: nothing is unpickled."""
    weights = registry.weights(ckpt)
    merged = {name: tensor.clone() for name, tensor in weights.tensors()}
    merged.update({alias: merged[target] for alias, target in weights.aliases.items() if target in merged})
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
