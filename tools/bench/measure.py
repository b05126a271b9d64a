"""Run a command and report its wall time, peak resident memory and peak anonymous memory.

Peak RSS is the kernel's high-water mark (VmHWM). Memory-mapped file pages count in RSS but can be
reclaimed, so anonymous memory (RssAnon, sampled every 10 ms) is reported too.
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from pathlib import Path


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


def _tree_rss_kb(pid: int) -> int:
    """Resident memory of a process and all its children together (worker pools count too)."""
    import psutil

    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss // 1024
        except psutil.Error:
            pass
    return total


def measure(cmd: list[str], tree: bool = False, stdout: Path | None = None, **kwargs) -> Measurement:
    """`tree`: the peak of the summed RSS of the process and its children (sampled), instead of the process's
    own high-water mark. `stdout`: where the command's output goes (default: nowhere)."""
    import tempfile

    start = time.perf_counter()
    out = stdout.open("w") if stdout else subprocess.DEVNULL
    errors = tempfile.TemporaryFile("w+")  # a file, not a pipe: a chatty command would fill a pipe and stall
    proc = subprocess.Popen(cmd, stdout=out, stderr=errors, text=True, **kwargs)
    hwm = anon = 0
    while proc.poll() is None:
        st = _status(proc.pid)
        hwm = max(hwm, _tree_rss_kb(proc.pid) if tree else st.get("VmHWM", 0))
        anon = max(anon, st.get("RssAnon", 0))
        time.sleep(0.01)
    wall = time.perf_counter() - start
    if stdout:
        out.close()
    errors.seek(0)
    said = errors.read()
    errors.close()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)[:300]} failed:\n{said[-3000:]}")
    return Measurement(wall, hwm / 1024**2, anon / 1024**2)
