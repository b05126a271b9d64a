"""Convert dialogue data to the messages schema (one JSON object per line).

Formats: prompt_completion ({"prompt", "completion"}), sharegpt ({"conversations": [{"from", "value"}]}; with
function calling, "function_call" turns hold a {"name", "arguments"} JSON call and "observation" turns its result,
the record's "tools" beside), alpaca ({"instruction", "input", "output"}), oasst (OpenAssistant message rows:
message_id, parent_id, role prompter/assistant, text, rank), chatterbot (chatterbot-corpus YAML files), messages
(validate only; OpenAI's older "functions" / "function_call" shape becomes "tools" / "tool_calls"). A dialogue
with tools is written as {"messages", "tools"}.
Inputs are local .jsonl / .json / .parquet / .yml files or Hub dataset ids. Every converted dialogue is
validated; bad records are listed with file, record and reason (or skipped and counted with --skip-bad).
The same converters run inside training when the config sets data.format, so converting first is optional.

  python tools/convert_data.py sharegpt sharegpt.jsonl --out data/train.jsonl
  python tools/convert_data.py oasst oasst_messages.parquet --oasst-paths all --out data/oasst.jsonl
  python tools/convert_data.py chatterbot CORPUS/data/english/*.yml --out chat.jsonl
      (CORPUS: the folder of the installed chatterbot_corpus package)
"""

from __future__ import annotations

import argparse
import json
import sys
import typing
from pathlib import Path

from loop.config import Format, OasstPaths
from loop.data import calls
from loop.data.dialogues import counts, load_dialogues
from loop.data.records import DataError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("format", choices=typing.get_args(Format))
    p.add_argument("inputs", nargs="+")
    p.add_argument("--out", type=Path, required=True, help="output JSONL in the messages schema")
    p.add_argument("--skip-bad", action="store_true", help="skip bad records (counted) instead of stopping")
    p.add_argument("--oasst-paths", choices=typing.get_args(OasstPaths), default="longest",
                   help="OpenAssistant trees: the longest path of each tree, or every root-to-leaf path")
    a = p.parse_args(argv)
    try:
        dialogues, report = load_dialogues(a.inputs, a.format, "skip" if a.skip_bad else "error", a.oasst_paths,
                                           skip_hint="pass --skip-bad")
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    a.out.parent.mkdir(parents=True, exist_ok=True)
    with a.out.open("w") as f:
        for d in dialogues:
            messages, tools = calls.split(d)
            f.write(json.dumps({"messages": messages, **({"tools": tools} if tools else {})}, ensure_ascii=False)
                    + "\n")
    skipped = f"; skipped {counts(report.skipped)} (bad records)" if report.skipped else ""
    skipped += f"; left out {counts(report.left_out)}" if report.left_out else ""
    print(f"wrote {len(dialogues)} dialogues from {report.records} records to {a.out}{skipped}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
