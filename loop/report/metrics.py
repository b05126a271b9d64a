"""What the run measures: the logging window (loss, throughput, MFU, memory, the step's time split) and the
line it becomes on the console and in train.log."""

from __future__ import annotations

import logging
import resource
import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch

from loop.report.card import RunSummary
from loop.report.logs import CONSOLE_ONLY, FILE_ONLY
from loop.report.routing import RoutingWindow
from loop.state.progress import due

if TYPE_CHECKING:
    from loop.state.progress import LoopState

# Dense bf16 peak FLOP/s per device, for MFU when the config gives none.
PEAK_BF16_FLOPS = {
    "H200": 989e12, "H100": 989e12, "A100": 312e12, "A10G": 125e12, "L40S": 362e12,
    "L4": 121e12, "A6000": 155e12, "4090": 165e12, "V100": 125e12, "MI300X": 1307e12,
}


def full_line(scalars: dict[str, float]) -> str:
    """Every scalar, for train.log."""
    return " ".join(f"{k}={v:.4g}" for k, v in scalars.items())


def window_lines(scalars: dict[str, float], step: int, total: int, console: dict[str, str] | None = None
                 ) -> tuple[str, str]:
    """(the short console line, the full line for train.log) of one logging window; `console`: the objective's
    statistics the short line shows too (scalar -> format; preference tuning: how often chosen wins)."""
    shown = "".join(f"  {form.format(scalars[k])}" for k, form in (console or {}).items() if k in scalars)
    short = (f"step {step}/{total}  loss {scalars['train/loss']:.4f}"
             + shown + f"  lr {scalars['train/lr']:.2e}  "
             f"grad norm {scalars['train/grad_norm']:.3g}  {scalars['throughput/tokens_per_s']:,.0f} tokens/s"
             + (f"  MFU {scalars['throughput/mfu']:.1%}" if "throughput/mfu" in scalars else ""))
    return short, full_line(scalars)


def log_window(accelerator, meter: Meter, lr: float, state: LoopState, total_steps: int, steps_per_epoch: int,
               console: dict[str, str] | None = None) -> float:
    """Close the logging window: every scalar to the trackers and train.log, a short line to the console.
    Returns the window's train loss."""
    scalars = meter.scalars(lr, state.step / steps_per_epoch, state.tokens_trained)
    accelerator.log(scalars, step=state.step)
    short, full = window_lines(scalars, state.step, total_steps, console)
    log = logging.getLogger("loop")
    log.info(short, extra=CONSOLE_ONLY)
    log.info(full, extra=FILE_ONLY)
    return scalars["train/loss"]


class Logger:
    """The loop's logging component: closes the window every `training.log_every` steps and at the last step,
    and keeps the last window's train loss for the model card."""

    def __init__(self, accelerator, meter: Meter, every: int, total_steps: int, steps_per_epoch: int,
                 summary: RunSummary, console: dict[str, str], routing: RoutingWindow | None = None) -> None:
        self.accelerator, self.meter, self.every, self.total_steps = accelerator, meter, every, total_steps
        self.steps_per_epoch, self.summary, self.console, self.routing = steps_per_epoch, summary, console, routing

    def maybe_log(self, state: LoopState, lr: float) -> None:
        if due(state.step, self.every, self.total_steps):
            self.summary.train_loss = log_window(self.accelerator, self.meter, lr, state, self.total_steps,
                                                 self.steps_per_epoch, self.console)
            if self.routing is not None:  # a mixture of experts: its routing over the same window
                self.routing.log(self.accelerator, state.step)


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
        self.start, self.cpu = time.perf_counter(), time.process_time()
        self.steps = self.trained_steps = self.tokens = self.trained = 0
        self.flops = self.loss = 0.0
        self.grad_norm: torch.Tensor | float = float("nan")
        self.statistics: dict[str, float] = defaultdict(float)

    def add(self, tokens: int, trained: int, piece_lengths: list[int], loss: float | None,
            grad_norm: torch.Tensor | float, statistics: dict[str, float] | None = None) -> None:
        """One optimizer step; loss None means it was skipped (nothing trained). `statistics` are the
        objective's (for DPO, TRL's rewards and log-probabilities), averaged over the window like the loss."""
        self.steps += 1
        self.tokens += tokens
        self.flops += self.flops_of(piece_lengths)
        self.grad_norm = grad_norm
        if loss is not None:
            self.trained_steps += 1
            self.trained += trained
            self.loss += loss
            for name, value in (statistics or {}).items():
                self.statistics[name] += value

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
        out |= {f"train/{k}": v / max(1, self.trained_steps) for k, v in self.statistics.items()}
        out |= {f"time/{k}": v / max(1, self.steps) for k, v in self.timers.pop().items()}
        # The whole step, and the CPU-seconds this process (every thread) spent on it: the host's cost per step.
        out |= {"time/step": elapsed / max(1, self.steps),
                "time/process_cpu": (time.process_time() - self.cpu) / max(1, self.steps)}
        if self.peak:
            out["throughput/mfu"] = self.flops / elapsed / self.world / self.peak
        self._reset()
        return out
