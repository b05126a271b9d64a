"""The profiler records exactly the asked steps, writes a trace and per-step figures, and never stays on."""

import gzip
import json

import pytest
import torch
from torch.autograd import DeviceType
from torch.autograd.profiler_util import FunctionEvent

from loop.report import profiling


def train(steps: int, after_step, fail_at: int | None = None) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 1))
    opt = torch.optim.AdamW(model.parameters())
    for step in range(1, steps + 1):
        if step == fail_at:
            raise RuntimeError("boom")
        model(torch.randn(8, 16)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        after_step(step)


def test_records_the_asked_steps_only(tmp_path):
    with profiling.profiled_steps(4, 2, 0, 8, tmp_path, rank=0) as after_step:
        train(8, after_step)
    trace = json.loads(gzip.decompress((tmp_path / "trace-rank0.json.gz").read_bytes()))
    steps = {e["name"] for e in trace["traceEvents"] if e.get("name", "").startswith("ProfilerStep#")}
    assert len(steps) == 2  # the warm-up step (3) and the steps after 5 are not in it
    summary = json.loads((tmp_path / "summary-rank0.json").read_text())
    assert summary["first"] == 4 and summary["steps"] == 2 and summary["step_ms"] >= summary["host_ms"] > 0.01
    # Each step runs the same operators: two linears forward and backward, the loss, AdamW.
    assert summary["operators_per_step"] > 20
    assert summary["device_busy"] is None and summary["launches_per_step"] == 0  # CPU: no device timeline
    assert "aten::addmm" in (tmp_path / "operators-rank0.txt").read_text()
    assert "profiled steps 4-5" in profiling.describe(summary)


def test_resumed_past_the_window_or_off_records_nothing(tmp_path, caplog):
    for first, done in ((3, 5), (0, 0), (20, 0)):
        with profiling.profiled_steps(first, 2, done, done + 4, tmp_path, rank=0) as after_step:
            train(4, lambda step, f=after_step, d=done: f(step + d))
    assert not tmp_path.exists() or not any(tmp_path.iterdir())
    assert "profile_from 20 is after the last step (4): nothing is profiled" in caplog.text


def test_a_run_that_ends_inside_the_window_writes_what_was_recorded(tmp_path):
    with profiling.profiled_steps(3, 5, 0, 4, tmp_path, rank=0) as after_step:  # the run stops after step 4
        train(4, after_step)
    summary = json.loads((tmp_path / "summary-rank0.json").read_text())
    assert (summary["first"], summary["steps"]) == (3, 2)


def test_a_failing_run_stops_the_profiler(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with profiling.profiled_steps(2, 3, 0, 6, tmp_path, rank=0) as after_step:
            train(6, after_step, fail_at=3)
    assert not torch._C._autograd._profiler_enabled()  # nothing keeps recording after the failure
    assert not (tmp_path / "trace-rank0.json.gz").exists()  # an unfinished recording is not written
    with profiling.profiled_steps(2, 1, 0, 3, tmp_path, rank=1) as after_step:  # a new profiler can start
        train(3, after_step)
    assert (tmp_path / "summary-rank1.json").is_file()


def test_every_process_of_a_zero3_run_writes_its_profile(trained_run):
    """tests/conftest.py's 2-process ZeRO-3 run asks for steps 10-11."""
    for rank in (0, 1):
        summary = json.loads((trained_run / "profile" / f"summary-rank{rank}.json").read_text())
        assert (summary["first"], summary["steps"]) == (10, 2)
        assert summary["operators_per_step"] > 1000  # a forward, a backward and DeepSpeed's step
    assert "profiled steps 10-11" in (trained_run / "train.log").read_text()


def test_device_busy_is_the_union_of_kernel_intervals():
    assert profiling.busy_us([(0, 10), (5, 15), (20, 25), (21, 22)]) == 20
    assert profiling.busy_us([]) == 0


def test_a_step_lasts_until_its_device_work_ends():
    """The host queues work ahead: two steps that take 100 us each on the host and whose last kernel ends
    at 350 us last 350 us, the device busy 260 of them (10 with the warm-up step's last kernel). The
    profiler's copies of the step ranges on the device (what GPU traces show as "ProfilerStep#N" on a
    stream) are neither steps nor work, and its synchronisation when it stops is not the steps'."""
    def event(name, start, end, device=DeviceType.CPU, annotation=False):
        return FunctionEvent(id=0, name=name, thread=0, start_us=start, end_us=end, device_type=device,
                             is_user_annotation=annotation)

    cuda = DeviceType.CUDA
    events = [event("ProfilerStep#1", 0, 100), event("ProfilerStep#2", 100, 200),
              event("ProfilerStep#1", 60, 200, cuda, annotation=True), event("ProfilerStep#2", 200, 350, cuda, True),
              event("ProfilerStep#2", 349, 350, cuda, True),
              event("gemm", -20, 10, cuda),  # the warm-up step's, still running: only 10 us of it count
              event("gemm", 50, 150, cuda), event("gemm", 140, 200, cuda), event("adam", 250, 350, cuda),
              event("cudaLaunchKernel", 10, 11), event("cudaStreamSynchronize", 180, 240),
              event("cudaDeviceSynchronize", 240, 350),  # the profiler's own, when it stops
              event("aten::mm", 20, 30), event("aten::copy_", 260, 270)]  # the second as it stops, too
    summary = profiling.summarize(events, first=5, recorded=2)
    assert (summary["step_ms"], summary["host_ms"]) == (0.175, 0.1)
    assert summary["device_busy"] == pytest.approx((10 + 150 + 100) / 350)
    assert (summary["operators_per_step"], summary["launches_per_step"], summary["syncs_per_step"]) == (0.5, 0.5, 0.5)
