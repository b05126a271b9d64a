"""What the run reports: logging to console and file, throughput, FLOPs, MFU and memory."""

from __future__ import annotations

import logging
import os
import resource
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch

if TYPE_CHECKING:
    from loop.checkpoints import LoopState

# Dense bf16 peak FLOP/s per device, for MFU when the config gives none.
PEAK_BF16_FLOPS = {
    "H200": 989e12, "H100": 989e12, "A100": 312e12, "A10G": 125e12, "L40S": 362e12,
    "L4": 121e12, "A6000": 155e12, "4090": 165e12, "V100": 125e12, "MI300X": 1307e12,
}


class ConsoleHandler(logging.StreamHandler):
    """Writes through tqdm, so that a log line never lands in the middle of the progress bar."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001 - as logging.StreamHandler does
            self.handleError(record)


FILE_ONLY = {"only": "file"}  # `extra` for lines that belong in train.log, not on the console
CONSOLE_ONLY = {"only": "console"}


def window_lines(scalars: dict[str, float], step: int, total: int) -> tuple[str, str]:
    """(the short console line, the full line for train.log) of one logging window."""
    full = " ".join(f"{k}={v:.4g}" for k, v in scalars.items())
    short = (f"step {step}/{total}  loss {scalars['train/loss']:.4f}  lr {scalars['train/lr']:.2e}  "
             f"grad norm {scalars['train/grad_norm']:.3g}  {scalars['throughput/tokens_per_s']:,.0f} tokens/s"
             + (f"  MFU {scalars['throughput/mfu']:.1%}" if "throughput/mfu" in scalars else ""))
    return short, full


def log_window(accelerator, meter: Meter, lr: float, state: LoopState, total_steps: int, steps_per_epoch: int) -> float:
    """Close the logging window: every scalar to the trackers and train.log, a short line to the console.
    Returns the window's train loss."""
    scalars = meter.scalars(lr, state.step / steps_per_epoch, state.tokens_trained)
    accelerator.log(scalars, step=state.step)
    short, full = window_lines(scalars, state.step, total_steps)
    log = logging.getLogger("loop")
    log.info(short, extra=CONSOLE_ONLY)
    log.info(full, extra=FILE_ONLY)
    return scalars["train/loss"]


def setup_logging(is_main: bool) -> logging.Logger:
    """Main process logs to the console (and keeps the lines until loop/rundir.py opens train.log); the
    others only warn."""
    from logging.handlers import MemoryHandler

    log = logging.getLogger("loop")
    for old in list(log.handlers):  # a previous run in this process (tests, notebooks)
        old.close()
        log.removeHandler(old)
    log.propagate = False
    log.setLevel(logging.INFO if is_main else logging.WARNING)
    console = ConsoleHandler()
    console.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    console.addFilter(lambda record: getattr(record, "only", "console") == "console")
    log.addHandler(console)
    if is_main:
        log.addHandler(MemoryHandler(capacity=100_000, flushLevel=logging.CRITICAL + 1))
    saver = logging.getLogger("accelerate.utils.other")
    if _tied_weights_note not in saver.filters:
        saver.addFilter(_tied_weights_note)
    return log


def _tied_weights_note(record: logging.LogRecord) -> bool:
    """Drop accelerate's warning, at every checkpoint without DeepSpeed, that a weight tied to another (the
    output projection to the token embedding) is stored once: loading ties it again, and resume is
    bit-identical (tests/test_loss.py), so the line only breaks into the progress bar."""
    return "Removed shared tensor" not in record.getMessage()  # after accelerate's "[RANK 0] "


Tracker = Literal["tensorboard", "wandb", "mlflow", "trackio"]


def check_trackers(report_to: list[str]) -> None:
    """Refuse a tracker that is not installed: Accelerate would drop it with a warning and its metrics be lost."""
    from accelerate.tracking import get_available_trackers

    from loop import config

    missing = sorted(set(report_to) - {t.value for t in get_available_trackers()})
    if missing:
        raise config.ConfigError(f"output.report_to: {', '.join(missing)} not installed here "
                                 f"(pip install {' '.join(missing)}, or leave it out)")


