"""How much memory a ZeRO-3 run needs per GPU and per node, before launching it.

Model states (bf16 weights, fp32 master weights, Adam moments, gradients) come from the engine's own
estimator (DeepSpeed's); activations and logits, which it leaves out, are estimated here from the shapes, read the
way the loop reads them (architecture.py). Only the model's config is needed, from the Hub, a model
folder or a config.json file.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from loop.config import ConfigError, UserError, first_line
from loop.engine import registry
from loop.model.architecture import Shape

GB = 1024**3


class EstimateError(UserError, ValueError):
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
    """(total parameters, largest single layer's parameters), built on the meta device. Past 64 layers the
    model is built with one and with two (its layers are alike) and the count extrapolated: building 10,000
    layers, even on the meta device, takes 11 s."""
    layers = getattr(model_config, "num_hidden_layers", None)
    if not isinstance(layers, int) or layers <= 64:
        return _count(model_config, trust_remote_code)
    (one, largest_1), (two, largest_2) = (_count(_with_layers(model_config, n), trust_remote_code) for n in (1, 2))
    return one + (layers - 1) * (two - one), max(largest_1, largest_2)


def _count(model_config, trust_remote_code: bool) -> tuple[int, int]:
    """The largest layer is what ZeRO-3 gathers at once: a full fine-tune makes each transformer block a leaf
    module (engine/deepspeed.py: gather_by_block), gathered whole, a mixture of experts' every expert with it;
    any other module is gathered on its own."""
    with registry.outside_init(), torch.device("meta"):  # in a ZeRO-3 run transformers would partition it
        model = AutoModelForCausalLM.from_config(model_config, trust_remote_code=trust_remote_code)
    total = sum(p.numel() for p in model.parameters())
    blocks = set(getattr(model, "_no_split_modules", None) or [])
    largest = max(sum(p.numel() for p in m.parameters(recurse=type(m).__name__ in blocks)) for m in model.modules())
    return total, largest


def _with_layers(model_config, layers: int):
    small = copy.deepcopy(model_config)
    small.num_hidden_layers = layers
    if isinstance(getattr(small, "layer_types", None), list):
        small.layer_types = small.layer_types[:layers]
    return small


@dataclass
class Machine:
    """What a run has to hold a model in, per node: its RAM and the memory of each process's device (the
    RAM again on CPU), and how the run shares the model's states (ZeRO stage, processes)."""

    ram: float
    device_memory: float
    on_gpu: bool
    zero_stage: int | None = None
    processes: int | None = None  # None: not known yet (before launching), so only a layer is checked
    per_node: int = 1
    offload_to_disk: bool = False  # ZeRO-Infinity: the states go to NVMe, so only a layer must fit


