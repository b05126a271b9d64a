"""The accelerator's set-up: DeepSpeed's JIT-built CPU op is kept in this virtual environment and its build
is said, not a silent minute."""

import sys
from pathlib import Path

from loop.engine import accelerator


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
