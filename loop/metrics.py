"""What the run reports: logging to console and file, throughput, FLOPs, MFU and memory."""

from __future__ import annotations

import logging
import resource
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch

# Dense bf16 peak FLOP/s per device, for MFU when the config gives none.
PEAK_BF16_FLOPS = {
    "H200": 989e12, "H100": 989e12, "A100": 312e12, "A10G": 125e12, "L40S": 362e12,
    "L4": 121e12, "A6000": 155e12, "4090": 165e12, "V100": 125e12, "MI300X": 1307e12,
}


def setup_logging(output_dir: Path, is_main: bool) -> logging.Logger:
    """Main process logs to the console and to OUTPUT_DIR/train.log; the others only warn."""
    log = logging.getLogger("loop")
    log.handlers.clear()
    log.propagate = False
    log.setLevel(logging.INFO if is_main else logging.WARNING)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(fmt)
    log.addHandler(console)
    if is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        file = logging.FileHandler(output_dir / "train.log")
        file.setFormatter(fmt)
        log.addHandler(file)
    return log


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


def hardware(world_size: int) -> str:
    """What the run ran on, for the model card."""
    if torch.cuda.is_available():
        return f"{world_size} x {torch.cuda.get_device_name()}"
    return f"{world_size} CPU process(es)"


def training_flops(n_params: int, n_layer: int, d_model: int, piece_lengths: list[int]) -> float:
    """FLOPs of forward + backward over these pieces (packed dialogues).

    6 per parameter per token for the matrix multiplies (the tied lm_head counted once), plus causal
    attention: QK^T and AV cost 4*n^2*d per layer forward, halved by the causal mask, times 3 for
    forward + backward. Packing matters: attention cost follows each dialogue's own length.
    """
    tokens = sum(piece_lengths)
    attention = 6 * n_layer * d_model * sum(n * n for n in piece_lengths)
    return 6.0 * n_params * tokens + attention


def peak_memory_bytes() -> int:
    """Peak GPU memory when a GPU is used, else the process's peak resident memory."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Timers:
    """Wall-clock seconds spent per phase since the last `pop`."""

    def __init__(self) -> None:
        self.total: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.total[name] += time.perf_counter() - start

    def pop(self) -> dict[str, float]:
        out, self.total = dict(self.total), defaultdict(float)
        return out