def start_trackers(accelerator, cfg, step: int) -> None:
    """Every tracker of output.report_to, with the resolved config as the run's hyperparameters.

    Accelerate starts W&B, MLflow and Trackio by name (W&B's files and, unless MLFLOW_TRACKING_URI says
    otherwise, MLflow's file store go into the output directory; WANDB_MODE=offline keeps W&B local).
    TensorBoard is built here because its writer must purge what a crashed run logged after `step`.
    """
    from accelerate.tracking import TensorBoardTracker

    from loop import config

    out = Path(cfg.output.output_dir)
    flat = {f"{section}.{key}": value if isinstance(value, int | float | str | bool) else str(value)
            for section, values in config.to_dict(cfg).items() for key, value in values.items()}
    others = [t for t in cfg.output.report_to if t != "tensorboard"]
    if "mlflow" in others and "MLFLOW_TRACKING_URI" not in os.environ:
        # MLflow 3 refuses a file store unless asked; it is still the one backend that needs no server or database.
        os.environ["MLFLOW_TRACKING_URI"] = (out / "mlruns").resolve().as_uri()
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    if others:
        accelerator.init_trackers(out.resolve().name, config=flat,
                                  init_kwargs={"wandb": {"dir": str(out), "name": out.name, "resume": "allow"}})
    if "tensorboard" in cfg.output.report_to and accelerator.is_main_process:
        board = TensorBoardTracker("tensorboard", out, purge_step=step)
        board.start()
        board.store_init_configuration(flat)
        accelerator.trackers.append(board)


def peak_flops_per_device(configured: float) -> float:
    """The configured peak, else a known GPU's bf16 peak, else 0 (MFU is then not reported)."""
    if configured > 0:
        return configured
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, flops in PEAK_BF16_FLOPS.items():
            if key in name:
                return flops
    return 0.0


def setup(accelerator, cfg) -> tuple[str, str]:
    """(how the processes shared the work, the precision), for the model card."""
    plugin = accelerator.state.deepspeed_plugin
    machines = int(os.environ.get("GROUP_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1"))) // max(
        1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    where = f"{accelerator.num_processes} process(es) on {max(1, machines)} node(s)"
    if plugin is not None:
        zero = plugin.deepspeed_config.get("zero_optimization", {})
        offload = [k.removeprefix("offload_") for k in ("offload_optimizer", "offload_param")
                   if (zero.get(k) or {}).get("device") not in (None, "none")]
        shared = f"DeepSpeed ZeRO-{plugin.zero_stage}" + (f", {' and '.join(offload)} offloaded" if offload else "")
    else:
        shared = "data parallel (DDP)" if accelerator.num_processes > 1 else "one process"
    mixed = {"no": "fp32"}.get(str(accelerator.mixed_precision), str(accelerator.mixed_precision))
    precision = f"{mixed} training, saved as {cfg.output.save_dtype}"
    if cfg.lora.enabled and cfg.lora.quantize == "4bit":
        precision += "; frozen base in 4-bit NF4"
    return f"{shared}, {where}", precision


def hardware(world_size: int) -> str:
    """What the run ran on, for the model card."""
    if torch.cuda.is_available():
        return f"{world_size} x {torch.cuda.get_device_name()}"
    return f"{world_size} CPU process(es)"


def attention_pairs(n: np.ndarray, window: int | None) -> np.ndarray:
    """Query-key pairs causal attention computes in a dialogue of n tokens (each query sees at most
    `window` keys, itself included)."""
    if window is None:
        return n * (n + 1) // 2
    w = np.minimum(n, window)
    return w * (w + 1) // 2 + (n - w) * w


