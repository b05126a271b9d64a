"""The accelerator a run trains with: accelerate's Accelerator over gloo on CPU-only machines, its engine
chosen once (registry.choose; DeepSpeed's settings filled in when the launch asked for DeepSpeed), processes
refused when accelerate left them unconnected, and accelerate's checkpoint loader held to the safe reader."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import torch
from accelerate import Accelerator, DistributedType, InitProcessGroupKwargs

from loop.config import Config, ConfigError
from loop.engine import fsdp2, registry, safe_load

SHM_OP = "deepspeed_shm_comm"  # DeepSpeed's CPU communication op, JIT-built on first use


def extensions_of_this_environment() -> str | None:
    """Keep torch's JIT-built extensions in this virtual environment (by default every environment on the
    machine shares ~/.cache/torch_extensions, so alternating ones rebuild DeepSpeed's op: 150 s seen), and
    say so when DeepSpeed's CPU op is about to be built, which takes about a minute with no word of its own."""
    folder = Path(os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions")))
    on_cpu = os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true" and not torch.cuda.is_available()
    if on_cpu and not (folder / SHM_OP / f"{SHM_OP}.so").is_file():
        return f"building DeepSpeed's CPU communication op once, about a minute (kept in {folder})"
    return None


def import_deepspeed_without_mlflow() -> None:
    """Import DeepSpeed with mlflow hidden: its autotuner imports mlflow at import time when it is installed
    (1-3 s of every process's start here), though the loop never autotunes. Hidden for that import only, so a
    run that reports to mlflow still loads it through accelerate."""
    if "deepspeed" in sys.modules or "mlflow" in sys.modules or os.environ.get("ACCELERATE_USE_DEEPSPEED") != "true":
        return
    sys.modules["mlflow"] = None  # `import mlflow` raises ImportError, which the autotuner catches
    try:
        import deepspeed  # noqa: F401
    finally:
        del sys.modules["mlflow"]


def make_accelerator(cfg: Config) -> Accelerator:
    import_deepspeed_without_mlflow()
    if (note := extensions_of_this_environment()) and os.environ.get("RANK", "0") == "0":
        logging.getLogger("loop").info(note)
    kwargs = []
    if "LOCAL_RANK" in os.environ and not torch.cuda.is_available():
        # On CPU accelerate leaves the backend unset and every rank thinks it is alone.
        kwargs.append(InitProcessGroupKwargs(backend="gloo"))
    named = [t for t in cfg.output.report_to if t != "tensorboard"]  # TensorBoard: loop/report/trackers.py
    with contextlib.redirect_stdout(io.StringIO()) as captured:  # DeepSpeed prints "... built successfully" each start
        accelerator = Accelerator(log_with=named or None, project_dir=cfg.output.output_dir,
                                  gradient_accumulation_steps=cfg.training.gradient_accumulation_steps,
                                  kwargs_handlers=kwargs, cpu=fsdp2.wanted_on_cpu())
    lines = [line for line in captured.getvalue().splitlines() if "built successfully" not in line]
    if lines:
        print("\n".join(lines))
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and accelerator.distributed_type == DistributedType.NO:
        raise ConfigError(f"{launched} processes were launched but accelerate set up no distributed training, so "
                          "each would train alone into the same output_dir (without GPUs, `accelerate launch "
                          "--multi_gpu` and plain torchrun do this); launch with a config from accelerate_configs/, "
                          "or one process")
    fsdp2.set_up_on_cpu(accelerator)
    registry.choose(accelerator).configure(accelerator, cfg.training)  # the one place the engine is chosen
    return accelerator


def end_run(accelerator: Accelerator, code: int) -> int:
    """Close the run on every process and return its exit code."""
    accelerator.wait_for_everyone()  # without it, 2-process runs sometimes abort at exit
    accelerator.end_training()  # trackers flushed and closed, then the process group destroyed
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return code


def exit_process(code: int) -> NoReturn:
    """End a training process after its run is closed, skipping interpreter shutdown.

    Destroying the process group does not stop its gloo threads: DeepSpeed's objects (every ZeRO-3
    parameter, its world group in deepspeed.utils.groups) still hold the groups, so two pt_gloo_runloop
    threads per group and the transport's gloo_tcp_loop threads are alive when the interpreter exits, and
    exit()'s C++ static destructors then race them: now and then a finished run ended with "terminate
    called without an active exception" (SIGABRT, and the launch exits 1). Everything the run writes is
    closed by then (checkpoints and models fsynced, trackers ended, uploads joined), so after flushing the
    log and the console nothing is lost by leaving with os._exit."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


@contextlib.contextmanager
def safe_state_loading() -> Iterator[None]:
    """accelerate's load_state reads optimizer.bin (and any pytorch_model.bin) through the reader ZeRO-3's
    shards go through (safe_load.torch_load: plain data only, nothing else allowed), not its own."""
    from accelerate import checkpointing

    def load(path, map_location=None, **_ignored):  # its `weights_only`: ours always is
        return safe_load.torch_load(path, map_location=map_location)

    original = checkpointing.load
    checkpointing.load = load
    try:
        yield
    finally:
        checkpointing.load = original
