"""What data preparation costs on top of the Rust tokenizer, per dialogue, in CPU time of one process.

Runs one worker's whole path (workers.py's `work`: read, parse and validate, render, tokenize, mask, hash)
over a corpus, then each part of it alone, and the tokenizer's own batch encoding of the same rendered text
(the floor: no preparation is cheaper than tokenizing its text). Printed per dialogue in CPU-microseconds,
with whole / tokenizer. One thread everywhere (set before the tokenizer loads), as a worker runs.

  python -m tools.bench.render_cost                      # realistic (answers 100-600 words, a tool-use share)
  python -m tools.bench.render_cost --corpus short       # the shipped chatterbot dialogues, numbered
  python -m tools.bench.render_cost --profile 25         # and the 25 costliest functions of `_work`
"""

from __future__ import annotations

import os

for _name in ("OMP_NUM_THREADS", "RAYON_NUM_THREADS", "RAYON_RS_NUM_CPUS"):
    os.environ[_name] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "artifacts" / "data" / "chatterbot.jsonl"


def realistic_corpus(source: Path, path: Path, n: int, tool_share: float) -> Path:
    """tools/bench/corpus.py's dialogues (answers 100-600 words), and tool-use ones (the shipped data's kind)."""
    from loop.data import calls
    from loop.data.dialogues import collect
    from tools.bench import corpus
    from tools.builders import toolset
    from tools.builders.tiny import CORPUS_DIR

    tools = int(n * tool_share)
    corpus.build(source, path, n - tools, words=(100, 600), seed=0)
    chatterbot, _, _ = collect(sorted(str(f) for f in CORPUS_DIR.glob("*.yml")), "chatterbot")
    with path.open("a") as f:
        for d in toolset.dialogues(chatterbot, tools, seed=1):
            messages, listed = calls.split(d)
            f.write(json.dumps({"messages": messages, "tools": listed}, ensure_ascii=False) + "\n")
    return path


