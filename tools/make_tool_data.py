"""Build the shipped tool-use data set: questions that need a tool, the call, the tool's real result, the answer.

Arithmetic questions are answered by a `calculator` tool (evaluated for real by a strict arithmetic evaluator),
questions about the chatterbot corpus's own sentences by a `word_count` tool; about one dialogue in six is a
corpus greeting answered with no call. Each dialogue carries the tools list, in the messages schema
({"messages", "tools"}), so a run trains on it like any source (data.train_files) and the saved chat template
renders it with `apply_chat_template(messages, tools=...)`. Deterministic: the same seed writes the same files.

  python tools/make_tool_data.py                              # loop/data/tool_use/{tool_use.jsonl,tools.json}
  python tools/make_tool_data.py --count 2000 --seed 1 --out /tmp/more-tools
  python tools/generate.py MODEL --tools loop/data/tool_use/tools.json --chat    # then try the trained model
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python tools/NAME.py`: tools.builders is imported from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loop.data import calls  # noqa: E402
from loop.data.dialogues import collect  # noqa: E402
from tools.builders import toolset  # noqa: E402
from tools.builders.tiny import CORPUS_DIR  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=toolset.SHIPPED, help=f"folder to write (default {toolset.SHIPPED})")
    p.add_argument("--count", type=int, default=400, help="how many dialogues (default 400)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.count < 1:
        print("error: --count must be at least 1", file=sys.stderr)
        return 2
    corpus, _, _ = collect(sorted(str(f) for f in CORPUS_DIR.glob("*.yml")), "chatterbot")
    try:
        a.out.mkdir(parents=True, exist_ok=True)
        with (a.out / "tool_use.jsonl").open("w") as f:
            for d in toolset.dialogues(corpus, a.count, a.seed):
                messages, tools = calls.split(d)
                f.write(json.dumps({"messages": messages, "tools": tools}, ensure_ascii=False) + "\n")
        (a.out / "tools.json").write_text(json.dumps(toolset.TOOLS, indent=2) + "\n")
    except OSError as e:
        print(f"error: --out {a.out}: cannot write there ({e.strerror or e})", file=sys.stderr)
        return 2
    print(f"wrote {a.count} tool-use dialogues to {a.out / 'tool_use.jsonl'} and their tools to {a.out / 'tools.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