def check_fits(counts: tuple[int, int], name: str, machine: Machine, bytes_per_param: float,
               activations: float) -> None:
    """Refuse a model the machine cannot hold, before anything is allocated: one of its layers in 16 bits
    on one device, or what training keeps (`bytes_per_param`: weights, gradients, AdamW's moments; and per
    process the activations) in a node's RAM and devices together, ZeRO-3 sharing the states among every
    process. A lower bound: a run it lets through may still run out of memory, one it refuses cannot fit."""
    total, largest = counts
    m = machine
    figures = f"{name}'s config makes a model of {total:,} parameters, the largest layer {largest:,}"
    if largest * 2 > m.device_memory:
        raise ConfigError(f"model.name_or_path: {figures}: that layer alone takes {largest * 2 / GB:,.1f} GB in 16 "
                          f"bits, more than one device here holds ({m.device_memory / GB:,.1f} GB); check its hidden "
                          "size, layers and vocabulary")
    if m.processes is None or m.offload_to_disk:
        return
    nodes = max(1, m.processes // m.per_node)
    if m.zero_stage == 3:
        states = total * bytes_per_param / nodes
    elif m.zero_stage in (1, 2):  # 16-bit weights and gradients in every process, the rest shared
        states = m.per_node * total * min(4, bytes_per_param) + total * max(0, bytes_per_param - 4) / nodes
    else:
        states = m.per_node * total * bytes_per_param
    need = states + m.per_node * activations
    have = m.ram + (m.per_node * m.device_memory if m.on_gpu else 0)
    if need > have:
        raise ConfigError(f"model.name_or_path: {figures}: training it needs at least {need / GB:,.1f} GB on each "
                          f"node and this one has {have / GB:,.1f} GB (RAM and devices together); check its hidden "
                          "size, layers and vocabulary, or spread it over more processes with ZeRO-3")


# Bytes kept per token and hidden unit in one layer for backward (bf16, fused attention: Korthikanti et al., 2022,
# without the s^2 score term fused kernels do not store): the MLP's part (its input, the 4x-wide activations
# around the nonlinearity, its dropout mask) and the rest (attention's projections and output, the norms).
LAYER, MLP = 34, 19


@dataclass
class Long:
    """How a long row is spread and kept: processes sharing each row (sequence parallelism, Ulysses), layer
    inputs offloaded to the host, the MLP computed in slices (0: whole)."""

    sequence_parallel: int = 1
    offload_checkpoints: bool = False
    tiled_mlp: int = 0


def activations_bytes(shape: Shape, micro_batch: int, seq_len: int, checkpointing: bool,
                      long: Long | None = None) -> dict[str, float]:
    """Activation and logits memory per GPU for one micro-batch (bf16 activations); "host" is what stays in CPU
    memory instead (offloaded checkpoints), not counted on the GPU.

    Per layer, LAYER * s * b * h bytes are kept for backward; with gradient checkpointing only each layer's
    input (2 * s * b * h) is kept, plus one layer being recomputed; offloaded, the inputs go to the host but
    the newest one. A tiled MLP keeps one slice of the MLP's part at a time. Under sequence parallelism every
    process holds s / N tokens of each of these (Ulysses exchanges heads, not tokens, so attention's share is
    divided too), and each layer's all-to-all holds its query, key, value and output twice (sent and received).
    The loss runs in chunks inside the output projection (head.py): bf16 hidden states and their gradient,
    plus one chunk of 8,192 positions of float32 logits and their gradient.
    """
    long = long or Long()
    n = max(1, long.sequence_parallel)
    sbh = seq_len / n * micro_batch * shape.hidden
    layer = (LAYER - MLP + MLP / max(1, long.tiled_mlp)) * sbh
    kept = 2 * sbh * (1 if long.offload_checkpoints else shape.layers)
    acts = (kept + layer) if checkpointing else layer * shape.layers
    host = 2 * sbh * (shape.layers - 1) if checkpointing and long.offload_checkpoints else 0.0
    width = 2 * shape.q_heads * shape.head_dim + 2 * shape.kv_heads * shape.head_dim  # q, output; k, v
    exchange = 2 * 2 * seq_len / n * micro_batch * width if n > 1 else 0.0
    logits = 2 * sbh * 2 + min(8192, micro_batch * seq_len / n) * shape.vocab * (4 + 4)
    return {"activations": acts, "logits": logits, "all_to_all": exchange, "host": host}


def on_device(parts: dict[str, float]) -> float:
    """The GPU's part of activations_bytes (what is offloaded to the host left out)."""
    return sum(v for k, v in parts.items() if k != "host")


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
             qlora: bool = False, engine: str = registry.DEFAULT, long: Long | None = None
             ) -> list[dict[str, float | str]]:
    """Rows of (setting, GPU GB per GPU, CPU GB per node): the usual ZeRO-3 choices (the model states from the
    engine's own estimate), or with lora_rank the LoRA (or QLoRA) run. The head row has the activations' parts
    in GB per GPU (`parts`), offloaded checkpoints as `host` (per GPU; the CPU column counts them per node)."""
    model_config = read_config(name_or_path, trust_remote_code)
    total, largest = count_params(model_config, trust_remote_code)
    parts = activations_bytes(Shape.of(model_config), micro_batch, seq_len, checkpointing, long)
    extra, host = on_device(parts), parts["host"] * gpus_per_node
    head = {"params": total, "largest_layer": largest, "activations_gb": extra / GB,
            "parts": {k: v / GB for k, v in parts.items()}}
    if lora_rank:
        adapter = lora_parameters(model_config, lora_rank, trust_remote_code)
        row = lora_row(total, largest, adapter, gpus_per_node * nodes, qlora)
        row["gpu_gb"] = row["model_states_gpu_gb"] + extra / GB
        row["cpu_gb_per_node"] += host / GB
        return [head | {"adapter": adapter}, row]
    rows, states = [], registry.get(engine).model_states_memory
    for label, cpu_offload, offload_params in (("no offload", False, False),
                                               ("offload optimizer", True, False),
                                               ("offload optimizer + params", True, True)):
        cpu, gpu = states(total, largest, gpus_per_node, nodes, cpu_offload, offload_params)
        rows.append({"setting": label, "gpu_gb": (gpu + extra) / GB, "model_states_gpu_gb": gpu / GB,
                     "cpu_gb_per_node": (cpu + host) / GB})
    return [head, *rows]
