"""Training step on CPU: loop/train.py against a Hugging Face `Trainer`, one process, fp32, interleaved repeats.

Both train the same tiny GPTBigCode (the quickstart's shape unless --shape says otherwise, built here) on
the same packed rows of a corpus built here (tools/bench/corpus.py: multi-turn dialogues with long answers,
half with code; or the shipped chatterbot dialogues), with the same micro-batch and accumulation; the
Trainer through tools/bench/trainer_baseline.py: the loop's rows in the loop's order (so both train the
same micro-batches), its collate function, block-diagonal masks, sdpa; the loop with its own default
attention (on CPU, SDPA per dialogue: the same loss, each dialogue's block computed instead of the whole
masked row). Each repeat runs both sides, one after the other, the order swapped every repeat, so load on
a shared machine falls on both.

Every figure is the steady state (the loop's logging windows after the first, the Trainer's steps after
the same warm-up): real tokens a second (both count the tokens of the rows they were handed, and the
trained tokens, so neither can skip work), wall and CPU-seconds a step, and for the loop the step's split
(data wait, forward+backward, optimizer, and the rest: the loop's own bookkeeping, logging and checks).
Prints the median and the spread of the repeats, and the command, commit, machine load and date the
figures come from. On a GPU use tools/bench/gpu_check.sh instead.

  python -m tools.bench.train_step [--repeats 3] [--steps 16] [--corpus realistic] [--shape quickstart]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from tools.bench import corpus, gpu_report, provenance

ROOT = Path(__file__).resolve().parents[2]
# The quickstart's model (tools/make_tiny_model.py's defaults), and the narrower one without dropout that the
# benchmark used until 2026-11-27 (the model behind its 1.25x figure).
SHAPES = {"quickstart": {"hidden": 384, "heads": 6, "layers": 4, "dropout": 0.3},
          "narrow": {"hidden": 128, "heads": 4, "layers": 4, "dropout": 0.0}}
SPLIT = (("data", "data"), ("forward_backward", "fwd+bwd"), ("optimizer", "optimizer"))


def ours(a, work: Path, model: Path, data: Path, run: int, env: dict) -> dict[str, float]:
    out = work / f"ours-{run}"
    cfg = {"model": {"name_or_path": str(model), "attn_implementation": a.attention},
           "data": {"train_files": [str(data)], "seq_len": a.seq_len, "eval_fraction": 0.0,
                    "cache_dir": str(work / "cache")},
           "training": {"max_steps": a.steps, "micro_batch_size": a.micro_batch, "lr": 1e-3,
                        "gradient_accumulation_steps": a.accumulation, "log_every": a.warmup},
           "output": {"output_dir": str(out), "save": False, "overwrite_output_dir": True}}
    (work / "ours.yaml").write_text(yaml.safe_dump(cfg))
    subprocess.run([sys.executable, str(ROOT / "loop" / "train.py"), str(work / "ours.yaml")], check=True, cwd=ROOT,
                   env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    w = gpu_report.windows(out)
    got = {"tokens_per_s": w["throughput/tokens_per_s"], "trained_tokens_per_s": w["throughput/trained_tokens_per_s"],
           "s_per_step": w["time/step"], "cpu_s_per_step": w["time/process_cpu"]}
    got |= {key: w.get(f"time/{key}", 0.0) for key, _ in SPLIT}
    got["rest"] = got["s_per_step"] - sum(got[key] for key, _ in SPLIT)
    return got


def trainer(a, model: Path, data: Path, env: dict) -> dict[str, float]:
    done = subprocess.run([sys.executable, "-m", "tools.bench.trainer_baseline", str(model), str(data), "--seq-len",
                           str(a.seq_len), "--micro-batch", str(a.micro_batch), "--accumulation", str(a.accumulation),
                           "--steps", str(a.steps), "--warmup", str(a.warmup), "--in-order"],
                          check=True, capture_output=True, text=True, cwd=ROOT, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


def resolved(a) -> str:
    from loop.model import attention

    return attention.resolve(a.attention, SHAPES[a.shape]["dropout"])[0]


def spread(values: list[float], form: str) -> str:
    """The median, and the lowest and highest repeat."""
    return f"{format(statistics.median(values), form)} ({format(min(values), form)}-{format(max(values), form)})"


def report(a, runs: dict[str, list[dict]]) -> None:
    mine, base = runs["ours"], runs["trainer"]
    ratios = [o["tokens_per_s"] / t["tokens_per_s"] for o, t in zip(mine, base)]
    cpu = [t["cpu_s_per_step"] / o["cpu_s_per_step"] for o, t in zip(mine, base)]
    print(f"{'run':16s} {'tokens/s':>24s} {'trained tokens/s':>24s} {'s a step':>20s} {'CPU-s a step':>20s} "
          f"{'x Trainer':>20s} {'x Trainer, CPU-s':>20s}")
    for name, rows, mine_x, cpu_x in (("HF Trainer", base, [1.0], [1.0]), ("loop/train.py", mine, ratios, cpu)):
        print(f"{name:16s} {spread([r['tokens_per_s'] for r in rows], ',.0f'):>24s} "
              f"{spread([r['trained_tokens_per_s'] for r in rows], ',.0f'):>24s} "
              f"{spread([r['s_per_step'] for r in rows], '.3f'):>20s} "
              f"{spread([r['cpu_s_per_step'] for r in rows], '.3f'):>20s} "
              f"{spread(mine_x, '.2f'):>20s} {spread(cpu_x, '.2f'):>20s}")
    print("repeats, x Trainer (tokens/s, in run order): " + ", ".join(f"{r:.2f}" for r in ratios))
    print("where the loop's step goes, ms (median of the repeats): " + ", ".join(
        f"{label} {1000 * statistics.median(r[key] for r in mine):.1f}" for key, label in (*SPLIT, ("rest", "rest")))
        + f", of {1000 * statistics.median(r['s_per_step'] for r in mine):.1f}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=16, help="optimizer steps a run (a multiple of --warmup)")
    p.add_argument("--warmup", type=int, default=4, help="steps left out (the loop's first logging window)")
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--accumulation", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--corpus", choices=("realistic", "chatterbot"), default="realistic")
    p.add_argument("--dialogues", type=int, default=400, help="dialogues of the realistic corpus")
    p.add_argument("--shape", choices=sorted(SHAPES), default="quickstart")
    p.add_argument("--attention", default="auto", help="the loop's model.attn_implementation (default: its own "
                   "default, which on CPU is SDPA per dialogue); the Trainer keeps SDPA with block masks")
    p.add_argument("--work", type=Path, help="keep the model, data and runs here (default: a temporary folder)")
    a = p.parse_args(argv)
    from tools.builders import tiny

    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")} | {"PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryDirectory() as tmp:
        work = a.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        model, chat = work / "model", work / "chatterbot.jsonl"
        tiny.build(model, chat, positions=max(1024, a.seq_len), **SHAPES[a.shape])
        data = corpus.build(chat, work / "realistic.jsonl", a.dialogues) if a.corpus == "realistic" else chat
        said = provenance.Said.start()
        runs: dict[str, list[dict]] = {"ours": [], "trainer": []}
        for run in range(a.repeats):
            for side in ("ours", "trainer") if run % 2 == 0 else ("trainer", "ours"):
                got = ours(a, work, model, data, run, env) if side == "ours" else trainer(a, model, data, env)
                runs[side].append(got)
    print(f"tiny GPTBigCode ({a.shape}: {SHAPES[a.shape]}), {a.corpus} corpus, {a.seq_len}-token packed rows, "
          f"micro-batch {a.micro_batch} x {a.accumulation} accumulation, {a.steps} steps (first {a.warmup} left "
          f"out), 1 CPU process, fp32; the loop's attention {resolved(a)}, the Trainer's SDPA with block "
          f"masks; {a.repeats} repeats, sides alternating")
    report(a, runs)
    print(said.line())


if __name__ == "__main__":
    main()
