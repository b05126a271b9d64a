"""Answer prompts with a trained model, or chat with it.

Loads a model directory (or Hub id) or a training checkpoint, renders prompts with the model's saved
chat template, samples, and stops at the template's end token.

  python tools/generate.py outputs/quickstart/final                    # built-in coding prompts
  python tools/generate.py MODEL --prompts-file prompts.txt --out answers.md --temperature 0.7
  python tools/generate.py MODEL --chat                                # interactive, streams tokens

In --chat mode each line you type is a user turn; the conversation is kept across turns.
An empty line or /exit ends it, /reset starts over.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from transformers import TextStreamer

from loop import consolidate, sampling

# The original project's sample prompts, in spirit: small, checkable coding questions.
BUILT_IN_PROMPTS = [
    "Write a Python function that checks whether a string is a palindrome.",
    "How do I reverse a list in Python?",
    "Explain the difference between a list and a tuple in Python.",
    "Write a SQL query that returns the ten most recent orders.",
    "What does `git rebase` do?",
    "Write a bash one-liner that counts the lines of every .py file in a folder.",
    "What is a Python decorator? Give an example.",
]


def chat(model, tokenizer, cfg: sampling.SamplingConfig, stop, stdin=sys.stdin, stdout=sys.stdout) -> None:
    conversation: list[dict] = []
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    stdout.write("chat: type a message, /reset to start over, empty line or /exit to quit\n")
    while True:
        stdout.write("user> ")
        stdout.flush()
        line = stdin.readline()
        if not line or not line.strip() or line.strip() == "/exit":
            return
        if line.strip() == "/reset":
            conversation = []
            continue
        conversation.append({"role": "user", "content": line.rstrip("\n")})
        stdout.write("assistant> ")
        stdout.flush()
        (reply,) = sampling.answer(model, tokenizer, [conversation], cfg, stop, streamer=streamer)
        conversation.append({"role": "assistant", "content": reply})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="model directory, Hub id, or a checkpoint folder (step_N)")
    p.add_argument("--prompts-file", type=Path, help="one prompt per line (default: built-in coding prompts)")
    p.add_argument("--out", type=Path, help="write answers here (default: MODEL/answers.md or ./answers.md)")
    p.add_argument("--chat", action="store_true", help="interactive multi-turn chat, streaming tokens")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.2, help="0 means greedy")
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--repetition-penalty", type=float, default=1.2)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    import torch

    torch.manual_seed(a.seed)
    try:
        model, tokenizer = sampling.load(a.model)
    except (consolidate.ConsolidationError, OSError, ValueError) as e:
        print(f"error: {a.model}: cannot load a model from it ({e})", file=sys.stderr)
        return 2
    cfg = sampling.SamplingConfig(max_new_tokens=a.max_new_tokens, do_sample=a.temperature > 0,
                                  temperature=a.temperature or 1.0, top_k=a.top_k, top_p=a.top_p,
                                  repetition_penalty=a.repetition_penalty)
    stop = sampling.end_token_id(tokenizer, model)
    if a.chat:
        chat(model, tokenizer, cfg, stop)
        return 0
    prompts = ([line.strip() for line in a.prompts_file.read_text().splitlines() if line.strip()]
               if a.prompts_file else BUILT_IN_PROMPTS)
    answers = sampling.answer(model, tokenizer, [[{"role": "user", "content": q}] for q in prompts], cfg, stop)
    text = "\n\n".join(f"## {q}\n\n{ans}" for q, ans in zip(prompts, answers))
    out = a.out or (Path(a.model) / "answers.md" if Path(a.model).is_dir() else Path("answers.md"))
    out.write_text(text + "\n")
    print(text)
    print(f"\nwrote {len(answers)} answers to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
