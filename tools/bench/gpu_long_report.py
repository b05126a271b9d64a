"""The table gpu_long.sh ends with: per row length tried, the loop's tokens/s and peak GPU memory (its TensorBoard,
the first step left out) and the memory estimate for the same run (loop/model/estimate.py); the HF Trainer +
DeepSpeed at the longest length that fit, and the ratio.

  python -m tools.bench.gpu_long_report WORK --tried 32768 65536 131072 --longest 65536 --lora-rank 16 --tiled-mlp 8
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from loop.model import estimate
from tools.bench import gpu_report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("work", type=Path, help="gpu_long.sh's folder: model/, run-SEQ/, trainer-SEQ.json")
    p.add_argument("--tried", type=int, nargs="+", required=True, help="the row lengths tried, in order")
    p.add_argument("--longest", type=int, required=True, help="the longest that fit (0: none)")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--tiled-mlp", type=int, default=8)
    a = p.parse_args(argv)
    print(f"{'row tokens':>10s} {'fit':>5s} {'tokens/s':>10s} {'peak GB':>8s} {'estimate GB':>12s} {'x Trainer':>10s}")
    trainer = gpu_report.result(a.work / f"trainer-{a.longest}.json")
    for seq in a.tried:
        run = a.work / f"run-{seq}"
        rows = estimate.estimate(str(a.work / "model"), 1, 1, 1, seq, True, lora_rank=a.lora_rank,
                                 long=estimate.Long(1, True, a.tiled_mlp))
        if not (run / "tensorboard").is_dir() or seq > a.longest:
            print(f"{seq:10d} {'no':>5s} {'-':>10s} {'-':>8s} {rows[1]['gpu_gb']:12.1f}   (see run-{seq}.log)")
            continue
        s = gpu_report.windows(run)
        rate = s.get("throughput/tokens_per_s", float("nan"))
        versus = rate / trainer["tokens_per_s"] if seq == a.longest and trainer.get("tokens_per_s") else float("nan")
        print(f"{seq:10d} {'yes':>5s} {rate:10,.0f} {s.get('memory/peak_bytes', float('nan')) / 2**30:8.1f} "
              f"{rows[1]['gpu_gb']:12.1f} {versus:10.2f}")
    if a.longest:
        said = (f"{trainer['tokens_per_s']:,.0f} tokens/s, peak {trainer.get('peak_bytes', 0) / 2**30:.1f} GB"
                if trainer.get("tokens_per_s") else f"did not run to the end (out of memory?): trainer-{a.longest}.log")
        print(f"HF Trainer + DeepSpeed ZeRO-3 at {a.longest} tokens (gradient checkpointing, not offloaded): {said}")
    print("sequence parallelism over several GPUs: not measured (one GPU here); its speed-up is unmeasured")
    return 0


if __name__ == "__main__":
    sys.exit(main())
