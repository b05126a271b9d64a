"""PyTorch's FSDP2 (`fully_shard`) as the loop drives it through accelerate's FSDP plugin (`fsdp_version: 2`),
as one `Engine` (ENGINE, at the end): accelerate shards each transformer block, the embeddings and the root at
prepare; the step is accelerate's own (gradients reduce-scattered after every backward, clipped over the
shards); checkpoints are torch.distributed.checkpoint folders (dcp_files.py) of the model and the optimizer,
which load on any number of processes."""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path

import torch

from loop.config import ConfigError
from loop.engine import dcp_files, plain
from loop.engine.interface import Engine, Layout


def wanted_on_cpu() -> bool:
    """Launched with an FSDP config on a machine without GPUs: the accelerator is then made for CPU processes
    (accelerate's launcher does not say so for FSDP), and `set_up_on_cpu` turns it into FSDP."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and not torch.cuda.is_available()


def set_up_on_cpu(accelerator) -> None:
    """accelerate takes its FSDP plugin only on accelerator devices (its state sets FSDP up for MULTI_GPU and the
    like, never for MULTI_CPU), so on a CPU-only machine a launch with an FSDP config would train as plain DDP,
    or refuse. There it is set up here as accelerate would have: the plugin read from the launch's FSDP_*
    settings, the run's mixed precision, and FSDP as the distributed type; fully_shard then shards over gloo."""
    from accelerate import DistributedType, PartialState
    from accelerate.utils import FullyShardedDataParallelPlugin

    if not wanted_on_cpu() or accelerator.distributed_type != DistributedType.MULTI_CPU:
        return
    plugin = FullyShardedDataParallelPlugin()
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    accelerator.state.fsdp_plugin = plugin
    accelerator.state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # as accelerate's own set-up does


def active(accelerator) -> bool:
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    return plugin is not None and getattr(plugin, "fsdp_version", 1) == 2


def zero_stage(accelerator) -> int:
    """As ZeRO counts: weights, gradients and optimizer state sharded (3), or the weights kept whole between
    forward and backward (`reshard_after_forward: false`, like ZeRO-2)."""
    return 3 if accelerator.state.fsdp_plugin.reshard_after_forward else 2


def offloads(accelerator) -> set[str]:
    from torch.distributed.fsdp import CPUOffloadPolicy

    return {"cpu"} if isinstance(accelerator.state.fsdp_plugin.cpu_offload, CPUOffloadPolicy) else set()


def describe(accelerator) -> str:
    """For the model card: "FSDP2 (fully_shard), parameters offloaded"."""
    kept = "" if zero_stage(accelerator) == 3 else ", weights kept between forward and backward"
    return "FSDP2 (fully_shard)" + kept + (", parameters offloaded" if offloads(accelerator) else "")


def place_model(accelerator, model: torch.nn.Module, partial: bool) -> None:
    """Refuse what FSDP2 cannot shard yet: accelerate puts a shared input embedding and output projection in one
    unit, known by `.weight` being one object, but peft's trainable-token wrappers (LoRA where the template adds
    tokens) compute `.weight` afresh from the shared base and its new rows: it would shard the shared parameter
    twice (torch refuses), and gathering the wrapper's `.weight` outside forward mixes shards with whole rows."""
    first, last = model.get_input_embeddings(), model.get_output_embeddings()
    if first is None or last is None or first is last or getattr(first, "weight", None) is getattr(last, "weight", 0):
        return
    if {id(p) for p in first.parameters()} & {id(p) for p in last.parameters()}:
        raise ConfigError("lora: the chat template adds tokens to this model, and their trainable rows in the tied "
                          "embedding do not shard under FSDP2 yet; train with DeepSpeed (accelerate_configs/"
                          "zero3.yaml), or start from a model whose tokenizer already has the template's tokens")


def synced_generation(accelerator) -> bool:
    """Every forward pass all-gathers each block's weights from every process, so all must run each one."""
    return accelerator.num_processes > 1


def gathered(params: list) -> contextlib.AbstractContextManager:
    """The loop writes whole parameters (load.py's new embedding rows) before prepare, where FSDP2 has not
    sharded them yet: they are simply themselves."""
    from torch.distributed.tensor import DTensor

    if any(isinstance(p, DTensor) for p in params):
        raise NotImplementedError("FSDP2 shards parameters at prepare; write them before it")
    return contextlib.nullcontext()


