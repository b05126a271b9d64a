"""Preference tuning's speed, side by side in one run: a DPO step of loop/train.py against an SFT step over the
same number of tokens, and against TRL's `DPOTrainer` on the same pairs and model.

One process, no DeepSpeed, float32 (on CPU; bf16 autocast where a GPU is), sdpa, the quickstart's tiny
model unless told otherwise, with its dropout off for every run (DPO trains without it). The SFT run trains
the corpus's dialogues packed into rows of --seq-len; the DPO run trains pairs made from the same dialogues
(tools/make_preference_pairs.py: the answer against its words reversed), whole pairs packed into rows of
the same length, so both steps hold the same rows of the same length (tokens a step are printed). TRL gets
the same pairs as text and a micro-batch of as many pairs as a loop micro-batch holds on average, with the
same accumulation; it runs with its default reference (a second model, run at every step) and with its
precomputed one. Ours are read from TensorBoard (first window left out); the reference pass, run once
before training, is timed apart.

  python -m tools.bench.dpo [--steps 20] [--repeat 2] [--micro-batch 4] [--accumulation 2] [--seq-len 512]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml
from transformers import AutoTokenizer

from loop.config import DpoSettings
from loop.data import pairs, preference, templates
from loop.data.dialogues import load_dialogues
from tools.bench import gpu_report

ROOT = Path(__file__).resolve().parents[2]


def loop_run(work: Path, name: str, a, env: dict, **sections) -> dict[str, float]:
    """loop/train.py on the workload; its windows' means and the reference pass's seconds."""
    cfg = {"model": {"name_or_path": a.model, "attn_implementation": "sdpa"},
           "data": {"seq_len": a.seq_len, "eval_fraction": 0.0, "cache_dir": str(work / "cache")},
           "training": {"max_steps": a.steps, "micro_batch_size": a.micro_batch, "lr": 1e-6,
                        "gradient_accumulation_steps": a.accumulation, "log_every": max(1, a.steps // 5)},
           "output": {"output_dir": str(work / name), "save": False}}
    for section, values in sections.items():
        cfg[section].update(values)
    (work / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    subprocess.run([sys.executable, str(ROOT / "loop" / "train.py"), str(work / f"{name}.yaml")], check=True,
                   cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out, log = gpu_report.windows(work / name), (work / name / "train.log").read_text()
    found = re.search(r"computed in ([\d.]+) s", log)
    full = float(re.search(r"rows of \d+ \(([\d.]+)% full\)", log).group(1)) / 100
    return out | {"reference_s": float(found.group(1)) if found else float("nan"),
                  "tokens_per_step": full * a.seq_len * a.micro_batch * a.accumulation}


def without_dropout(model: Path, copy: Path) -> str:
    """The model with its dropout rates set to 0 in its config: DPO trains without dropout (as TRL does), and
    SFT with the quickstart model's 0.3 would time dropout's masks, not the objective."""
    shutil.copytree(model, copy)
    config = json.loads((copy / "config.json").read_text())
    config |= {k: 0.0 for k, v in config.items() if ("dropout" in k or "pdrop" in k) and isinstance(v, float)}
    (copy / "config.json").write_text(json.dumps(config, indent=2))
    return str(copy)


def pairs_per_row(model: str, path: Path, seq_len: int) -> float:
    """How many pairs a row of the loop's DPO run holds, on average (TRL's micro-batch is that many rows' worth)."""
    tokenizer = AutoTokenizer.from_pretrained(model)
    templates.install(tokenizer, "starchat")
    made = [preference.recognise(json.loads(line)) for line in path.open()]
    ds = preference.tokenize(made, tokenizer, seq_len, DpoSettings(), "truncate")
    return len(made) / len(pairs.plan_rows([len(x) for x in ds["input_ids"]], seq_len, "bfd"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeat", type=int, default=2, help="rounds of all four runs; the best of each is reported")
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--accumulation", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--model", default=str(ROOT / "artifacts" / "tiny-starcoder"))
    p.add_argument("--data", default=str(ROOT / "artifacts" / "data" / "chatterbot.jsonl"))
    a = p.parse_args()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")} | {"PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        name, a.model = a.model, without_dropout(Path(a.model), work / "model")
        dialogues, _ = load_dialogues([a.data], "messages", "error")
        made = preference.from_dialogues({"all": dialogues})
        data = work / "pairs.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in made))
        batch = max(1, round(a.micro_batch * pairs_per_row(a.model, data, a.seq_len)))
        best: dict[str, float] = {}
        reference_s = float("nan")
        for r in range(a.repeat):  # interleaved, the best of each: the machine may be shared
            sft = loop_run(work, f"sft{r}", a, env, data={"train_files": [a.data]})
            dpo = loop_run(work, f"dpo{r}", a, env, data={"train_files": [str(data)]}, training={"objective": "dpo"})
            if r == 0:  # later rounds read the cache
                reference_s = dpo["reference_s"]
            found = {"loop/train.py SFT": sft["throughput/tokens_per_s"],
                     "loop/train.py DPO": dpo["throughput/tokens_per_s"]}
            for run, extra in (("TRL DPOTrainer (reference model)", []),
                               ("TRL DPOTrainer (precomputed)", ["--precompute"])):
                out = subprocess.run([sys.executable, "-m", "tools.bench.dpo_baseline", a.model, str(data),
                                      "--micro-batch", str(batch), "--accumulation", str(a.accumulation), "--steps",
                                      str(a.steps), "--warmup", str(max(1, a.steps // 5)), *extra],
                                     check=True, capture_output=True, text=True, cwd=ROOT, env=env)
                found[run] = json.loads(out.stdout.strip().splitlines()[-1])["tokens_per_s"]
            best = {k: max(v, best.get(k, 0.0)) for k, v in found.items()}
            print("  run " + str(r + 1) + ": " + ", ".join(f"{k} {v:,.0f}" for k, v in found.items()), flush=True)
    print(f"{name} (dropout off): {len(made)} pairs; rows of {a.seq_len} tokens, micro-batch {a.micro_batch} x "
          f"{a.accumulation} accumulation, {a.steps} steps, 1 process, no DeepSpeed; TRL micro-batch {batch} pairs")
    print(f"tokens a step: SFT {sft['tokens_per_step']:,.0f}, DPO {dpo['tokens_per_step']:,.0f} (rows' fill)")
    print(f"{'run (tokens/s, best of ' + str(a.repeat) + ')':34s} {'tokens/s':>10s} {'x SFT':>7s} {'x TRL':>7s}")
    trl = best["TRL DPOTrainer (reference model)"]
    for run, rate in best.items():
        print(f"{run:34s} {rate:10,.0f} {rate / best['loop/train.py SFT']:7.2f} {rate / trl:7.2f}")
    print(f"loop DPO x TRL (precomputed): {best['loop/train.py DPO'] / best['TRL DPOTrainer (precomputed)']:.2f}; "
          f"its reference pass took {reference_s:.1f} s once before training")


if __name__ == "__main__":
    main()
