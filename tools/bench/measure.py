"""Run a command and report its wall time, CPU-seconds and peak memory, its worker processes included.

Peak RSS is the kernel's high-water mark (VmHWM). Memory-mapped file pages count in RSS but can be
reclaimed, so anonymous memory (RssAnon, sampled every 10 ms) is reported too. With `tree`, memory is the
process and its children together, sampled: summed RSS counts a page shared by forked workers once per
worker, so the proportional set size (Pss of /proc/PID/smaps_rollup: each shared page split among its
sharers) is summed beside it, the honest figure for a pool of forked workers. CPU-seconds are the
process's and every child it waited for (RUSAGE_CHILDREN of this process, before and after).
"""

from __future__ import annotations

import resource
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Measurement:
    wall_s: float
    peak_rss_gb: float  # with `tree`: the peak of the summed RSS
    peak_anon_gb: float
    cpu_s: float = 0.0  # user + system, the process tree's
    peak_pss_gb: float = 0.0  # with `tree`: the peak of the summed proportional set size
    started: float = 0.0  # time.time() when the command was started


def _status(pid: int) -> dict[str, int]:
    try:
        with open(f"/proc/{pid}/status") as f:
            return {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in f) if v.strip().endswith("kB")}
    except (FileNotFoundError, ProcessLookupError, ValueError):
        return {}


def _pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return next((int(line.split()[1]) for line in f if line.startswith("Pss:")), 0)
    except (OSError, ValueError):
        return 0


def _tree_kb(pid: int, pss: bool) -> tuple[int, int]:
    """(summed RSS, summed PSS or 0) of a process and all its children (worker pools count too)."""
    import psutil

    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return 0, 0
    rss = 0
    for p in procs:
        try:
            rss += p.memory_info().rss // 1024
        except psutil.Error:
            pass
    return rss, sum(_pss_kb(p.pid) for p in procs) if pss else 0


def _children_cpu() -> float:
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    return used.ru_utime + used.ru_stime


def measure(cmd: list[str], tree: bool = False, stdout: Path | None = None, **kwargs) -> Measurement:
    """`tree`: memory as the peaks of the summed RSS and PSS of the process and its children (sampled; PSS
    every 50 ms, it costs the kernel a walk of each process's pages), instead of the process's own high-water
    mark. `stdout`: where the command's output goes (default: nowhere)."""
    import tempfile

    cpu_before, started = _children_cpu(), time.time()
    start = time.perf_counter()
    out = stdout.open("w") if stdout else subprocess.DEVNULL
    errors = tempfile.TemporaryFile("w+")  # a file, not a pipe: a chatty command would fill a pipe and stall
    proc = subprocess.Popen(cmd, stdout=out, stderr=errors, text=True, **kwargs)
    hwm = anon = pss = 0
    samples = 0
    while proc.poll() is None:
        st = _status(proc.pid)
        if tree:
            rss, tree_pss = _tree_kb(proc.pid, pss=samples % 5 == 0)
            hwm, pss = max(hwm, rss), max(pss, tree_pss)
        else:
            hwm = max(hwm, st.get("VmHWM", 0))
        anon = max(anon, st.get("RssAnon", 0))
        samples += 1
        time.sleep(0.01)
    wall = time.perf_counter() - start
    cpu = _children_cpu() - cpu_before
    if stdout:
        out.close()
    errors.seek(0)
    said = errors.read()
    errors.close()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)[:300]} failed:\n{said[-3000:]}")
    return Measurement(wall, hwm / 1024**2, anon / 1024**2, cpu, pss / 1024**2, started)