def training_flops(matmul_params: int, shape, piece_lengths: list[int], trainable_matmul_params: int | None = None
                   ) -> float:
    """FLOPs of forward + backward over these pieces (packed dialogues).

    Per token, 2 per matmul parameter forward (embedding lookups are no matmuls), 2 backward for the
    gradient of the activations (every layer passes it on), and 2 for the gradient of the weights,
    which only trainable weights get: 6N when everything trains, 4N + 2N_trainable with a frozen base
    (LoRA), so MFU does not count work that is not done. Plus attention: QK^T and AV cost 2 * head_dim
    FLOPs each per query head per query-key pair forward, times 3 for forward + backward (it has no
    weights); key/value heads shared by several query heads save memory, not these FLOPs. Packing
    matters: pairs follow each dialogue's own length (and sliding window).
    """
    n = np.asarray(piece_lengths, dtype=np.int64)
    trainable = matmul_params if trainable_matmul_params is None else trainable_matmul_params
    pairs = sum(int(attention_pairs(n, w).sum()) for w in shape.windows)
    return (4.0 * matmul_params + 2.0 * trainable) * int(n.sum()) + 12.0 * shape.q_heads * shape.head_dim * pairs


def peak_memory_bytes() -> int:
    """Peak GPU memory when a GPU is used, else the process's peak resident memory."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Timers:
    """Seconds spent per phase since the last `pop`.

    On a GPU the phases that queue device work are timed with CUDA events and read only in `pop`
    (at logging steps), so timing adds no synchronisation to the step; host-only phases (waiting for
    data) use the wall clock.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.host: dict[str, float] = defaultdict(float)
        self.events: dict[str, list] = defaultdict(list)

    @contextmanager
    def __call__(self, name: str, host: bool = False):
        if self.cuda and not host:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            try:
                yield
            finally:
                end.record()
                self.events[name].append((start, end))
            return
        begin = time.perf_counter()
        try:
            yield
        finally:
            self.host[name] += time.perf_counter() - begin

    def pop(self) -> dict[str, float]:
        out = dict(self.host)
        if self.events:
            torch.cuda.synchronize()
            for name, pairs in self.events.items():
                out[name] = out.get(name, 0.0) + sum(a.elapsed_time(b) for a, b in pairs) / 1000
        self.host, self.events = defaultdict(float), defaultdict(list)
        return out


class Meter:
    """The logging window: what happened since the last log line, turned into scalars.

    Values that live on the device (the gradient norm) are read only when the scalars are built.
    """

    def __init__(self, world: int, peak_flops: float, flops: Callable[[list[int]], float],
                 packing_efficiency: float, timers: Timers) -> None:
        self.world, self.peak, self.flops_of, self.packing_efficiency = world, peak_flops, flops, packing_efficiency
        self.timers = timers
        self._reset()

    def _reset(self) -> None:
        self.start = time.perf_counter()
        self.steps = self.trained_steps = self.tokens = self.trained = 0
        self.flops = self.loss = 0.0
        self.grad_norm: torch.Tensor | float = float("nan")

    def add(self, tokens: int, trained: int, piece_lengths: list[int], loss: float | None,
            grad_norm: torch.Tensor | float) -> None:
        """One optimizer step; loss None means it was skipped (nothing trained)."""
        self.steps += 1
        self.tokens += tokens
        self.flops += self.flops_of(piece_lengths)
        self.grad_norm = grad_norm
        if loss is not None:
            self.trained_steps += 1
            self.trained += trained
            self.loss += loss

    def scalars(self, lr: float, epoch: float, tokens_trained: int) -> dict[str, float]:
        """Every scalar of the window (for TensorBoard and train.log); starts a new window."""
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        out = {"train/loss": self.loss / max(1, self.trained_steps), "train/lr": lr,
               "train/grad_norm": float(self.grad_norm), "train/epoch": epoch,
               "throughput/tokens_per_s": self.tokens / elapsed,
               "throughput/tokens_per_s_per_device": self.tokens / elapsed / self.world,
               "throughput/trained_tokens_per_s": self.trained / elapsed,
               "throughput/trained_tokens_per_s_per_device": self.trained / elapsed / self.world,
               "throughput/packing_efficiency": self.packing_efficiency,
               "memory/peak_bytes": peak_memory_bytes(), "progress/tokens_trained": tokens_trained}
        out |= {f"time/{k}": v / max(1, self.steps) for k, v in self.timers.pop().items()}
        if self.peak:
            out["throughput/mfu"] = self.flops / elapsed / self.world / self.peak
        self._reset()
        return out
