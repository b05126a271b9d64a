"""The accelerator's set-up and ending: DeepSpeed's JIT-built CPU op is kept in this virtual environment and
its build is said, not a silent minute; a finished 2-process run never aborts at exit."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from loop.engine import accelerator
from tests.conftest import ROOT, free_port

EXIT_RUNS = int(os.environ.get("LOOP_EXIT_RUNS", "4"))  # the stress count; more for a longer search


def test_extensions_stay_in_this_environment_and_the_first_build_is_said(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    note = accelerator.extensions_of_this_environment()
    import os

    assert os.environ["TORCH_EXTENSIONS_DIR"] == str(Path(sys.prefix) / "torch_extensions")  # not ~/.cache
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert accelerator.extensions_of_this_environment() == (
        f"building DeepSpeed's CPU communication op once, about a minute (kept in {tmp_path})")
    (tmp_path / "deepspeed_shm_comm").mkdir()
    (tmp_path / "deepspeed_shm_comm" / "deepspeed_shm_comm.so").write_bytes(b"built")
    assert accelerator.extensions_of_this_environment() is None  # built once: nothing to say
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "false")
    (tmp_path / "deepspeed_shm_comm" / "deepspeed_shm_comm.so").unlink()
    assert accelerator.extensions_of_this_environment() is None  # no DeepSpeed, no op
    assert note is None or "building DeepSpeed's CPU communication op" in note


def test_deepspeed_starts_without_importing_mlflow_and_mlflow_still_loads_after():
    """DeepSpeed's autotuner imports mlflow eagerly (seconds of every process's start); the loop hides it for
    that one import, and a run reporting to mlflow can still import it afterwards."""
    code = ("import sys; from loop.engine import accelerator; accelerator.import_deepspeed_without_mlflow(); "
            "print('deepspeed' in sys.modules, 'mlflow' in sys.modules)")  # not even a None left to block it
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=os.environ | {"ACCELERATE_USE_DEEPSPEED": "true"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["True", "False"]


def test_many_short_two_process_runs_end_without_an_abort(tmp_path):
    """Issue 28.3: gloo threads outlived destroy_process_group and now and then raced exit()'s static destructors
    ("terminate called without an active exception", SIGABRT). Short ZeRO-3 runs of 2 processes, four launches
    at a time (the load of a full test run, where the abort was seen), each must exit 0 with its last line
    flushed. About 40 s on 2 cores; LOOP_EXIT_RUNS=40 for a stress search."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "accelerate_configs" / "cpu_zero3.yaml")]
    for first in range(0, EXIT_RUNS, 4):
        runs = [subprocess.Popen([*command, "--main_process_port", str(free_port()), "tests/engine/exit_probe.py",
                                  str(tmp_path / str(i))], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True) for i in range(first, min(first + 4, EXIT_RUNS))]
        for run in runs:
            out, _ = run.communicate(timeout=300)
            assert run.returncode == 0 and "terminate called" not in out, out[-3000:]
            assert "closed on rank 0" in out and "closed on rank 1" in out, out[-3000:]


def test_an_fsdp_launch_config_without_version_2_is_one_line_that_says_what_to_set():
    """accelerate's FSDP defaults to version 1, which the loop does not drive: a launch config's mistake (exit 2),
    not a traceback."""
    from types import SimpleNamespace

    from accelerate import DistributedType

    from loop.config import ConfigError
    from loop.engine import registry

    fsdp1 = SimpleNamespace(distributed_type=DistributedType.FSDP,
                            state=SimpleNamespace(deepspeed_plugin=None, fsdp_plugin=SimpleNamespace(fsdp_version=1)))
    with pytest.raises(ConfigError, match="FSDP needs fsdp_version: 2 in the accelerate config"):
        registry.choose(fsdp1)
