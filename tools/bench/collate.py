"""Building batches on the host: the time to collate one micro-batch of 8 rows of 2048 tokens of the
shipped corpus (median of repeated runs, per layout), and the share of a training step that the loop
spends waiting for its data in a single-process run at that size.

  python -m tools.bench.collate [--steps 12]

Builds its own tiny GPTBigCode with a 2048-token context (the quickstart's has 1024) in a temporary
folder; the run is loop/train.py under `accelerate launch` with one ZeRO-3 process on CPU.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from loop.data import batches
from tools.bench import gpu_report, workload
from tools.builders import tiny

ROOT = Path(__file__).resolve().parents[2]


def median_ms(fn, repeat: int = 50) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=2048)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        tiny.build(work / "model", work / "data.jsonl", positions=a.seq_len)
        tokenizer, columns, rows = workload.load(work / "model", work / "data.jsonl", a.seq_len)
        chosen = rows[: a.micro_batch]
        pieces = sum(len(r) for r in chosen)
        print(f"one micro-batch: {a.micro_batch} rows x {a.seq_len} tokens, {pieces} dialogues, "
              f"{workload.real_tokens(chosen):,} tokens")
        for layout in ("mask", "varlen"):
            ms = median_ms(lambda: batches.collate(columns, chosen, tokenizer.pad_token_id, layout))  # noqa: B023
            print(f"  collate, {layout} layout: {ms:.2f} ms")
        segment = batches.collate(columns, chosen, tokenizer.pad_token_id, "mask")
        ms = median_ms(lambda: batches.to_device(segment, "cpu"), repeat=5)
        print(f"  block-diagonal mask from sequence ids on the CPU (done on the GPU when there is one): {ms:.1f} ms")

        env = os.environ | {"DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
        subprocess.run(
            [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
             str(ROOT / "accelerate_configs" / "cpu_zero3.yaml"), "--num_processes", "1",
             str(ROOT / "loop" / "train.py"), str(ROOT / "configs" / "quickstart.yaml"),
             "--name_or_path", str(work / "model"), "--train_files", f"[{work / 'data.jsonl'}]",
             "--seq_len", str(a.seq_len), "--micro_batch_size", str(a.micro_batch), "--gradient_accumulation_steps",
             "1", "--max_steps", str(a.steps), "--log_every", str(a.steps // 3), "--eval_fraction", "0",
             "--sample_prompts", "[]", "--save", "false", "--output_dir", str(work / "run")],
            check=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        s = gpu_report.windows(work / "run")
        step = sum(v for k, v in s.items() if k.startswith("time/"))
        print(f"single-process run ({a.steps} steps, first window left out): step {1000 * step:.0f} ms, waiting for "
              f"data {1000 * s['time/data']:.2f} ms = {s['time/data'] / step:.3%} of the step")


if __name__ == "__main__":
    main()
