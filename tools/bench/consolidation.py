"""Consolidation benchmark: tools/consolidate_checkpoint.py against DeepSpeed's zero_to_fp32.py.

Builds a GPTBigCode of ~300M parameters (random weights), trains it one step with 2-process ZeRO-3
on CPU to get a real checkpoint, then consolidates that checkpoint with both tools, one after the
other, and prints wall time, peak RSS and peak anonymous memory, with ratios (ours / DeepSpeed's).

  python -m tools.bench.consolidation [--work /tmp/bench-consolidation] [--n-layer 24 --n-embd 1024]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from loop.state import checkpoints
from tools.bench.measure import measure
from tools.builders import tiny

ROOT = Path(__file__).resolve().parents[2]


def make_checkpoint(work: Path, n_layer: int, n_embd: int) -> Path:
    run = work / "run"
    found = checkpoints.complete_checkpoints(run / "checkpoints")
    if found:
        return found[-1]
    tiny.build(work / "model", work / "data.jsonl", hidden=n_embd, layers=n_layer, heads=16)
    cfg = {"model": {"name_or_path": str(work / "model")},
           "data": {"train_files": [str(work / "data.jsonl")], "seq_len": 64, "eval_fraction": 0.0},
           "training": {"max_steps": 1, "micro_batch_size": 1, "save_every": 1, "log_every": 1},
           "output": {"output_dir": str(run)}}
    (work / "run.yaml").write_text(yaml.safe_dump(cfg))
    subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                    str(ROOT / "accelerate_configs" / "cpu_zero3.yaml"), str(ROOT / "loop" / "train.py"),
                    str(work / "run.yaml")], check=True, cwd=ROOT, env=os.environ | {"DS_ACCELERATOR": "cpu"})
    return checkpoints.complete_checkpoints(run / "checkpoints")[-1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("/tmp/bench-consolidation"))
    p.add_argument("--n-layer", type=int, default=24)
    p.add_argument("--n-embd", type=int, default=1024)
    a = p.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    ckpt = make_checkpoint(a.work, a.n_layer, a.n_embd)
    size = sum(f.stat().st_size for f in ckpt.rglob("*.pt")) / 1024**3
    runs = {
        "deepspeed zero_to_fp32 (fp32, pickle, 5GB shards)":
            [sys.executable, str(ckpt / "zero_to_fp32.py"), str(ckpt), str(a.work / "out-ds")],
        "ours --dtype fp32 (safetensors, 5GB shards)":
            [sys.executable, str(ROOT / "tools" / "consolidate_checkpoint.py"), str(ckpt), str(a.work / "out-fp32"),
             "--dtype", "fp32"],
        "ours default (bf16)":
            [sys.executable, str(ROOT / "tools" / "consolidate_checkpoint.py"), str(ckpt), str(a.work / "out-bf16")],
        "ours --dtype fp32 --max-shard-size 200MB":
            [sys.executable, str(ROOT / "tools" / "consolidate_checkpoint.py"), str(ckpt), str(a.work / "out-200"),
             "--dtype", "fp32", "--max-shard-size", "200MB"],
    }
    results = {}
    for name, cmd in runs.items():
        shutil.rmtree(cmd[3] if "zero_to_fp32" in cmd[1] else cmd[3], ignore_errors=True)
        results[name] = measure(cmd, cwd=ROOT)
    base = next(iter(results.values()))
    print(f"checkpoint: {ckpt} ({size:.2f} GiB of .pt files, 2 ranks)")
    print(f"{'run':50s} {'wall s':>7s} {'peak RSS GB':>12s} {'peak anon GB':>13s} {'wall x':>7s} {'RSS x':>6s}")
    for name, m in results.items():
        print(f"{name:50s} {m.wall_s:7.1f} {m.peak_rss_gb:12.2f} {m.peak_anon_gb:13.2f} "
              f"{m.wall_s / base.wall_s:7.2f} {m.peak_rss_gb / base.peak_rss_gb:6.2f}")


if __name__ == "__main__":
    main()
