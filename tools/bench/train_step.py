"""Training step on CPU: loop/train.py against a Hugging Face `Trainer`, one process, fp32.

Both train the quickstart's tiny model on the same packed 512-token rows with the same micro-batch
and accumulation (the Trainer through tools/bench/trainer_baseline.py: the loop's rows and collate
function, block-diagonal masks, sdpa). Ours is read from its TensorBoard (first window left out),
the Trainer's from the tokens its collator hands out after the same warm-up. On a GPU use
tools/bench/gpu_check.sh instead: a CPU forward pass is slow enough to hide what costs time there.

  python -m tools.bench.train_step [--steps 40] [--micro-batch 4] [--accumulation 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from tools.bench import gpu_report

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--accumulation", type=int, default=2)
    p.add_argument("--model", default=str(ROOT / "artifacts" / "tiny-starcoder"))
    p.add_argument("--data", default=str(ROOT / "artifacts" / "data" / "chatterbot.jsonl"))
    a = p.parse_args()
    warmup = a.steps // 4
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")} | {"PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryDirectory() as work:
        cfg = {"model": {"name_or_path": a.model, "attn_implementation": "sdpa"},
               "data": {"train_files": [a.data], "seq_len": 512, "eval_fraction": 0.0},
               "training": {"max_steps": a.steps, "micro_batch_size": a.micro_batch, "lr": 1e-3,
                            "gradient_accumulation_steps": a.accumulation, "log_every": warmup},
               "output": {"output_dir": f"{work}/ours", "save": False}}
        Path(work, "ours.yaml").write_text(yaml.safe_dump(cfg))
        subprocess.run([sys.executable, str(ROOT / "loop" / "train.py"), f"{work}/ours.yaml"], check=True, cwd=ROOT,
                       env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        ours = gpu_report.windows(Path(work, "ours"))["throughput/tokens_per_s"]
    out = subprocess.run([sys.executable, "-m", "tools.bench.trainer_baseline", a.model, a.data, "--seq-len", "512",
                          "--micro-batch", str(a.micro_batch), "--accumulation", str(a.accumulation),
                          "--steps", str(a.steps), "--warmup", str(warmup)],
                         check=True, capture_output=True, text=True, cwd=ROOT, env=env)
    trainer = json.loads(out.stdout.strip().splitlines()[-1])["tokens_per_s"]
    print(f"tiny GPTBigCode, 512-token packed rows, micro-batch {a.micro_batch} x {a.accumulation} accumulation, "
          f"{a.steps} steps (first {warmup} are warm-up), 1 CPU process, fp32, sdpa with block masks")
    print(f"{'run':28s} {'tokens/s':>10s} {'ratio':>7s}")
    print(f"{'HF Trainer':28s} {trainer:10,.0f} {1.0:7.2f}")
    print(f"{'loop/train.py':28s} {ours:10,.0f} {ours / trainer:7.2f}")


if __name__ == "__main__":
    main()