def full_state_dict(accelerator, model) -> dict[str, torch.Tensor]:
    """Every shard gathered, whole tensors in the main process's CPU memory (accelerate's get_state_dict does the
    same)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _optimizer(accelerator):
    """The torch optimizer under accelerate's wrapper (the one prepared with the model)."""
    optimizer = accelerator._optimizers[0]
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def _options(partial: bool, **more):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=partial, **more)


def _tied(model) -> dict[str, str]:
    """Parameters that share another's storage (tied embeddings): name -> the name it shares it with."""
    first: dict[int, str] = {}
    tied = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            tied[name] = first[id(p)]
        else:
            first[id(p)] = name
    return tied


def _state_dicts(model, optimizer, partial: bool) -> tuple[dict, dict]:
    """torch's model and optimizer state dicts; with LoRA without any frozen weight: torch drops a frozen
    parameter by its first name only, and kept a tied one's second (a frozen tied output projection, the size
    of the embedding, in every LoRA checkpoint)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer, options=_options(partial))
    if partial:
        for name, p in model.named_parameters(remove_duplicate=False):
            if not p.requires_grad:
                model_sd.pop(name, None)
    return model_sd, optim_sd


def save_state(accelerator, folder: Path, model, partial: bool) -> None:
    """Model and optimizer state as one DCP checkpoint in folder/dcp (a collective: every process writes its
    shards); with LoRA only what trains."""
    import torch.distributed.checkpoint as dcp

    model_sd, optim_sd = _state_dicts(model, _optimizer(accelerator), partial)
    state = {dcp_files.MODEL: model_sd, dcp_files.OPTIMIZER: optim_sd, dcp_files.ALIASES: _tied(model)}
    dcp.save(state, storage_writer=dcp_files.writer(folder / dcp_files.FOLDER))


def load_state(accelerator, folder: Path, model, partial: bool) -> None:
    """Read what `save_state` wrote into this run's shards (any number of processes), nothing unpickled."""
    from torch.distributed.checkpoint.state_dict import set_state_dict

    optimizer = _optimizer(accelerator)
    model_sd, optim_sd = _state_dicts(model, optimizer, partial)
    state = {dcp_files.MODEL: model_sd, dcp_files.OPTIMIZER: optim_sd}
    dcp_files.load(state, folder / dcp_files.FOLDER)
    set_state_dict(model, optimizer, model_state_dict=state[dcp_files.MODEL],
                   optim_state_dict=state[dcp_files.OPTIMIZER], options=_options(partial, strict=not partial))


def backward(accelerator, model, loss: torch.Tensor, last_micro_batch: bool) -> None:
    """accelerate's backward; FSDP2 reduce-scatters each micro-batch's gradients into the shards as it goes,
    which keeps the gradients sharded (skipping it until the last would hold them whole)."""
    accelerator.sync_gradients = last_micro_batch
    accelerator.backward(loss)


def clip_gradients(accelerator, model, max_grad_norm: float) -> torch.Tensor | float:
    """The norm over every shard (accelerate's DTensor-aware clip), clipped to `max_grad_norm` (0: not)."""
    norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm or math.inf)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def model_states_memory(total: int, largest: int, gpus_per_node: int, nodes: int, cpu_offload: bool,
                        offload_params: bool) -> tuple[float, float]:
    """FSDP2 with bf16 compute: fp32 weights, gradients and two Adam moments (16 bytes a parameter) shared by
    every GPU, plus the block being gathered and the next one prefetched in bf16; offloaded, the states live in
    the node's RAM and only the gathered blocks on the GPU (FSDP2 offloads parameters and optimizer together)."""
    gpus = gpus_per_node * nodes
    gathered_blocks = 2 * 2 * largest
    if cpu_offload or offload_params:
        return 16.0 * total * gpus_per_node / gpus, float(gathered_blocks)
    return 0.0, 16.0 * total / gpus + gathered_blocks


ENGINE = Engine(
    name="fsdp2", title="FSDP2", active=active, configure=lambda accelerator, training: None,
    zero_stage=zero_stage, offloads=offloads, describe=describe, place_model=place_model,
    synced_generation=synced_generation, gathered=gathered, full_state_dict=full_state_dict, backward=backward,
    clip_gradients=clip_gradients, discard_gradients=plain.discard_gradients, optimizer_step=plain.optimizer_step,
    save_state=save_state, load_state=load_state, reshard=dcp_files.reshard,
    layout=Layout(recognises=dcp_files.recognises, missing=dcp_files.missing, writer=dcp_files.rank_of,
                  weights=dcp_files.weights, unreadable=dcp_files.unreadable),
    outside_init=contextlib.nullcontext, model_states_memory=model_states_memory)
