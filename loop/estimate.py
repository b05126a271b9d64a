"""How much memory a ZeRO-3 run needs per GPU and per node, before launching it.

Model states (bf16 weights, fp32 master weights, Adam moments, gradients) come from DeepSpeed's own
estimator; activations and logits, which it leaves out, are estimated here from the shapes.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

GB = 1024**3


def count_params(name_or_path: str, trust_remote_code: bool = False) -> tuple[int, int, object]:
    """(total parameters, largest single layer's parameters, config), built on the meta device."""
    config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    total = sum(p.numel() for p in model.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return total, largest, config


def activations_bytes(config, micro_batch: int, seq_len: int, checkpointing: bool) -> dict[str, float]:
    """Activation and logits memory per GPU for one micro-batch (bf16 activations).

    Per layer, ~34 * s * b * h bytes are kept for backward with fused (SDPA / flash) attention
    (Korthikanti et al., 2022, without the s^2 score term that fused kernels do not store); with
    gradient checkpointing only each layer's input (2 * s * b * h) is kept, plus one layer being
    recomputed. Logits are upcast to fp32 for the loss and get an fp32 gradient.
    """
    h = getattr(config, "n_embd", None) or config.hidden_size
    layers = getattr(config, "n_layer", None) or config.num_hidden_layers
    sbh = seq_len * micro_batch * h
    acts = (2 * sbh * layers + 34 * sbh) if checkpointing else 34 * sbh * layers
    logits = micro_batch * seq_len * config.vocab_size * (2 + 4 + 4)
    return {"activations": acts, "logits": logits}


def estimate(name_or_path: str, gpus_per_node: int, nodes: int, micro_batch: int, seq_len: int,
             checkpointing: bool, trust_remote_code: bool = False) -> list[dict[str, float | str]]:
    """Rows of (offload setting, GPU GB per GPU, CPU GB per node) for the usual ZeRO-3 choices."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    total, largest, config = count_params(name_or_path, trust_remote_code)
    extra = sum(activations_bytes(config, micro_batch, seq_len, checkpointing).values())
    rows = []
    for label, cpu_offload, offload_params in (("no offload", False, False),
                                               ("offload optimizer", True, False),
                                               ("offload optimizer + params", True, True)):
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(total, largest, gpus_per_node, nodes,
                                                            cpu_offload=cpu_offload, cpu_offload_params=offload_params)
        rows.append({"setting": label, "gpu_gb": (gpu + extra) / GB, "model_states_gpu_gb": gpu / GB,
                     "cpu_gb_per_node": cpu / GB})
    return [{"params": total, "largest_layer": largest, "activations_gb": extra / GB}, *rows]
