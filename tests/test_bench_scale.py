"""gpu_scale.sh stays runnable: --tiny runs its parts at toy width on CPU, and its budget leaves out what it
cannot hold."""

import os
import subprocess
import sys

from tests.conftest import ROOT
from tools.bench import scale

# lora is qlora's path without --lora.quantize, fsdp2 is full's under another launch config (gpu_check --tiny runs
# the loop under FSDP2): both left to the dry run, which checks their commands.
TINY_PARTS = ("full", "dpo", "qlora", "moe")


def test_gpu_scale_runs_every_part_at_toy_size(tmp_path):
    """gpu_scale.sh --tiny: every path of the GPU run (StarCoder2-3B full and DPO, the 7B QLoRA on bitsandbytes'
    CPU 4-bit path, Qwen3-Coder-30B-A3B LoRA), each against its baseline, in the published architectures at toy
    width. The 7B LoRA and 3B FSDP2 parts are left to the dry run (TINY_PARTS says why).
    About 3-4 minutes on 2 shared cores, the most of this file: 8 launches (accelerate, DeepSpeed's or the
    Trainer's set-up each time) and three models with their tokenizers, which no other test's runs can stand in for
    (other shapes, other baselines); each run is 6 steps, the fewest that leave two logging windows after the
    first."""
    proc = subprocess.run(["bash", "tools/bench/gpu_scale.sh", "--tiny"], cwd=ROOT, capture_output=True, text=True,
                          timeout=1200, env=os.environ | {"WORK": str(tmp_path), "PYTHON": sys.executable,
                                                         "PARTS": " ".join(TINY_PARTS)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    parts = [scale.PARTS[key] for key in TINY_PARTS]
    for part in parts:
        for run in ("loop/train.py", part.baseline):
            row = next(line for line in lines if line.startswith(f"{part.name}: {run} "))
            tokens_per_s, _, _, _, fwd_bwd, _, _, _, _, loss, _ = row.split()[-11:]  # the columns after the batch
            assert float(tokens_per_s.replace(",", "")) > 0, row  # read back from the run
            assert loss == "falls", row  # the first logged window's loss above the last's
            if run == "loop/train.py":
                assert float(fwd_bwd) > 0, row  # the step's time split, from the loop's timers
        memory = next(line for line in lines if line.startswith(f"  {part.title} ") and "estimate" in line)
        assert float(memory.split("estimate")[1].split()[0]) > 0 and "measured" in memory
    assert not any(line.startswith(f"{scale.PARTS['lora'].name}: ") for line in lines)  # only what was asked
    goals = [line for line in lines if line.startswith("  goal: ")]
    assert len(goals) == len(parts) + 1  # each part against its baseline, and DPO against SFT
    assert all(line.endswith(("x PASS", "x FAIL")) for line in goals)
    assert all(float(line.rsplit(": ", 1)[1].split("x")[0]) > 0 for line in goals)  # every ratio measured
    falls = [line for line in lines if line.startswith("  loss falls: ")]
    assert len(falls) == 2 * len(parts) and all(line.endswith("PASS") for line in falls)


def test_gpu_scale_leaves_out_what_its_budget_cannot_hold(tmp_path):
    """On the GPU a call keeps to its device-time budget: a part that would start with too little of it left is
    not started, and the call names it with the command that runs it on the same machine (nothing is launched
    here: no time is left from the start)."""
    proc = subprocess.run(["bash", "tools/bench/gpu_scale.sh", "--tiny"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=os.environ | {"WORK": str(tmp_path), "PYTHON": sys.executable,
                                                         "BUDGET_S": "0", "PARTS": "full lora"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert [line.split("] ", 1)[1].split(":")[0] for line in proc.stdout.splitlines() if "] skipped " in line] == \
        ["skipped full", "skipped lora"]
    assert proc.stdout.splitlines()[-2].endswith('REUSE=1 PARTS="full lora" bash tools/bench/gpu_scale.sh')
    assert not (tmp_path / "run-full.log").exists() and not (tmp_path / "sc2-3b").exists()
