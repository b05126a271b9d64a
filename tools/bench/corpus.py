"""A corpus of dialogues shaped like supervised fine-tuning data, built deterministically from a seed.

The shipped chatterbot corpus is 2.1 messages and about 45 tokens a dialogue, so a packed row holds a dozen
of them and per-row costs dominate. Real SFT dialogues are multi-turn with long answers, often with code:
here 2-6 messages, short questions, answers of `words` words (drawn from the shipped corpus's own
sentences, so the tiny tokenizer knows the words) and a fenced code block in half of them.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

CODE = ("def {f}(items):\n    total = 0\n    for item in items:\n        if item > {n}:\n            total += item\n"
        "    return total\n",
        "class {F}:\n    def __init__(self, name):\n        self.name = name\n\n    def greet(self):\n"
        "        return f\"hello {{self.name}}\"\n",
        "import json\n\nwith open(\"{f}.json\") as handle:\n    data = json.load(handle)\nprint(len(data), {n})\n")


def sentences(source: Path) -> list[str]:
    """Every message of a messages-schema JSONL, as the text answers are built from."""
    out = []
    for line in source.read_text().splitlines():
        out += [m["content"] for m in json.loads(line)["messages"] if m["content"].strip()]
    return out


def answer(rng: random.Random, pool: list[str], words: tuple[int, int]) -> str:
    want, text = rng.randint(*words), []
    while sum(len(s.split()) for s in text) < want:
        text.append(rng.choice(pool))
    body = " ".join(text)
    if rng.random() < 0.5:  # half the answers carry code
        name = rng.choice(["count", "load", "parse", "merge", "total"])
        code = rng.choice(CODE).format(f=name, F=name.capitalize(), n=rng.randint(0, 99))
        cut = len(body) // 2
        body = f"{body[:cut]}\n\n```python\n{code}```\n\n{body[cut:]}"
    return body


def build(source: Path, out: Path, dialogues: int, words: tuple[int, int] = (50, 300), seed: int = 0) -> Path:
    """`dialogues` dialogues of 2-6 messages into `out` (JSONL, messages schema); the same file for a seed."""
    rng, pool = random.Random(seed), sentences(source)
    with out.open("w") as f:
        for _ in range(dialogues):
            messages = []
            for _ in range(rng.randint(1, 3)):
                messages += [{"role": "user", "content": " ".join(rng.choices(pool, k=rng.randint(2, 12)))},
                             {"role": "assistant", "content": answer(rng, pool, words)}]
            f.write(json.dumps({"messages": messages}) + "\n")
    return out
