"""tools/bench/long_row.py stays runnable: the peak memory of each process with sequence parallelism, at toy size."""

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.slow
def test_the_long_row_benchmark_reports_each_process_s_peak_at_toy_size(tmp_path):
    """Two 2-process ZeRO-3 launches of a 2-layer model, each row split over both processes, rows of 512 and 128
    tokens, with the tiled MLP and the checkpoint offloader on (loop/model/memory.py through the loop's own step):
    half a minute on 2 shared cores, so in the slow tier. Sequence parallelism 1 is the plain run, launched by
    many other tests."""
    proc = subprocess.run([sys.executable, "-m", "tools.bench.long_row", "--seq-len", "512", "--base-len", "128",
                           "--sp", "2",
                           "--repeats", "1", "--shape", "{hidden: 64, heads: 4, layers: 2, dropout: 0.0}",
                           "--checkpointing", "--tiled-mlp", "2", "--offload-checkpoints",
                           "--work", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=os.environ | {"PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    row = next(line for line in lines if line.startswith("2 ")).split()
    assert 0.1 < float(row[1]) < 8 and 0.1 < float(row[2]) < 8  # GB a process, at 512 and 128 tokens
    ranks = next(line for line in lines if line.startswith("sequence parallel 2: each rank"))
    assert len(ranks.split(": ")[-1].split(", ")) == 2  # each rank's own peak, not a sum
    assert "tiled MLP 2, checkpoints offloaded" in proc.stdout
    assert lines[-1].startswith("from: `python -m tools.bench.long_row") and "load average" in lines[-1]
