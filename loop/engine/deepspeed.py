"""DeepSpeed as the loop drives it, as one `Engine` (ENGINE, at the end): the settings it fills in, the engine
calls of a step, how a model is built and gathered under ZeRO-3, how its checkpoints are saved and read
safely (their files: zero3_files.py), the memory its model states take, and what the card says."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from loop.config import TrainingConfig
from loop.engine import zero3_files, zero3_reshard
from loop.engine.interface import Engine, Layout


def is_active(accelerator) -> bool:
    return accelerator.state.deepspeed_plugin is not None


def zero_stage(accelerator) -> int | None:
    plugin = accelerator.state.deepspeed_plugin
    return plugin.zero_stage if plugin else None


def settings(ds: dict, t: TrainingConfig, processes: int) -> None:
    """Fill in the DeepSpeed config accelerate built: the batch from the run config, and the defaults
    that cost throughput (unless the DeepSpeed config sets them itself)."""
    ds.update({"train_micro_batch_size_per_gpu": t.micro_batch_size,
               "gradient_accumulation_steps": t.gradient_accumulation_steps,
               "train_batch_size": t.micro_batch_size * t.gradient_accumulation_steps * processes,
               "gradient_clipping": t.max_grad_norm})
    # DeepSpeed's throughput timer synchronises the device at every forward and at every step, so the
    # host cannot queue work ahead; the loop times its steps with CUDA events instead.
    ds.setdefault("timers", {"throughput": {"enabled": False}})
    zero = ds.get("zero_optimization", {})
    on_device = zero.get("offload_param", {}).get("device", "none") in ("none", None)
    if processes == 1 and zero.get("stage") == 3 and on_device:
        # One process holds every shard anyway: gathering and releasing each layer's weights around
        # every forward and backward only stalls the GPU, so every parameter stays.
        if zero.get("stage3_param_persistence_threshold", "auto") == "auto":
            zero["stage3_param_persistence_threshold"] = 2**62
            # DeepSpeed's own linear (the default) re-gathers a released weight in backward instead of
            # keeping it; nothing is released here, and torch's fuses the bias into the matmul: forward+
            # backward 218 -> 202 ms a step on an H200 (tools/bench/README.md, run 3).
            zero.setdefault("memory_efficient_linear", False)


def configure(accelerator, t: TrainingConfig) -> None:
    """Apply `settings` to the accelerator's DeepSpeed plugin, where transformers' zero.Init reads them too."""
    plugin = accelerator.state.deepspeed_plugin
    settings(plugin.deepspeed_config, t, accelerator.num_processes)
    plugin.set_deepspeed_weakref()  # transformers' zero.Init reads a copy accelerate made before the settings


def describe(accelerator) -> str:
    """How DeepSpeed shares the work, for the model card: "DeepSpeed ZeRO-3, optimizer offloaded"."""
    plugin = accelerator.state.deepspeed_plugin
    zero = plugin.deepspeed_config.get("zero_optimization", {})
    offload = [k.removeprefix("offload_") for k in ("offload_optimizer", "offload_param")
               if (zero.get(k) or {}).get("device") not in (None, "none")]
    return f"DeepSpeed ZeRO-{plugin.zero_stage}" + (f", {' and '.join(offload)} offloaded" if offload else "")


def gather_by_block(model: torch.nn.Module) -> None:
    """ZeRO-3 gathers each transformer block's weights at once (as FSDP wraps per block) instead of each
    linear layer's: one set of hooks, one fetch and one prefetch per block instead of eight, which is
    most of ZeRO-3's host time. The block classes are the ones transformers never splits across devices."""
    from deepspeed.utils import set_z3_leaf_modules

    names = set(getattr(model, "_no_split_modules", None) or [])
    classes = list({type(m) for m in model.modules() if type(m).__name__ in names})
    if classes:
        set_z3_leaf_modules(model, classes)


@contextmanager
def gathered(params: list[torch.nn.Parameter]) -> Iterator[None]:
    """Inside the block, ZeRO-3 partitioned `params` hold their full values, and what rank 0 writes to them is
    kept (every rank writing the same is fine); plain parameters are simply themselves."""
    if not any(hasattr(p, "ds_id") for p in params):
        yield
        return
    from deepspeed.zero import GatheredParameters

    with GatheredParameters(params, modifier_rank=0):
        yield


