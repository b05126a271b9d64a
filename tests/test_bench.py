"""The GPU check script stays runnable: its --tiny mode runs every step at toy size on CPU."""

import os
import subprocess
import sys

from tests.conftest import ROOT


def test_gpu_check_runs_at_toy_size(tmp_path):
    proc = subprocess.run(["bash", "tools/bench/gpu_check.sh", "--tiny"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=os.environ | {"WORK": str(tmp_path), "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    row = next(line for line in lines if line.startswith("loop/train.py sdpa "))  # one choice at toy size
    tokens_per_s, *_, x_trainer, x_ceiling = row.split()[2:]
    assert float(tokens_per_s.replace(",", "")) > 0  # read back from the run's TensorBoard
    assert float(x_trainer) > 0 and float(x_ceiling) > 0  # both baselines ran and were compared
    for attn in ("sdpa", "sdpa_varlen"):  # the choices run, and the varlen reference
        assert f"{attn}: packed vs alone max |logit diff|" in proc.stdout
    assert any(line.startswith("HF Trainer + DeepSpeed ZeRO-3") for line in lines)
    profiled = lines[next(i for i, line in enumerate(lines) if line.startswith("profiled (3 steps)")) + 1:]
    for name in ("loop/train.py sdpa", "HF Trainer + DeepSpeed ZeRO-3", "ceiling"):  # each profiled after its run
        row = next(line for line in profiled if line.startswith(name)).removeprefix(name).split()
        step_ms, busy, operators = float(row[0]), row[1], float(row[2].replace(",", ""))
        assert step_ms > 0 and busy == "-" and operators > 100  # on CPU there is no device timeline
    assert "FAIL" not in proc.stdout