def timed(fn):
    start = time.process_time()
    out = fn()
    return out, time.process_time() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", choices=["realistic", "short"], default="realistic")
    p.add_argument("--dialogues", type=int, default=5000)
    p.add_argument("--tool-share", type=float, default=0.1, help="share of tool-use dialogues (realistic)")
    p.add_argument("--model", default=str(ROOT / "artifacts" / "tiny-starcoder"))
    p.add_argument("--source", type=Path, default=SHIPPED, help="the messages-schema JSONL both corpora are built "
                   "from (default: the quickstart's converted chatterbot dialogues)")
    p.add_argument("--template", default="starchat", choices=["starchat", "chatml"])
    p.add_argument("--seq-len", type=int, default=4096, help="row length (longer dialogues are cut to fit)")
    p.add_argument("--work", type=Path, default=Path("/tmp/bench-render"))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--profile", type=int, default=0, help="print this many functions of a cProfile of `_work`")
    a = p.parse_args()
    from transformers import AutoTokenizer

    from loop import config
    from loop.data import dialogues as dlg
    from loop.data import templates, workers
    from loop.data.dialogues import SourceReport
    from loop.data.sources import plan, read, resolve

    a.work.mkdir(parents=True, exist_ok=True)
    if a.corpus == "short":  # the shipped dialogues repeated, each question numbered
        from tools.bench.corpus import numbered

        path = numbered(a.source, a.work / f"dialogues-{a.dialogues}.jsonl", a.dialogues)
    elif not (path := a.work / f"realistic-{a.dialogues}.jsonl").is_file():
        realistic_corpus(a.source, path, a.dialogues, a.tool_share)
    tokenizer = AutoTokenizer.from_pretrained(a.model)
    templates.install(tokenizer, a.template)
    data = config.from_dict({"data": {"train_files": [str(path)], "eval_fraction": 0,
                                           "seq_len": a.seq_len}}).data
    planned = [plan(s) for s in resolve(data)]
    job = workers.Job(planned, tokenizer, data.seq_len, data.on_too_long, data.oasst_paths, "uint16")
    items = [(0, (u,)) for u in planned[0].units]
    workers.start(job)
    encoder = workers._ENCODER

    def found(item):
        records = (r for unit in item[1] for r in read(planned[0].source, unit))
        return [d for _, d in dlg.dialogues_of(planned[0].fmt, str(path), records, data.oasst_paths, SourceReport(),
                                               [])]

    def parts_of(item) -> dict:
        """Each part's work on one unit of the corpus (what one `_work` call reads)."""
        dialogues = found(item)
        batches = [dialogues[i : i + workers.BATCH] for i in range(0, len(dialogues), workers.BATCH)]
        rendered = [encoder._render(b)[0] for b in batches]
        return {"whole": lambda: workers.work(item), "read+JSON+validate": lambda: found(item),
                "render": lambda: [encoder._render(b) for b in batches],
                "tokenizer": lambda: [encoder.backend.encode_batch(t, add_special_tokens=False) for t in rendered],
                "hash": lambda: [dlg.keys(d) for d in dialogues],
                "encoder": lambda: [encoder.encode(b) for b in batches]}

    units = [parts_of(item) for item in items]
    gc.freeze()  # what the parts read stays out of the collector's way, as it does in a worker, which holds none of it
    times: dict[str, list[list[float]]] = {name: [[] for _ in units] for name in units[0]}
    for _ in range(a.repeats):  # interleaved unit by unit: a burst of load elsewhere falls on every part alike
        for k, parts in enumerate(units):
            for name, fn in parts.items():
                times[name][k].append(timed(fn)[1])
    best = {name: sum(map(min, per_unit)) for name, per_unit in times.items()}
    worst = {name: sum(map(max, per_unit)) for name, per_unit in times.items()}
    chunks = [workers.work(item) for item in items]
    whole, tokenize = best["whole"], best["tokenizer"]
    n = sum(len(c.lengths) for c in chunks)
    tokens = sum(len(c.tokens) for c in chunks)
    us = lambda seconds: f"{seconds / n * 1e6:9.1f}"  # noqa: E731
    print(f"{a.corpus} corpus: {n} dialogues, {tokens / n:.0f} tokens each, template {a.template}, one thread")
    print(f"  CPU us a dialogue, the least of {a.repeats} interleaved repeats of each unit of {len(units)} (spread: "
          "the most / the least)")
    for name in times:
        print(f"    {name:20s} {us(best[name])}  ({worst[name] / best[name]:.2f})")
    print(f"    {'ids, mask, bounds':20s} {us(best['encoder'] - best['render'] - tokenize)}  (encoder - render - "
          "tokenizer)")
    rest = whole - best["encoder"] - best["read+JSON+validate"] - best["hash"]
    print(f"    {'bookkeeping':20s} {us(rest)}  (whole - encoder - read - hash)")
    print(f"  whole worker {us(whole)}  = tokenizer + {us(whole - tokenize).strip()}; whole / tokenizer "
          f"{whole / tokenize:.2f}x; tokenizer {tokens / tokenize / 1e6:.2f}M tokens/CPU-s, whole "
          f"{tokens / whole / 1e6:.2f}M")
    # tokens.bin 2 bytes a token, trained.bin a bit, and about 40 bytes a dialogue (offsets, counts, use, source,
    # the packed rows): 42 measured on a prepared folder of this corpus
    print(f"  cache on disk: {(tokens * 2.125 + n * 42) / n * 1e6 / 2**30:.2f} GiB a million dialogues (the tokens "
          f"{tokens * 2 / n * 1e6 / 2**30:.2f} GiB of it, the trained flags {tokens / 8 / n * 1e6 / 2**30:.2f})")
    if a.profile:
        import cProfile
        import pstats

        profile = cProfile.Profile()
        profile.runcall(lambda: [workers.work(item) for item in items])
        pstats.Stats(profile).sort_stats("tottime").print_stats(a.profile)


if __name__ == "__main__":
    main()
