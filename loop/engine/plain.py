"""accelerate's own path as an `Engine` (ENGINE, at the end): one process, or DDP over several, each holding
the whole model. Its checkpoints are accelerate's save_state: whole weights in model.safetensors (written by
the main process) and optimizer.bin, read back through the safe reader (accelerator.safe_state_loading)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path

import torch

from loop.engine.interface import Engine, Layout, Weights
from loop.engine.safe_load import ConsolidationError

WEIGHTS = "model.safetensors"  # accelerate's save_state with safetensors (its default)
OPTIMIZER = "optimizer.bin"
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}


def active(accelerator) -> bool:
    """One process, or plain data parallel (accelerate's MULTI_GPU, MULTI_CPU, ...)."""
    kind = getattr(accelerator.distributed_type, "value", str(accelerator.distributed_type))
    return kind == "NO" or kind.startswith("MULTI_")


def describe(accelerator) -> str:
    return "data parallel (DDP)" if accelerator.num_processes > 1 else "one process"


def backward(accelerator, model, loss: torch.Tensor, last_micro_batch: bool) -> None:
    """Gradients are reduced across processes after the last micro-batch only."""
    accelerator.sync_gradients = last_micro_batch
    accelerator.backward(loss)


def clip_gradients(accelerator, model, max_grad_norm: float) -> torch.Tensor | float:
    """The gradient norm, clipped to `max_grad_norm` (0: not clipped)."""
    return accelerator.clip_grad_norm_(model.parameters(), max_grad_norm or math.inf)


def discard_gradients(accelerator, model, optimizer) -> None:
    optimizer.zero_grad()


def optimizer_step(accelerator, model, optimizer, grad_norm: torch.Tensor | float) -> torch.Tensor | float:
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def save_state(accelerator, folder: Path, model, partial: bool) -> None:
    """accelerate.save_state; with LoRA only what trains is kept (the base is the model the run started from)."""
    accelerator.save_state(str(folder))
    if partial and accelerator.is_main_process:
        keep_trainable(folder / WEIGHTS, accelerator.unwrap_model(model))


def load_state(accelerator, folder: Path, model, partial: bool) -> None:
    accelerator.load_state(str(folder), **({"strict": False} if partial else {}))


def keep_trainable(weights: Path, model) -> None:
    """Rewrite a checkpoint's model.safetensors with the trainable parameters only."""
    from safetensors.torch import load_file, save_file

    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    tensors = load_file(weights)
    save_file({k: v for k, v in tensors.items() if k in trainable}, str(weights), metadata={"format": "pt"})


def recognises(names: list[str]) -> bool:
    return WEIGHTS in names or "pytorch_model.bin" in names


def missing(folder: Path, world_size: int) -> list[str]:
    """The weights and the optimizer state (the main process writes both, whatever the number of processes)."""
    found = [] if (folder / WEIGHTS).is_file() or (folder / "pytorch_model.bin").is_file() else [WEIGHTS]
    return found + ([] if (folder / OPTIMIZER).is_file() else [OPTIMIZER])


def weights(ckpt: Path) -> Weights:
    """The whole weights, one tensor at a time from model.safetensors (nothing unpickled; tied weights were
    written once by accelerate, and come back tied when the model is loaded)."""
    from safetensors import SafetensorError, safe_open

    path = ckpt / WEIGHTS
    if not (ckpt / "config.json").is_file():
        raise ConsolidationError(f"{ckpt / 'config.json'}: missing; the checkpoint has no model config to write")
    if not path.is_file():
        raise ConsolidationError(f"{path}: missing; a checkpoint of a run without DeepSpeed holds its weights there")
    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {k: (tuple(f.get_slice(k).get_shape()), SAFETENSORS_DTYPES[f.get_slice(k).get_dtype()])
                      for k in f.keys()}
    except (SafetensorError, KeyError, OSError) as e:
        raise ConsolidationError(f"{path}: unreadable ({type(e).__name__}: {e})") from None

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        with safe_open(str(path), framework="pt") as f:
            for k in shapes:
                yield k, f.get_tensor(k)

    return Weights(tensors, shapes, {})


def model_states_memory(total: int, largest: int, gpus_per_node: int, nodes: int, cpu_offload: bool,
                        offload_params: bool) -> tuple[float, float]:
    """Every process holds everything: fp32 weights, gradients and two Adam moments, 16 bytes a parameter."""
    return 0.0, 16.0 * total


def full_state_dict(accelerator, model) -> dict[str, torch.Tensor]:
    """accelerate's get_state_dict."""
    return accelerator.get_state_dict(model)


ENGINE = Engine(
    name="accelerate", title="accelerate without DeepSpeed (one process or DDP)", active=active,
    configure=lambda accelerator, training: None, zero_stage=lambda accelerator: None,
    offloads=lambda accelerator: set(), describe=describe, place_model=lambda accelerator, model, partial: None,
    synced_generation=lambda accelerator: False, gathered=lambda params: contextlib.nullcontext(),
    full_state_dict=full_state_dict, backward=backward,
    clip_gradients=clip_gradients, discard_gradients=discard_gradients, optimizer_step=optimizer_step,
    save_state=save_state, load_state=load_state, reshard=None,
    layout=Layout(recognises=recognises, missing=missing, writer=lambda name: None, weights=weights),
    outside_init=contextlib.nullcontext, model_states_memory=model_states_memory)
