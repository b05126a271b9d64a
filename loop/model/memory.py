"""A long row's memory: the MLPs computed in slices of the row (model.tiled_mlp) and the inputs gradient
checkpointing keeps moved to CPU memory (model.offload_checkpoints). With both, and the loss already computed in
chunks inside the output projection (head.py), what a row keeps on the device grows with its length only by
one hidden state per layer (on the host, offloaded) and one layer's recomputation at a time. The offloader is
DeepSpeed's (loop/engine/activations.py), the slices torch's checkpoint; this module decides where they apply."""

from __future__ import annotations

import functools
from contextlib import AbstractContextManager, nullcontext

import torch
from torch.utils.checkpoint import checkpoint

from loop.config import ConfigError, ModelConfig
from loop.engine import activations

OFFLOAD = "_loop_checkpoint_offload"  # the model's offloader, read by the step (offloading)


def mlps(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Each transformer block's dense MLP (`mlp`, a class named ...MLP: GPTBigCode, StarCoder2, Llama, Qwen2/3).
    A mixture of experts' block routes each token and returns the router's logits too: not tiled."""
    return [m for name, m in model.named_modules() if name.rsplit(".", 1)[-1] == "mlp"
            and type(m).__name__.upper().endswith("MLP")]


def apply(model: torch.nn.Module, settings: ModelConfig) -> None:
    """Tile the MLPs and mark the checkpoints for offload, as the settings ask (after dropout is set and LoRA
    wrapped, so the slices run what trains)."""
    if settings.tiled_mlp:
        found = mlps(model)
        if not found:
            raise ConfigError(f"model.tiled_mlp: {type(model).__name__} has no dense MLP to tile (a mixture of "
                              "experts' blocks are not tiled); set it to 0")
        for mlp in found:
            tile(mlp, settings.tiled_mlp)
    if settings.offload_checkpoints:
        layers = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True
                  and hasattr(m, "_gradient_checkpointing_func")]
        if not layers:
            raise ConfigError(f"model.offload_checkpoints: {type(model).__name__}'s layers have no gradient "
                              "checkpointing to offload (is model.gradient_checkpointing on?)")
        offload = activations.offloader()
        for layer in layers:
            activations.mark_inputs(layer, offload)
        setattr(model, OFFLOAD, offload)


def tile(mlp: torch.nn.Module, shards: int) -> None:
    """`mlp` runs on `shards` slices of the sequence, each under torch's checkpoint: its intermediate activations
    (4-5x the hidden size) exist for one slice at a time, in the forward and again when backward recomputes it,
    and the slices' weight gradients add up inside the one backward pass, which every engine reduces as usual.
    DeepSpeed's TiledMLP does the same with a backward of its own per slice, its gradients held back by a
    `ds_grad_is_ready` flag: under 2-process ZeRO-3 with each block gathered whole (engine/deepspeed.py) a rank
    aborted in gloo (tests/test_bench_long_row.py at 128-token rows). The checkpoint restores the random state,
    so dropout draws the same mask again. Without gradients it is the plain forward."""
    forward = mlp.forward

    @functools.wraps(forward)
    def tiled(x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return forward(x)
        return torch.cat([checkpoint(forward, part, use_reentrant=False) for part in x.chunk(shards, dim=-2)], -2)

    mlp.forward = tiled


def offloading(model) -> AbstractContextManager:
    """What one micro-batch's forward and backward run inside: the model's checkpoint offloader, or nothing.
    `model` as prepared (DeepSpeed's engine and DDP hold the loaded model as .module). Read from the instances'
    own attributes: DeepSpeed's engine answers a missing attribute by listing itself and its module (dir()),
    a cost on every micro-batch."""
    inner = vars(model).get("_modules", {}).get("module")
    return vars(model).get(OFFLOAD) or (inner is not None and vars(inner).get(OFFLOAD)) or nullcontext()
