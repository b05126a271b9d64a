"""Build long agent trajectories over this repository: a user asks about the code, the assistant looks with tools
(list_dir, read_file, grep), each result the real folder, file or search of this checkout, and answers from what
it read; task after task, each session 8k-40k tokens by the tokenizer given. In the messages schema with each
dialogue's tools ({"messages", "tools"}), for long rows: configs/long-trajectories-32k.yaml trains on it.
Deterministic: the same checkout, seed and tokenizer write the same file (tools/builders/trajectories.py).

  python tools/make_long_data.py                     # artifacts/data/long_trajectories.jsonl, 128 sessions
  python tools/make_long_data.py --tokenizer Qwen/Qwen2.5-Coder-7B --count 1000 --seed 1 --out /tmp/long.jsonl
  python tools/inspect_data.py configs/long-trajectories-32k.yaml     # what a 32k row keeps of each
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python tools/NAME.py`: tools.builders is imported from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loop.data import calls  # noqa: E402
from tools.builders import trajectories  # noqa: E402

DEFAULT_OUT = Path("artifacts/data/long_trajectories.jsonl")
DEFAULT_TOKENIZER = "artifacts/tiny-starcoder"  # the quickstart's (python tools/make_tiny_model.py)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSONL file to write (default {DEFAULT_OUT})")
    p.add_argument("--count", type=int, default=128, help="how many sessions (default 128)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-tokens", type=int, default=8000, help="shortest session aimed at (default 8000)")
    p.add_argument("--max-tokens", type=int, default=40_000, help="longest session (default 40000)")
    p.add_argument("--tokenizer", default=DEFAULT_TOKENIZER,
                   help=f"tokenizer folder or Hub id the lengths are counted with (default {DEFAULT_TOKENIZER})")
    p.add_argument("--root", type=Path, default=trajectories.ROOT, help="the repository read (default this checkout)")
    a = p.parse_args(argv)
    if a.count < 1 or not 0 < a.min_tokens <= a.max_tokens:
        print("error: --count must be at least 1, and 0 < --min-tokens <= --max-tokens", file=sys.stderr)
        return 2
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(a.tokenizer)
    except (OSError, ValueError) as e:
        print(f"error: --tokenizer {a.tokenizer}: cannot load it ({str(e).splitlines()[0]}); build the quickstart's "
              "with python tools/make_tiny_model.py, or name your model's", file=sys.stderr)
        return 2
    repo = trajectories.Repository.read(a.root)
    if not repo.modules:
        print(f"error: --root {a.root}: no Python module of this project there to read", file=sys.stderr)
        return 2
    count = trajectories.counter(tokenizer)
    lengths = []
    try:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        with a.out.open("w") as f:
            for d in trajectories.sessions(repo, count, a.count, a.seed, a.min_tokens, a.max_tokens):
                messages, tools = calls.split(d)
                lengths.append(count(trajectories.texts(messages, tools)))
                f.write(json.dumps({"messages": messages, "tools": tools}, ensure_ascii=False) + "\n")
    except OSError as e:
        print(f"error: --out {a.out}: cannot write there ({e.strerror or e})", file=sys.stderr)
        return 2
    print(f"wrote {a.count} sessions to {a.out}: {min(lengths)}-{max(lengths)} tokens, median "
          f"{int(statistics.median(lengths))} ({a.tokenizer}), from {len(repo.files)} files of {a.root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
