"""Run a command and report its wall time, peak resident memory and peak anonymous memory.

Peak RSS is the kernel's high-water mark (VmHWM). Memory-mapped file pages count in RSS but can be
reclaimed, so anonymous memory (RssAnon, sampled every 10 ms) is reported too.
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass


@dataclass
class Measurement:
    wall_s: float
    peak_rss_gb: float
    peak_anon_gb: float


def _status(pid: int) -> dict[str, int]:
    try:
        with open(f"/proc/{pid}/status") as f:
            return {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in f) if v.strip().endswith("kB")}
    except (FileNotFoundError, ProcessLookupError, ValueError):
        return {}


def measure(cmd: list[str], **kwargs) -> Measurement:
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **kwargs)
    hwm = anon = 0
    while proc.poll() is None:
        st = _status(proc.pid)
        hwm, anon = max(hwm, st.get("VmHWM", 0)), max(anon, st.get("RssAnon", 0))
        time.sleep(0.01)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr.read()[-3000:]}")
    return Measurement(wall, hwm / 1024**2, anon / 1024**2)
