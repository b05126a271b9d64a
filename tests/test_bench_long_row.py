"""tools/bench/long_row.py stays runnable: the peak memory of each process, with sequence parallelism 1 and 2 side
by side (2 skipped with a line on a checkout without the setting), at toy size."""

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tools.bench import long_row


@pytest.mark.slow
def test_the_long_row_benchmark_reports_each_process_s_peak_at_toy_size(tmp_path):
    """Two (four with sequence parallelism) 2-process ZeRO-3 launches of a 2-layer model, rows of 512 and 128
    tokens, with the tiled MLP and the checkpoint offloader on (loop/model/memory.py through the loop's own step):
    about a minute on 2 shared cores, so in the slow tier."""
    proc = subprocess.run([sys.executable, "-m", "tools.bench.long_row", "--seq-len", "512", "--base-len", "128",
                           "--repeats", "1", "--shape", "{hidden: 64, heads: 4, layers: 2, dropout: 0.0}",
                           "--checkpointing", "--tiled-mlp", "2", "--offload-checkpoints",
                           "--work", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=os.environ | {"PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    sides = [1, 2] if long_row.sequence_parallel_known() else [1]
    for sp in sides:
        row = next(line for line in lines if line.startswith(f"{sp} ")).split()
        assert 0.1 < float(row[1]) < 8 and 0.1 < float(row[2]) < 8  # GB a process, at 512 and 128 tokens
        ranks = next(line for line in lines if line.startswith(f"sequence parallel {sp}: each rank"))
        assert len(ranks.split(": ")[-1].split(", ")) == 2  # each rank's own peak, not a sum
    if sides == [1]:
        assert any("sequence parallel 2: skipped, parallelism.sequence_parallel_size is not a setting" in line
                   for line in lines)
    assert "tiled MLP 2, checkpoints offloaded" in proc.stdout
    assert lines[-1].startswith("from: `python -m tools.bench.long_row") and "load average" in lines[-1]
