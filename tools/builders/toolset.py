"""A small tool-use data set the project can ship: questions that need a tool, the call that answers each, the
tool's result computed for real, and the answer that reads it; built by tools/make_tool_data.py, deterministic.

Two tools: a calculator (arithmetic questions with random numbers, evaluated by a strict arithmetic evaluator,
never `eval`) and a word counter (its sentences are the questions of the chatterbot corpus, counted by
`str.split`). A share of the dialogues offers the tools to a greeting from the corpus that needs none, answered
without a call, so that the set also shows when not to call. Dialogues are in the messages schema with their
`tools` list beside (data/calls.py), so the loop trains on them as on any other source.
"""

from __future__ import annotations

import ast
import operator
import random
from collections.abc import Iterator
from pathlib import Path

import loop.data
from loop.data import calls
from loop.data.records import Messages

# The set ships with the package (loop/data/tool_use: tool_use.jsonl and tools.json), as make_tool_data.py writes it.
SHIPPED = Path(loop.data.__file__).parent / "tool_use"

CALCULATOR = {"type": "function", "function": {
    "name": "calculator", "description": "Evaluate an arithmetic expression (+ - * / // % ** and parentheses).",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string",
                                                                   "description": "for example (3 + 4) * 2"}},
                   "required": ["expression"]}}}
WORD_COUNT = {"type": "function", "function": {
    "name": "word_count", "description": "Count the words of a text.",
    "parameters": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}}}
TOOLS = [CALCULATOR, WORD_COUNT]

_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
              ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}


def calculate(expression: str) -> str:
    """The value of an arithmetic expression, as the calculator tool returns it (an error as its text)."""
    def value(node: ast.AST) -> float:
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            return -value(node.operand) if isinstance(node.op, ast.USub) else value(node.operand)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > 64:
                raise ValueError("exponent too large")
            return _OPERATORS[type(node.op)](left, right)
        raise ValueError(f"not arithmetic: {ast.dump(node)[:40]}")

    try:
        result = value(ast.parse(expression, mode="eval").body)
    except (SyntaxError, ValueError, ZeroDivisionError, OverflowError) as e:
        return f"error: {e}"
    return str(int(result)) if float(result).is_integer() else f"{result:.6g}"


def word_count(text: str) -> str:
    return str(len(text.split()))


RUN = {"calculator": lambda a: calculate(a["expression"]), "word_count": lambda a: word_count(a["text"])}

ARITHMETIC = ["What is {e}?", "Compute {e}.", "Calculate {e} for me.", "How much is {e}?", "Please work out {e}."]
COUNTING = ['How many words are in "{s}"?', 'Count the words in this sentence: "{s}"',
            'How many words does "{s}" have?']


def _expression(rng: random.Random) -> str:
    a, b, c = rng.randint(2, 99), rng.randint(2, 99), rng.randint(2, 9)
    return rng.choice([f"{a} + {b}", f"{a} - {b}", f"{a} * {b}", f"{a} * {c} + {b}", f"({a} + {b}) * {c}",
                       f"{a} ** 2", f"{a * c} / {c}", f"{a} % {c}"])


def dialogue(rng: random.Random, sentences: list[str], greetings: list[Messages]) -> Messages:
    """One dialogue: a question, the call that answers it, its real result, the answer; or a greeting with no
    call (about one in six)."""
    kind = rng.random()
    if kind < 1 / 6:
        return calls.attach(rng.choice(greetings), TOOLS)
    if kind < 4 / 6:
        expression = _expression(rng)
        question, name, args = rng.choice(ARITHMETIC).format(e=expression), "calculator", {"expression": expression}
    else:
        sentence = rng.choice(sentences)
        question, name, args = rng.choice(COUNTING).format(s=sentence), "word_count", {"text": sentence}
    result = RUN[name](args)
    answer = (f"{args['expression']} = {result}." if name == "calculator" else
              f'"{args["text"]}" has {result} word{"s" if result != "1" else ""}.')
    return calls.attach([{"role": "user", "content": question},
                         {"role": "assistant", "content": None, "tool_calls": [calls.call(name, args)]},
                         {"role": "tool", "name": name, "content": result},
                         {"role": "assistant", "content": answer}], TOOLS)


def dialogues(corpus: list[Messages], count: int, seed: int = 0) -> Iterator[Messages]:
    """`count` distinct dialogues built from `corpus` (chatterbot dialogues: their questions are counted, their
    short two-turn exchanges are the greetings), the same for the same seed."""
    sentences = sorted({d[0]["content"] for d in corpus if 3 <= len(d[0]["content"].split()) <= 12
                        and '"' not in d[0]["content"]})
    greetings = [d[:2] for d in corpus if len(d[0]["content"]) < 40 and len(d[1]["content"]) < 80]
    rng, seen = random.Random(seed), set()
    while len(seen) < count:
        d = dialogue(rng, sentences, greetings)
        if d[0]["content"] not in seen:
            seen.add(d[0]["content"])
            yield d
