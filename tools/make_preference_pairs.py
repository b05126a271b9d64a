"""Make preference pairs from the shipped chatterbot corpus, to try preference tuning without preference data.

Each distinct dialogue gives one pair (TRL's conversational records: prompt, chosen, rejected): the prompt
is every turn before its last answer, chosen is that answer, and rejected is, with --rejected reversed (the
default), the same words in reverse order: a preference even the quickstart's tiny model learns and carries
over to prompts it never saw; with --rejected other_topic, the last answer of a dialogue on another topic
(another corpus file), picked at random: an answer, but not to this question, which a tiny model tells
apart far less well. The held-out split is the one the quickstart's fine-tuning made of the same dialogues
(the same eval_fraction and a stable hash of each dialogue's first question), so the eval pairs come from dialogues that
neither stage trained on (and other_topic draws their rejected answers from held-out dialogues too).

  python tools/make_preference_pairs.py --out artifacts/data/pairs
      # writes artifacts/data/pairs-train.jsonl and artifacts/data/pairs-eval.jsonl
  python tools/make_preference_pairs.py CORPUS/*.yml --out data/pairs --eval-fraction 0.1
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python tools/NAME.py`: tools.builders is imported from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loop.data import preference  # noqa: E402
from loop.data.dialogues import collect, held_out, split_key  # noqa: E402
from tools.builders.tiny import CORPUS_DIR  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("corpus", nargs="*", help="chatterbot-corpus YAML files, one topic each (default: the "
                   "installed package's English files, which tools/make_tiny_model.py converts)")
    p.add_argument("--out", type=Path, required=True, help="output prefix: writes OUT-train.jsonl, OUT-eval.jsonl")
    p.add_argument("--eval-fraction", type=float, default=0.05, help="the fine-tuning run's data.eval_fraction")
    p.add_argument("--rejected", choices=["reversed", "other_topic"], default="reversed",
                   help="what the rejected answer is: the chosen one's words reversed, or another topic's answer")
    p.add_argument("--seed", type=int, default=0, help="picks the rejected answers of other_topic")
    a = p.parse_args(argv)
    files = a.corpus or sorted(str(f) for f in CORPUS_DIR.glob("*.yml"))
    by_topic = {}
    for f in files:
        dialogues, _, bad = collect([f], "chatterbot")
        for where, _, reason in bad:
            print(f"skipped {where}: {reason}", file=sys.stderr)
        by_topic[Path(f).stem] = dialogues
    a.out.parent.mkdir(parents=True, exist_ok=True)
    for name in ("train", "eval"):
        part = {topic: [d for d in dialogues if held_out(split_key(d), a.eval_fraction) == (name == "eval")]
                for topic, dialogues in by_topic.items()}
        made = preference.from_dialogues(part, a.rejected, a.seed)
        path = a.out.with_name(f"{a.out.name}-{name}.jsonl")
        path.write_text("".join(json.dumps(pair, ensure_ascii=False) + "\n" for pair in made))
        print(f"wrote {len(made)} {name} pairs from {len(files)} topics to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
