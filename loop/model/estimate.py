"""How much memory a ZeRO-3 run needs per GPU and per node, before launching it.

Model states (bf16 weights, fp32 master weights, Adam moments, gradients) come from DeepSpeed's own
estimator; activations and logits, which it leaves out, are estimated here from the shapes, read the
way the loop reads them (architecture.py). Only the model's config is needed, from the Hub, a model
folder or a config.json file.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from loop.config import first_line
from loop.engine import deepspeed
from loop.model.architecture import Shape

GB = 1024**3


class EstimateError(ValueError):
    """The model's config could not be read; the message says why in one line."""


def read_config(name_or_path: str, trust_remote_code: bool = False):
    """A model config from a config.json file, a model folder, or a Hub id (one line when it fails)."""
    path = Path(name_or_path)
    try:
        if path.is_file():
            raw = json.loads(path.read_text())
            return AutoConfig.for_model(raw.pop("model_type"), **raw)
        return AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        where = "a local file or folder" if path.exists() else "a Hub id"
        raise EstimateError(f"{name_or_path}: cannot read its config as {where} ({first_line(e, 200)}); offline or "
                            "gated models need a local copy: pass its config.json or folder") from None


def count_params(model_config, trust_remote_code: bool = False) -> tuple[int, int]:
    """(total parameters, largest single layer's parameters), built on the meta device."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config, trust_remote_code=trust_remote_code)
    total = sum(p.numel() for p in model.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return total, largest


def activations_bytes(shape: Shape, micro_batch: int, seq_len: int, checkpointing: bool) -> dict[str, float]:
    """Activation and logits memory per GPU for one micro-batch (bf16 activations).

    Per layer, ~34 * s * b * h bytes are kept for backward with fused (SDPA / flash) attention
    (Korthikanti et al., 2022, without the s^2 score term that fused kernels do not store); with
    gradient checkpointing only each layer's input (2 * s * b * h) is kept, plus one layer being
    recomputed. The loss runs in chunks inside the output projection (head.py): bf16 hidden
    states and their gradient, plus one chunk of 8,192 positions of float32 logits and their gradient.
    """
    sbh = seq_len * micro_batch * shape.hidden
    acts = (2 * sbh * shape.layers + 34 * sbh) if checkpointing else 34 * sbh * shape.layers
    logits = 2 * sbh * 2 + min(8192, micro_batch * seq_len) * shape.vocab * (4 + 4)
    return {"activations": acts, "logits": logits}


def lora_parameters(model_config, rank: int, trust_remote_code: bool = False) -> int:
    """Adapter parameters for rank `rank` on the default targets of lora.py: r * (in + out) per layer."""
    from loop.model.lora import TARGETS

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config, trust_remote_code=trust_remote_code)
    names = TARGETS.get(model_config.model_type)
    head = model.get_output_embeddings()
    return sum(rank * (m.in_features + m.out_features) for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and m is not head and (names is None or name.split(".")[-1] in names))


def lora_row(total: int, largest: int, adapter: int, gpus: int, quantized: bool) -> dict[str, float | str]:
    """Model states per GPU with a frozen base: the base once (bf16, or NF4 at ~0.53 bytes a parameter with
    its scales), partitioned by ZeRO-3 with one layer gathered at a time; the adapter trains like a full
    model does (bf16 weight and gradient, fp32 master and two Adam moments: 16 bytes a parameter)."""
    base = total * (0.53 if quantized else 2.0)
    gpu = base / gpus + largest * 2 + 16 * adapter / gpus
    return {"setting": f"{'QLoRA' if quantized else 'LoRA'} (frozen base, no offload)", "model_states_gpu_gb": gpu / GB,
            "cpu_gb_per_node": 0.0}


def estimate(name_or_path: str, gpus_per_node: int, nodes: int, micro_batch: int, seq_len: int,
             checkpointing: bool, trust_remote_code: bool = False, lora_rank: int = 0,
             qlora: bool = False) -> list[dict[str, float | str]]:
    """Rows of (setting, GPU GB per GPU, CPU GB per node): the usual ZeRO-3 choices, or with lora_rank the
    LoRA (or QLoRA) run."""
    model_config = read_config(name_or_path, trust_remote_code)
    total, largest = count_params(model_config, trust_remote_code)
    extra = sum(activations_bytes(Shape.of(model_config), micro_batch, seq_len, checkpointing).values())
    if lora_rank:
        adapter = lora_parameters(model_config, lora_rank, trust_remote_code)
        row = lora_row(total, largest, adapter, gpus_per_node * nodes, qlora)
        row["gpu_gb"] = row["model_states_gpu_gb"] + extra / GB
        return [{"params": total, "largest_layer": largest, "activations_gb": extra / GB, "adapter": adapter}, row]
    rows = []
    for label, cpu_offload, offload_params in (("no offload", False, False),
                                               ("offload optimizer", True, False),
                                               ("offload optimizer + params", True, True)):
        cpu, gpu = deepspeed.model_states_memory(total, largest, gpus_per_node, nodes, cpu_offload, offload_params)
        rows.append({"setting": label, "gpu_gb": (gpu + extra) / GB, "model_states_gpu_gb": gpu / GB,
                     "cpu_gb_per_node": cpu / GB})
    return [{"params": total, "largest_layer": largest, "activations_gb": extra / GB}, *rows]
