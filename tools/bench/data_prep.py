"""Data preparation as a user meets it: loop/train.py against TRL's SFTTrainer, process start to the first step.

The corpus is built here, deterministically (tools/bench/corpus.py): N dialogues of 2-6 messages, answers of
100-600 words, half with code, a fifth using a tool (a `tools` list, the call and its result); about 1,400
tokens a dialogue with the tiny tokenizer (the measured mean is printed). Both sides read the same JSONL with
the tiny model's tokenizer and StarChat template, train only the assistant's tokens and pack best-fit-
decreasing into 4,096-token rows on every core (TRL: `packing=True, packing_strategy="bfd",
assistant_only_loss=True, dataset_num_proc=` the cores), then start training the tiny model
(artifacts/tiny-starcoder with its position table widened to 4,096): ours is the real loop/train.py (its
`run()` on a config: data, model load, engine start), TRL's is SFTTrainer built and `trainer.train()`. Each
is stopped as its first optimizer step begins, its first batch in hand (ours: loop/train.py's `train_step`
replaced by a stop; TRL: a callback's `on_step_begin`): the tiny model's one 4,096-token step on CPU takes
20-50 s on either side, more than the whole preparation of a few thousand dialogues, and its activations
would be the peak memory.

Each side runs twice a repeat: first with an empty cache, then cached (what the next run's start costs). For
each run: the time from process start to the first step, wall time of the whole process, CPU-seconds of the
process and its workers, and peak memory of the process tree as proportional set size (PSS: a page shared by
forked workers split among them) beside summed resident memory (RSS, which counts a shared page once per
worker). The sides alternate, the order swapped every repeat, so a shared machine's load falls on both;
the median and the range of the repeats are printed, and the ratios TRL / ours. Both sides count the
tokens they pack and the tokens that carry a training label, so neither can skip work.

The limit is printed with the result: the Rust tokenizer's own `encode_batch` of the same rendered text
(`apply_chat_template(..., tokenize=False)`, one thread, CPU-seconds; on at most --limit-sample dialogues,
scaled by tokens), and the goals: ours first-run CPU-s at most 1.25x it, peak memory at most 0.33x TRL's, a
cached start to the first step under 10 s at 1M dialogues. The cache's disk per million dialogues is printed
beside its token arrays' own size.

  python -m tools.bench.data_prep --dialogues 20000 --repeats 3      # side by side (7 minutes on 2 cores)
  python -m tools.bench.data_prep --dialogues 100000 300000 --sides ours --repeats 1 --limit-sample 5000
  python -m tools.bench.data_prep --quick                             # 2,000 dialogues, one repeat: a check
  python -m tools.bench.data_prep --dialogues 1000000 --sides ours --repeats 1 --keep-caches  # 20 minutes
  python -m tools.bench.data_prep --dialogues 1000000 --sides ours --repeats 3 --cached-only  # from that cache

TRL is installed for the benchmarks only (`pip install -e '.[bench]'`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tools.bench import corpus, provenance
from tools.bench.measure import Measurement, measure

ROOT = Path(__file__).resolve().parents[2]
SEQ_LEN, WORDS, TOOL_SHARE = 4096, (100, 600), 0.2

TRL = """
import os, sys, time, tempfile
from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import SFTConfig, SFTTrainer
from loop.data import templates
model_dir, data, cache, seq_len = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])

class FirstStep(TrainerCallback):  # its batch in hand, the first step begins: the time, the counts, and stop
    def on_step_begin(self, args, state, control, **kwargs):
        print("first_step_begins", time.time(), flush=True)
        import pyarrow.compute as pc  # the counts, from the Arrow columns without a copy into Python
        table = trainer.train_dataset.data
        tokens = pc.sum(pc.list_value_length(table.column("input_ids"))).as_py()
        trained = pc.sum(pc.not_equal(pc.list_flatten(table.column("labels")), -100)).as_py()  # -100: no label
        print("counted", len(table), tokens, trained, *table.column_names, flush=True)
        os._exit(0)

tokenizer = AutoTokenizer.from_pretrained(model_dir); templates.install(tokenizer, "starchat")
dataset = load_dataset("json", data_files=data, split="train", cache_dir=cache)
args = SFTConfig(output_dir=tempfile.mkdtemp(), packing=True, packing_strategy="bfd", max_length=seq_len,
                 assistant_only_loss=True, dataset_num_proc=len(os.sched_getaffinity(0)), report_to=[], use_cpu=True,
                 max_steps=1, per_device_train_batch_size=1, save_strategy="no", dataloader_num_workers=0)
model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa")
trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=[FirstStep()])
trainer.train()
"""
# The real loop/train.py (its run(): config, data, model load, engine start), stopped as its first step begins.
OURS = """
import os, sys, time
import loop.train as train

