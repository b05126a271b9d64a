"""Data preparation at scale: loop/data/prepare.py against TRL's SFTTrainer preparation of the same file.

Both read the same conversational JSONL (N dialogues made from the shipped corpus, each one distinct),
tokenize it with the same tokenizer and chat template, mark the assistant tokens and pack best-fit-
decreasing into 512-token rows, on every core of the machine (TRL: `dataset_num_proc`). Each side runs in
its own process, twice: with an empty cache (first run) and again (cached: what the next run's start
costs). Wall time and the peak memory of the process and its workers together are printed side by side,
with the ratios TRL / ours.

  python -m tools.bench.data_prep --dialogues 100000 1000000 [--work /tmp/bench-data] [--sides ours trl]

TRL is installed for the benchmarks only (`pip install -e '.[bench]'`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from tools.bench.measure import measure

ROOT = Path(__file__).resolve().parents[2]

OURS = """
import sys, time
from transformers import AutoTokenizer
from loop import config
from loop.data import templates
from loop.data.prepare import open_prepared, prepare
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1]); templates.install(tokenizer, "starchat")
cfg = config.from_dict({"data": {"train_files": [sys.argv[2]], "cache_dir": sys.argv[3], "seq_len": 512,
                                 "eval_fraction": 0}})
start = time.perf_counter()
data = open_prepared(prepare(cfg.data, tokenizer), cfg.data, cfg.training.seed)
print("rows", len(data.train_rows), "efficiency", round(data.train_rows.efficiency(512), 4), "data_s",
      round(time.perf_counter() - start, 2))
"""

TRL = """
import os, sys, tempfile
from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer
from loop.data import templates
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1]); templates.install(tokenizer, "starchat")
dataset = load_dataset("json", data_files=sys.argv[2], split="train", cache_dir=sys.argv[3])
args = SFTConfig(output_dir=tempfile.mkdtemp(), packing=True, packing_strategy="bfd", max_length=512,
                 assistant_only_loss=True, dataset_num_proc=len(os.sched_getaffinity(0)), report_to=[], use_cpu=True)
trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(sys.argv[1]), args=args, train_dataset=dataset,
                     processing_class=tokenizer)
rows = trainer.train_dataset
print("rows", len(rows), "efficiency", round(sum(map(len, rows["input_ids"])) / (len(rows) * 512), 4))
"""


def corpus(work: Path, n: int) -> Path:
    """N distinct dialogues in the messages schema, from the shipped corpus (each question numbered)."""
    path = work / f"dialogues-{n}.jsonl"
    if path.is_file():
        return path
    base = [json.loads(line)["messages"] for line in (ROOT / "artifacts" / "data" / "chatterbot.jsonl").open()]
    with path.open("w") as f:
        for i in range(n):
            d = [dict(m) for m in base[i % len(base)]]
            d[0]["content"] = f"{d[0]['content']} (#{i})"
            f.write(json.dumps({"messages": d}) + "\n")
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dialogues", type=int, nargs="+", default=[100_000])
    p.add_argument("--work", type=Path, default=Path("/tmp/bench-data"))
    p.add_argument("--model", default=str(ROOT / "artifacts" / "tiny-starcoder"))
    p.add_argument("--sides", nargs="+", choices=["ours", "trl"], default=["ours", "trl"])
    a = p.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    print(f"{'dialogues':>10s} {'side':6s} {'run':7s} {'wall s':>8s} {'peak GB':>8s} {'rows':>8s} {'full':>7s} "
          f"{'data s':>7s}  (wall: the whole process, imports included; data s: ours without them)")
    results = {}
    for n in a.dialogues:
        data = corpus(a.work, n)
        for side in a.sides:
            cache = a.work / f"cache-{side}-{n}"
            shutil.rmtree(cache, ignore_errors=True)
            for run in ("first", "cached"):
                code = OURS if side == "ours" else TRL
                out = a.work / f"{side}-{n}-{run}.out"
                m = measure([sys.executable, "-c", code, a.model, str(data), str(cache)], cwd=ROOT, env=env,
                            tree=True, stdout=out)
                said = [line.split() for line in out.read_text().splitlines() if line.startswith("rows ")]
                rows, full, data_s = (said[-1][1], said[-1][3], said[-1][5] if len(said[-1]) > 5 else "-") \
                    if said else ("?", "?", "?")
                results[(n, side, run)] = m
                print(f"{n:10,d} {side:6s} {run:7s} {m.wall_s:8.1f} {m.peak_rss_gb:8.2f} {rows:>8s} {full:>7s} "
                      f"{data_s:>7s}", flush=True)
        if set(a.sides) == {"ours", "trl"}:
            for run in ("first", "cached"):
                ours, trl = results[(n, "ours", run)], results[(n, "trl", run)]
                print(f"{n:10,d} TRL / ours, {run}: wall {trl.wall_s / ours.wall_s:.2f}x, "
                      f"peak memory {trl.peak_rss_gb / ours.peak_rss_gb:.2f}x")


if __name__ == "__main__":
    main()
