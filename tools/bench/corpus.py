"""A corpus of dialogues shaped like supervised fine-tuning data, built deterministically from a seed.

The shipped chatterbot corpus is 2.1 messages and about 45 tokens a dialogue, so a packed row holds a dozen
of them and per-row costs dominate. Real SFT dialogues are multi-turn with long answers, often with code:
here 2-6 messages, short questions, answers of `words` words (drawn from the shipped corpus's own
sentences, so the tiny tokenizer knows the words) and a fenced code block in half of them. A `tools` share
of the dialogues uses a tool (the schema of loop/data/calls.py): the dialogue carries a `tools` list and its
first answer is preceded by the assistant's call and the tool's result.
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
# One tool, so that every tool-use row has the same structure: a table of rows (TRL reads the file with
# `datasets`, Arrow) gives a row's missing keys as nulls, which a template would then render.
RUN_PYTHON = {"type": "function", "function": {
    "name": "run_python", "description": "Run a Python snippet and return what it prints.",
    "parameters": {"type": "object", "properties": {"code": {"type": "string", "description": "the snippet"}},
                   "required": ["code"]}}}


def sentences(source: Path) -> list[str]:
    """Every message of a messages-schema JSONL, as the text answers are built from."""
    out = []
    for line in source.read_text().splitlines():
        out += [m["content"] for m in json.loads(line)["messages"] if m["content"].strip()]
    return out


def snippet(rng: random.Random) -> str:
    name = rng.choice(["count", "load", "parse", "merge", "total"])
    return rng.choice(CODE).format(f=name, F=name.capitalize(), n=rng.randint(0, 99))


def answer(rng: random.Random, pool: list[str], words: tuple[int, int]) -> str:
    want, text, have = rng.randint(*words), [], 0
    while have < want:
        text.append(rng.choice(pool))
        have += len(text[-1].split())
    body = " ".join(text)
    if rng.random() < 0.5:  # half the answers carry code
        cut = len(body) // 2
        body = f"{body[:cut]}\n\n```python\n{snippet(rng)}```\n\n{body[cut:]}"
    return body


def tool_turn(rng: random.Random, pool: list[str]) -> list[dict]:
    """The assistant's call (arguments as a JSON string: one type in every row) and the tool's result."""
    code = snippet(rng)
    return [{"role": "assistant", "content": None, "tool_calls": [
                {"type": "function", "function": {"name": "run_python", "arguments": json.dumps({"code": code})}}]},
            {"role": "tool", "content": " ".join(rng.choices(pool, k=rng.randint(1, 4)))}]


def dialogue(rng: random.Random, pool: list[str], words: tuple[int, int], tools: float) -> dict:
    """One record: 1-3 question-answer turns; with probability `tools` a tool call before the first answer."""
    uses = tools > 0 and rng.random() < tools  # no draw at all without a tool share: the same corpus as before
    messages = []
    for turn in range(rng.randint(1, 3)):
        messages.append({"role": "user", "content": " ".join(rng.choices(pool, k=rng.randint(2, 12)))})
        if uses and turn == 0:
            messages += tool_turn(rng, pool)
        messages.append({"role": "assistant", "content": answer(rng, pool, words)})
    return {"messages": messages, "tools": [RUN_PYTHON]} if uses else {"messages": messages}


def build(source: Path, out: Path, dialogues: int, words: tuple[int, int] = (50, 300), seed: int = 0,
          tools: float = 0.0) -> Path:
    """`dialogues` dialogues of 2-6 messages (a tool call adds two) into `out` (JSONL, messages schema), a
    `tools` share of them using a tool; the same file for the same arguments."""
    rng, pool = random.Random(seed), sentences(source)
    with out.open("w") as f:
        for _ in range(dialogues):
            f.write(json.dumps(dialogue(rng, pool, words, tools)) + "\n")
    return out


def numbered(source: Path, out: Path, dialogues: int) -> Path:
    """`dialogues` distinct short dialogues: the shipped corpus repeated, each first message numbered (the size of
    chatterbot's, 2.1 messages and about 45 tokens each, where per-dialogue costs dominate)."""
    if out.is_file():
        return out
    base = [json.loads(line)["messages"] for line in source.read_text().splitlines()]
    with out.open("w") as f:
        for i in range(dialogues):
            d = [dict(m) for m in base[i % len(base)]]
            d[0]["content"] = f"{d[0]['content']} (#{i})"
            f.write(json.dumps({"messages": d}) + "\n")
    return out