def first_step(*args, **kwargs):
    print("first_step_begins", time.time(), flush=True)
    os._exit(0)

train.train_step = first_step
sys.exit(train.run([sys.argv[1]]))
"""

LIMIT = """
import json, sys, time
from transformers import AutoTokenizer
from loop.data import templates
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1]); templates.install(tokenizer, "starchat")
fast, limit, seen, tokens, cpu = tokenizer.backend_tokenizer, int(sys.argv[3]), 0, 0, 0.0
with open(sys.argv[2]) as f:
    while seen < limit:
        records = [json.loads(line) for _, line in zip(range(min(1000, limit - seen)), f)]
        if not records:
            break
        texts = [tokenizer.apply_chat_template(r["messages"], tools=r.get("tools"), tokenize=False) for r in records]
        start = time.process_time()
        tokens += sum(len(e.ids) for e in fast.encode_batch(texts, add_special_tokens=False))
        cpu += time.process_time() - start
        seen += len(records)
print(json.dumps({"dialogues": seen, "tokens": tokens, "cpu_s": cpu}))
"""


@dataclass
class Run:
    m: Measurement
    first_step_s: float  # process start to the first training step's start
    rows: int
    tokens: int  # in the packed rows
    trained: int  # of them, with a training label
    disk_gb: float = 0.0  # the cache folder (ours)
    arrays_gb: dict = field(default_factory=dict)  # ours: the cache's token arrays, by file


def model_4096(work: Path, source: Path) -> Path:
    """The tiny model with its position table widened to SEQ_LEN (its first 1,024 rows repeated): the
    quickstart's model is built for 1,024 positions."""
    out = work / f"tiny-starcoder-{SEQ_LEN}"
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(source)
    old = model.transformer.wpe.weight.data
    model.config.n_positions = SEQ_LEN
    model.transformer.wpe = torch.nn.Embedding(SEQ_LEN, old.shape[1])
    model.transformer.wpe.weight.data = old.repeat(SEQ_LEN // old.shape[0] + 1, 1)[:SEQ_LEN].clone()
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(source).save_pretrained(out)
    return out


def dialogues_file(work: Path, n: int) -> Path:
    path = work / f"realistic-{n}.jsonl"
    if not path.is_file():
        part = path.with_suffix(".part")
        corpus.build(ROOT / "artifacts" / "data" / "chatterbot.jsonl", part, n, words=WORDS, tools=TOOL_SHARE)
        part.rename(path)
    return path


def run_ours(a, model: Path, data: Path, work: Path, run: str, env: dict) -> Run:
    out, cache = work / "ours-run", work / "cache-ours"
    cfg = {"model": {"name_or_path": str(model), "attn_implementation": "sdpa"},
           "data": {"train_files": [str(data)], "seq_len": SEQ_LEN, "eval_fraction": 0.0, "template": "starchat",
                    "cache_dir": str(cache)},
           "training": {"max_steps": 1, "micro_batch_size": 1, "gradient_accumulation_steps": 1, "log_every": 1},
           "output": {"output_dir": str(out), "save": False, "overwrite_output_dir": True}}
    (work / "ours.yaml").write_text(yaml.safe_dump(cfg))
    shutil.rmtree(out, ignore_errors=True)
    m = measure([sys.executable, "-c", OURS, str(work / "ours.yaml")], cwd=ROOT, env=env, tree=True,
                stdout=work / f"ours-{run}.out")
    text = (work / f"ours-{run}.out").read_text()
    first = float(text.split("first_step_begins ")[1].split()[0])
    folder = next(cache.glob("prepared-*"))  # the counts, from the cache's own arrays (loop/data/prepare.py)
    import numpy as np

    use, offsets = np.load(folder / "use.npy"), np.load(folder / "offsets.npy")
    train = use == 0
    tokens, trained = int(np.diff(offsets)[train].sum()), int(np.load(folder / "trained_counts.npy")[train].sum())
    said = re.search(r"(\d+) rows of \d+", text)  # the loop's data line
    rows = int(said.group(1)) if said else -1
    arrays = {p.name: p.stat().st_size / 1e9 for p in folder.glob("*.bin")}
    return Run(m, first - m.started, rows, tokens, trained, du(cache), arrays)


def run_trl(a, model: Path, data: Path, work: Path, run: str, env: dict) -> Run:
    out = work / f"trl-{run}.out"
    m = measure([sys.executable, "-c", TRL, str(model), str(data), str(work / "cache-trl"), str(SEQ_LEN)], cwd=ROOT,
                env=env, tree=True, stdout=out)
    said = {line.split()[0]: line.split()[1:] for line in out.read_text().splitlines() if line.split()}
    rows, tokens, trained = map(int, said["counted"][:3])
    return Run(m, float(said["first_step_begins"][0]) - m.started, rows, tokens, trained, du(work / "cache-trl"))


def du(folder: Path) -> float:
    """GB the folder takes on disk (allocated blocks, as du counts)."""
    return sum(p.stat().st_blocks * 512 for p in folder.rglob("*") if p.is_file()) / 1e9 if folder.exists() else 0.0


def limit(model: Path, data: Path, sample: int, env: dict) -> dict:
    """The tokenizer's own encoding of the rendered text, one thread, CPU-seconds (on the first `sample`)."""
    one = env | {"TOKENIZERS_PARALLELISM": "false", "RAYON_NUM_THREADS": "1", "RAYON_RS_NUM_CPUS": "1"}
    done = subprocess.run([sys.executable, "-c", LIMIT, str(model), str(data), str(sample)], cwd=ROOT, env=one,
                          check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def spread(values: list[float], form: str) -> str:
    """The median, and the lowest and highest repeat."""
    if len(values) == 1:
        return format(values[0], form)
    return f"{format(statistics.median(values), form)} ({format(min(values), form)}-{format(max(values), form)})"


def report(n: int, runs: dict, sides: list[str], lim: dict, said: provenance.Said) -> None:
    print(f"\n== {n:,} dialogues: median (lowest-highest) of {len(runs[(sides[0], 'first')])} repeats")
    print(f"{'side':5s} {'run':7s} {'to 1st step s':>20s} {'wall s':>20s} {'CPU-s':>20s} {'peak PSS GB':>18s} "
          f"{'peak RSS GB':>18s} {'rows':>8s} {'tokens':>14s} {'trained':>14s}")
    for side in sides:
        for run in ("first", "cached"):
            got = runs[(side, run)]
            print(f"{side:5s} {run:7s} {spread([r.first_step_s for r in got], '.1f'):>20s} "
                  f"{spread([r.m.wall_s for r in got], '.1f'):>20s} {spread([r.m.cpu_s for r in got], '.1f'):>20s} "
                  f"{spread([r.m.peak_pss_gb for r in got], '.2f'):>18s} "
                  f"{spread([r.m.peak_rss_gb for r in got], '.2f'):>18s} {got[-1].rows:>8,d} {got[-1].tokens:>14,d} "
                  f"{got[-1].trained:>14,d}")
    ours = runs[("ours", "first")] if "ours" in sides else None
    if "trl" in sides and ours:
        for run in ("first", "cached"):
            pairs = list(zip(runs[("ours", run)], runs[("trl", run)]))

            def ratio(key, pairs=pairs) -> str:
                return spread([key(b) / key(a) for a, b in pairs], ".2f")

            print(f"TRL / ours, {run}: to the first step {ratio(lambda r: r.first_step_s)}, wall "
                  f"{ratio(lambda r: r.m.wall_s)}, CPU-s {ratio(lambda r: r.m.cpu_s)}, peak PSS "
                  f"{ratio(lambda r: r.m.peak_pss_gb)}, peak RSS {ratio(lambda r: r.m.peak_rss_gb)}")
        a, b = ours[-1], runs[("trl", "first")][-1]
        print(f"equal work: tokens packed, TRL / ours {b.tokens / a.tokens:.5f} ({b.tokens:,} / {a.tokens:,}); "
              f"tokens with a training label {b.trained / a.trained:.5f} ({b.trained:,} / {a.trained:,})")
    if ours:
        per_token = lim["cpu_s"] / lim["tokens"]
        tok_cpu = per_token * ours[-1].tokens
        data_cpu = [f.m.cpu_s - c.m.cpu_s for f, c in zip(ours, runs[("ours", "cached")])]
        print(f"limit: the Rust tokenizer's encode_batch of the rendered text, one thread: "
              f"{lim['tokens'] / lim['cpu_s'] / 1e6:.2f}M tokens a CPU-second ({lim['dialogues']:,} dialogues, "
              f"{lim['tokens'] / lim['dialogues']:,.0f} tokens each), {tok_cpu:.1f} CPU-s for these "
              f"{ours[-1].tokens:,} tokens")
        print(f"goal, ours first-run CPU-s / tokenizer CPU-s <= 1.25x: "
              f"{spread([r.m.cpu_s / tok_cpu for r in ours], '.2f')}x "
              f"(the preparation alone, first minus cached CPU-s: {spread([c / tok_cpu for c in data_cpu], '.2f')}x)")
        if "trl" in sides:
            t = runs[("trl", "first")]
            print(f"goal, peak memory ours / TRL <= 0.33x (PSS, first run): "
                  f"{spread([a.m.peak_pss_gb / b.m.peak_pss_gb for a, b in zip(ours, t)], '.2f')}x")
        cached = [r.first_step_s for r in runs[("ours", "cached")]]
        print(f"goal, cached start to the first step < 10 s at 1M dialogues: {spread(cached, '.1f')} s at {n:,}")
        r = ours[-1]
        arrays = ", ".join(f"{name} {gb / n * 1e6:.2f}" for name, gb in sorted(r.arrays_gb.items()))
        print(f"disk: the cache {r.disk_gb:.2f} GB, {r.disk_gb / n * 1e6:.2f} GB per million dialogues; its token "
              f"arrays per million: {arrays} GB ({sum(r.arrays_gb.values()) / r.disk_gb:.0%} of it)")
    print(said.line(), flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dialogues", type=int, nargs="+", default=[20_000], help="corpus sizes (default 20,000)")
    p.add_argument("--repeats", type=int, default=3, help="repeats of every side, order swapped each (default 3)")
    p.add_argument("--sides", nargs="+", choices=["ours", "trl"], default=["ours", "trl"])
    p.add_argument("--limit-sample", type=int, default=50_000,
                   help="dialogues the tokenizer's limit is measured on (scaled to the corpus by tokens)")
    p.add_argument("--work", type=Path, default=Path("/tmp/bench-data"), help="corpus files, caches, runs")
    p.add_argument("--model", type=Path, default=ROOT / "artifacts" / "tiny-starcoder")
    p.add_argument("--quick", action="store_true", help="2,000 dialogues, one repeat: checks that it all runs")
    p.add_argument("--keep-caches", action="store_true", help="leave each side's cache in --work for --cached-only")
    p.add_argument("--cached-only", action="store_true",
                   help="only cached starts, from the caches an earlier --keep-caches left (1M: 20 minutes to make)")
    a = p.parse_args(argv)
    if a.quick:
        a.dialogues, a.repeats = [2_000], 1
    a.work.mkdir(parents=True, exist_ok=True)
    missing = [side for side in a.sides if a.cached_only and not any((a.work / f"cache-{side}").glob("prepared-*"))]
    if missing:
        sys.exit(f"--cached-only: no cache in {a.work} for {', '.join(missing)}; make it with --keep-caches first")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")} | {
        "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    model = model_4096(a.work, a.model)
    said = provenance.Said.start()
    print(f"realistic corpus (tools/bench/corpus.py: answers {WORDS[0]}-{WORDS[1]} words, half with code, "
          f"{TOOL_SHARE:.0%} with a tool call), {SEQ_LEN:,}-token rows, StarChat, tiny model; each side to its "
          f"first training step; {a.repeats} repeats, sides alternating; {os.cpu_count()} cores", flush=True)
    print(f"{'dialogues':>10s} {'#':>2s} {'side':5s} {'run':7s} {'1st step s':>10s} {'wall s':>8s} {'CPU-s':>8s} "
          f"{'PSS GB':>7s} {'RSS GB':>7s} {'rows':>8s} {'tokens':>13s} {'trained':>13s}", flush=True)
    for n in a.dialogues:
        data = dialogues_file(a.work, n)
        runs: dict[tuple[str, str], list[Run]] = {}
        for repeat in range(a.repeats):
            for side in a.sides if repeat % 2 == 0 else a.sides[::-1]:
                if not a.cached_only:
                    shutil.rmtree(a.work / f"cache-{side}", ignore_errors=True)
                for run in ("cached",) if a.cached_only else ("first", "cached"):
                    go = run_ours if side == "ours" else run_trl
                    r = go(a, model, data, a.work, run, env)
                    runs.setdefault((side, run), []).append(r)
                    print(f"{n:10,d} {repeat + 1:2d} {side:5s} {run:7s} {r.first_step_s:10.1f} {r.m.wall_s:8.1f} "
                          f"{r.m.cpu_s:8.1f} {r.m.peak_pss_gb:7.2f} {r.m.peak_rss_gb:7.2f} {r.rows:8,d} "
                          f"{r.tokens:13,d} {r.trained:13,d}", flush=True)
        if a.cached_only:
            for side in a.sides:
                print(f"{side}: cached start to the first step at {n:,} dialogues: "
                      f"{spread([r.first_step_s for r in runs[(side, 'cached')]], '.1f')} s")
            print(said.line(), flush=True)
            continue
        lim = limit(model, data, min(n, a.limit_sample), env)
        report(n, runs, a.sides, lim, said)
        for side in a.sides if not a.keep_caches else ():
            shutil.rmtree(a.work / f"cache-{side}", ignore_errors=True)


if __name__ == "__main__":
    main()