@contextmanager
def outside_zero_init() -> Iterator[None]:
    """Build a plain model in this process's memory, also inside a ZeRO-3 run: transformers would otherwise
    build it inside zero.Init, a collective the other processes never join."""
    from transformers.integrations import deepspeed as hf_deepspeed

    ref = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = ref


def synced_generation(accelerator) -> bool:
    """Whether generate() must keep every process running forward passes until all are done (ZeRO-3 over
    several processes gathers each layer's weights from all of them)."""
    return is_active(accelerator) and accelerator.num_processes > 1


def offloads(accelerator) -> set[str]:
    """Where ZeRO moves the model states it offloads ("cpu", "nvme"), for the memory check."""
    zero = accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {})
    return {(zero.get(k) or {}).get("device") for k in ("offload_param", "offload_optimizer")} - {None, "none"}


def place_model(accelerator, model: torch.nn.Module, partial: bool) -> None:
    """Under ZeRO-3, gather by transformer block (with a frozen base DeepSpeed's leaf-module backward loses the
    adapters, so not with LoRA)."""
    if zero_stage(accelerator) == 3 and not partial:
        gather_by_block(model)


# The engine calls of one optimizer step. DeepSpeed's engine is driven directly, as accelerate's wrapper
# does, so that its optimizer step can be timed on its own; it clips and skips non-finite steps itself.

def backward(accelerator, engine, loss: torch.Tensor, last_micro_batch: bool) -> None:
    engine.set_gradient_accumulation_boundary(last_micro_batch)
    engine.backward(loss)


def clip_gradients(accelerator, engine, max_grad_norm: float) -> float:
    """DeepSpeed clips inside its step and reports the norm from there: not known yet (nan)."""
    return float("nan")


def discard_gradients(accelerator, engine, optimizer) -> None:
    engine.optimizer.zero_grad()


def optimizer_step(accelerator, engine, optimizer, grad_norm) -> torch.Tensor | float:
    """Clip, update, and return the gradient norm DeepSpeed found (inf or nan when it skipped the step)."""
    engine.step()
    return engine.get_global_grad_norm()


def save_state(accelerator, folder: Path, engine, partial: bool) -> None:
    """accelerate.save_state; a LoRA run saves only what trains (the base is the model it started from)."""
    accelerator.save_state(str(folder), **({"exclude_frozen_parameters": True} if partial else {}))


def load_state(accelerator, folder: Path, engine, partial: bool) -> None:
    """accelerate.load_state with DeepSpeed's engine reading through the safe reader (its own unpickles)."""
    engine.checkpoint_engine = zero3_files.safe_checkpoint_engine(engine.checkpoint_engine)
    accelerator.load_state(str(folder), **({"load_module_strict": False} if partial else {}))


def model_states_memory(total: int, largest: int, gpus_per_node: int, nodes: int, cpu_offload: bool,
                        offload_params: bool) -> tuple[float, float]:
    """DeepSpeed's own estimate of ZeRO-3's model states: (CPU bytes per node, GPU bytes per GPU)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    cpu, gpu, _ = estimate_zero3_model_states_mem_needs(total, largest, gpus_per_node, nodes,
                                                        cpu_offload=cpu_offload, cpu_offload_params=offload_params)
    return cpu, gpu


def full_state_dict(accelerator, model) -> dict[str, torch.Tensor]:
    """accelerate's get_state_dict (ZeRO-3: gathered from every process's partition)."""
    return accelerator.get_state_dict(model)


ENGINE = Engine(
    name="deepspeed", title="DeepSpeed", active=is_active, configure=configure, zero_stage=zero_stage,
    offloads=offloads, describe=describe, place_model=place_model, synced_generation=synced_generation,
    gathered=gathered, full_state_dict=full_state_dict, backward=backward, clip_gradients=clip_gradients,
    discard_gradients=discard_gradients, optimizer_step=optimizer_step, save_state=save_state, load_state=load_state,
    reshard=zero3_reshard.reshard,
    layout=Layout(recognises=zero3_files.recognises, missing=zero3_files.missing_shards, writer=zero3_files.rank_of,
                  weights=zero3_files.weights),
    outside_init=outside_zero_init, model_states_memory=model_states_memory, master_weights=True)
