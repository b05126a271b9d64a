"""A PyTorch profiler trace of a few optimizer steps, and what it says about them in numbers.

The loop's timers split a step into data, forward+backward and optimizer, but a step can also lose
time that no timer shows: Python hooks, kernel launches, host-device synchronisations, a device left
idle while the host catches up. The trace shows those gaps (open it in Perfetto or chrome://tracing);
the summary counts them per step: how busy the device was, how many operators, kernel launches and
synchronisations each step cost. Torch's profiler records; only the counting is ours.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.autograd.profiler_util import FunctionEvent

LAUNCHES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")
SYNCS = ("cudaDeviceSynchronize", "cudaStreamSynchronize", "cudaEventSynchronize")


def busy_us(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of (start, end) intervals: the time at least one kernel was running."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def summarize(events: list[FunctionEvent], first: int, recorded: int) -> dict:
    """Per-step figures from a profiler's events of the `recorded` steps from `first` (a run that ended
    inside the window leaves an empty step open after them).

    The host queues work ahead of the device, so a step's host span is not its length: the steps last
    from the first one's start on the host to whichever ends later, the last step on the host or the
    last of their device work. `host_ms` is the host's own share; the device was busy `device_busy` of
    the steps' length (its work on every stream, merged; not the profiler's own step ranges on it).
    """
    steps = sorted((e for e in events  # "ProfilerStep*" here, "#N" in traces; the device has copies of them
                    if e.name.startswith("ProfilerStep") and e.device_type == DeviceType.CPU),
                   key=lambda e: e.time_range.start)[:recorded]
    work = [(e.time_range.start, e.time_range.end) for e in events
            if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)
            and not e.name.startswith("ProfilerStep")]
    start = min((e.time_range.start for e in steps), default=0.0)
    host_end = max((e.time_range.end for e in steps), default=0.0)
    work = [(max(a, start), b) for a, b in work if b > start]  # an earlier step's work still running
    span_us = max([host_end] + [b for _, b in work]) - start or 1.0
    per_step = lambda n: n / max(1, len(steps))  # noqa: E731

    def count(kind: Callable[[str], bool]) -> int:
        """Host events of that kind inside the steps (not the profiler's own, such as its closing sync)."""
        return sum(kind(e.name) and start <= e.time_range.start < host_end for e in events)

    return {
        "first": first, "steps": len(steps),
        "step_ms": per_step(span_us / 1000),
        "host_ms": per_step(sum(e.time_range.elapsed_us() for e in steps) / 1000),
        "device_busy": busy_us(work) / span_us if work else None,
        "operators_per_step": per_step(count(lambda name: name.startswith("aten::"))),
        "launches_per_step": per_step(count(LAUNCHES.__contains__)),
        "syncs_per_step": per_step(count(SYNCS.__contains__)),
    }


def describe(s: dict) -> str:
    busy = f"device busy {s['device_busy']:.0%} of " if s["device_busy"] is not None else ""
    return (f"profiled steps {s['first']}-{s['first'] + s['steps'] - 1}: {busy}{s['step_ms']:.1f} ms a step "
            f"({s['host_ms']:.1f} ms on the host); per step "
            f"{s['operators_per_step']:,.0f} operators, {s['launches_per_step']:,.0f} kernel launches, "
            f"{s['syncs_per_step']:.0f} synchronisations")


@contextmanager
def profiled_steps(first: int, count: int, done: int, total: int, out: Path,
                   rank: int) -> Iterator[Callable[[int], None]]:
    """Yields `after_step(step)`, to call once each optimizer step is over (steps count from 1, as logged).

    Steps `first` .. `first + count - 1` are recorded after one warm-up step (the profiler's own start-up
    would otherwise land in the first); `first` 0 records nothing. `done` is the step the run starts
    from (a resumed run past `first` records nothing), `total` its last step. A run that ends inside
    the window (its last step, a preemption) writes what was recorded; one that fails drops it. Either
    way the profiler is stopped. Each process writes its own files, named by rank.
    """
    prof: torch.profiler.profile | None = None
    last, recorded = first + count - 1, 0
    if rank == 0 and first > total:
        logging.getLogger("loop").warning(f"training.profile_from {first} is after the last step ({total}): "
                                          "nothing is profiled")

    def write(p: torch.profiler.profile) -> None:
        summary = summarize(p.events(), first, recorded)
        if not summary["steps"]:  # the run ended in the warm-up step
            return
        out.mkdir(parents=True, exist_ok=True)
        p.export_chrome_trace(str(out / f"trace-rank{rank}.json.gz"))
        device = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        (out / f"operators-rank{rank}.txt").write_text(p.key_averages().table(sort_by=device, row_limit=30))
        (out / f"summary-rank{rank}.json").write_text(json.dumps(summary, indent=1) + "\n")
        if rank == 0:
            logging.getLogger("loop").info(f"{describe(summary)}; trace: {out}/trace-rank0.json.gz")

    def start_if_due(step: int) -> None:
        nonlocal prof
        if first > 0 and step == first - 2:  # the next step is the warm-up
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            prof = torch.profiler.profile(activities=activities, on_trace_ready=write,
                                          schedule=torch.profiler.schedule(wait=0, warmup=1, active=count, repeat=1))
            prof.start()

    def after_step(step: int) -> None:
        nonlocal prof, recorded
        if prof is not None:
            recorded += step >= first
            prof.step()  # after the last recorded step this hands the trace to write()
            if step == last:
                prof.stop()
                prof = None
        start_if_due(step)

    start_if_due(done)
    try:
        yield after_step
    except BaseException:
        if prof is not None:
            prof.on_trace_ready = None  # a failing run's recording is dropped, not written
            prof.stop()
        raise
    if prof is not None:
        prof.stop()  # the run ended inside the window: what was recorded is written
