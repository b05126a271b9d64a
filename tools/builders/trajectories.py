"""Long agent trajectories over this repository: sessions in which a user asks about the code, the assistant looks
with tools (list_dir, read_file, grep), each result the real folder listing, file or search of the checkout it is
built from, and answers from what it read; one session runs task after task until it reaches its length, 8k-40k
tokens by default. Built by tools/make_long_data.py, deterministic: the same checkout, seed and tokenizer write the
same file. Long data the project can make without a download, for long rows (configs/long-trajectories-32k.yaml).

Each session is a dialogue in the messages schema with its `tools` list (data/calls.py), valid as any source
(dialogues.validate), and ends every task on an answer that calls no tool, so a row too short for it is cut
between tasks (tokenize.cut_points), never inside one. The answers are computed from the files read (a module's
docstring and definitions, where a name is defined and used, the tests of a module, a config's settings), so no
answer says anything its tool results do not show.
"""

from __future__ import annotations

import ast
import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import yaml

from loop.data import calls
from loop.data.dialogues import validate
from loop.data.records import Messages

ROOT = Path(__file__).resolve().parents[2]  # the checkout the trajectories read
FOLDERS = ("loop", "tools", "tests", "configs", "accelerate_configs", "docs")  # what a session may look at
TOP_FILES = ("README.md", "setup.cfg")
SUFFIXES = (".py", ".md", ".yaml", ".cfg", ".json", ".sh", ".jinja")
MAX_FILE_CHARS = 40_000  # a larger file is left out: one read stays well inside a 32k row
MAX_MATCHES = 40  # grep results shown; the rest counted
PER_MESSAGE = 10  # tokens a template adds around a message or a call (markers, tags): counted, not measured
SYSTEM = ("You are a coding assistant working in a Python repository: a training loop that fine-tunes code models "
          "on dialogues. Look at the files with the tools before you answer, and name the files you cite.")


def _tool(name: str, description: str, **params: str) -> dict:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": {k: {"type": "string", "description": v} for k, v in params.items()},
        "required": list(params)}}}


TOOLS = [_tool("list_dir", "List a folder of the repository; sub-folders end with /.",
               path="a folder, relative to the repository root (. for the root)"),
         _tool("read_file", "Read a file of the repository.", path="a file, relative to the repository root"),
         _tool("grep", "Find the lines that contain a text in the files under a folder.",
               text="the text to find, as it is written (not a pattern)", path="a folder, relative to the root")]


@dataclass(frozen=True)
class Repository:
    """The files a session can see (path -> text, in path order), read once from the checkout."""

    files: dict[str, str]

    @classmethod
    def read(cls, root: Path = ROOT) -> Repository:
        paths = [root / p for p in TOP_FILES] + [p for f in FOLDERS for p in (root / f).rglob("*")]
        found = {}
        for p in sorted(paths):
            rel = p.relative_to(root).as_posix()
            if (p.suffix not in SUFFIXES or not p.is_file() or "__pycache__" in rel
                    or any(part.startswith(".") for part in p.relative_to(root).parts)):
                continue
            try:
                text = p.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            if text.strip() and len(text) <= MAX_FILE_CHARS:
                found[rel] = text
        return cls(dict(sorted(found.items())))

    def list_dir(self, path: str) -> str:
        prefix = "" if path in (".", "") else path.rstrip("/") + "/"
        entries = sorted({p[len(prefix):].split("/")[0] + ("/" if "/" in p[len(prefix):] else "")
                          for p in self.files if p.startswith(prefix)})
        return "\n".join(entries) if entries else f"error: no folder {path}"

    def read_file(self, path: str) -> str:
        return self.files.get(path, f"error: no file {path}")

    def grep(self, text: str, path: str) -> str:
        prefix = "" if path in (".", "") else path.rstrip("/") + "/"
        hits = [f"{p}:{n}: {line.strip()}" for p, body in self.files.items() if p.startswith(prefix)
                for n, line in enumerate(body.splitlines(), 1) if text in line]
        more = f"\n... {len(hits) - MAX_MATCHES} more lines" if len(hits) > MAX_MATCHES else ""
        return "\n".join(hits[:MAX_MATCHES]) + more if hits else "no match"

    def run(self, name: str, args: dict) -> str:
        """A tool's result, computed for real."""
        if name == "grep":
            return self.grep(args["text"], args["path"])
        return getattr(self, name)(args["path"])

    @cached_property
    def modules(self) -> list[tuple[str, ast.Module]]:
        """The Python files of loop/ and tools/ with a module docstring, parsed (once)."""
        found = []
        for p, text in self.files.items():
            if p.endswith(".py") and p.startswith(("loop/", "tools/")):
                try:
                    tree = ast.parse(text)
                except SyntaxError:
                    continue
                if ast.get_docstring(tree):
                    found.append((p, tree))
        return found


# A task: (question, rounds of (what the assistant says, the calls it makes), the answer)
Task = tuple[str, list[tuple[str, list[tuple[str, dict]]]], str]


def _first_paragraph(doc: str | None) -> str:
    return " ".join((doc or "").strip().split("\n\n")[0].split())


def _defined(tree: ast.Module) -> list[ast.FunctionDef | ast.ClassDef]:
    return [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and not n.name.startswith("_")]


def _names(names: list[str], at_most: int = 20) -> str:
    shown = ", ".join(f"`{n}`" for n in names[:at_most])
    return shown + (f" and {len(names) - at_most} more" if len(names) > at_most else "")


def overview(rng: random.Random, repo: Repository) -> Task:
    path, tree = rng.choice(repo.modules)
    question = rng.choice(["What does `{p}` do?", "Give me an overview of `{p}`: what is it for, what does it define?",
                           "I am new to this code base. Explain `{p}` to me."]).format(p=path)
    parent = path.rsplit("/", 1)[0]
    defined = [n.name for n in _defined(tree)]
    answer = (f"`{path}` ({len(repo.files[path].splitlines())} lines): {_first_paragraph(ast.get_docstring(tree))}"
              + (f"\n\nIt defines {_names(defined)}." if defined else "\n\nIt defines no public function or class."))
    return question, [("Let me see where it sits first.", [("list_dir", {"path": parent})]),
                      ("Now the module itself.", [("read_file", {"path": path})])], answer


def uses(rng: random.Random, repo: Repository) -> Task:
    path, tree = rng.choice([(p, t) for p, t in repo.modules if any(
        isinstance(n, ast.FunctionDef) for n in _defined(t))])
    node = rng.choice([n for n in _defined(tree) if isinstance(n, ast.FunctionDef)])
    found = repo.grep(node.name, ".")  # the answer names only the files the search shows
    others = sorted({hit.split(":", 1)[0] for hit in found.splitlines()[:MAX_MATCHES] if ":" in hit} - {path})
    shown = " (of the lines the search shows)" if found.endswith(" more lines") else ""
    question = rng.choice(["Where is `{n}` used?", "Who calls `{n}`, and where is it defined?",
                           "I want to change `{n}`. What else would that touch?"]).format(n=node.name)
    doc = _first_paragraph(ast.get_docstring(node))
    answer = (f"`{node.name}` is defined in `{path}` at line {node.lineno}" + (f": {doc}" if doc else ".")
              + (f"\n\nBesides its own module, {len(others)} file(s) mention it{shown}: {_names(others)}."
                 if others else "\n\nNo other file mentions it: only its own module uses it."))
    return question, [("First, where is it defined?", [("grep", {"text": f"def {node.name}(", "path": "."})]),
                      ("Let me read that module.", [("read_file", {"path": path})]),
                      ("Now every mention of it.", [("grep", {"text": node.name, "path": "."})])], answer


def tests_of(rng: random.Random, repo: Repository) -> Task:
    pairs = [(p, "tests/" + "/".join(p.split("/")[1:-1] + ["test_" + p.split("/")[-1]]))
             for p, _ in repo.modules if p.startswith("loop/")]
    module, test = rng.choice([(m, t) for m, t in pairs if t in repo.files])
    tree = ast.parse(repo.files[test])
    found = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")]
    lines = [f"- `{n.name}`: " + (_first_paragraph(ast.get_docstring(n)) or n.name[5:].replace("_", " "))
             for n in found]
    question = rng.choice(["Which tests cover `{m}`, and what do they check?",
                           "How is `{m}` tested?"]).format(m=module)
    answer = f"`{test}` tests `{module}` with {len(found)} test function(s):\n" + "\n".join(lines)
    return question, [("Let me look at the tests folder.", [("list_dir", {"path": test.rsplit("/", 1)[0]})]),
                      ("I'll read the module and its tests side by side.",
                       [("read_file", {"path": module}), ("read_file", {"path": test})])], answer


def recipe(rng: random.Random, repo: Repository) -> Task:
    path = rng.choice([p for p in repo.files if p.startswith("configs/") and p.endswith(".yaml")])
    cfg = yaml.safe_load(repo.files[path]) or {}
    model, data, training = (cfg.get(k) or {} for k in ("model", "data", "training"))
    said = [f"the model `{model['name_or_path']}`" if "name_or_path" in model else "the default model"]
    if data.get("train_files"):
        sources = [str(f.get("path", f) if isinstance(f, dict) else f) for f in data["train_files"]]
        said.append(f"trained on {_names(sources)}")
    for key, label in (("seq_len", "rows of {} tokens"), ("template", "the {} template"), ("packing", "packing {}")):
        if key in data:
            said.append(label.format(data[key]))
    for key, label in (("objective", "objective {}"), ("micro_batch_size", "micro-batch {}"),
                       ("gradient_accumulation_steps", "{} micro-batches a step"), ("lr", "learning rate {}"),
                       ("num_epochs", "{} epoch(s)"), ("max_steps", "{} steps")):
        if key in training:
            said.append(label.format(training[key]))
    question = rng.choice(["What does `{c}` set up?", "Summarize the recipe in `{c}`."]).format(c=path)
    answer = f"`{path}` sets up " + ", ".join(said) + "."
    return question, [("Let me list the configs.", [("list_dir", {"path": "configs"})]),
                      ("Now this one.", [("read_file", {"path": path})])], answer


TASKS: tuple[Callable[[random.Random, Repository], Task], ...] = (overview, uses, tests_of, recipe)


def messages_of(task: Task, repo: Repository, first_id: int) -> Messages:
    """A task as messages: the question, each round's calls and their real results, the answer."""
    question, rounds, answer = task
    out: Messages = [{"role": "user", "content": question}]
    n = first_id
    for said, made in rounds:
        ids = [f"call{n + k:05d}" for k in range(len(made))]  # 9 characters, as Mistral's template wants them
        n += len(made)
        out.append({"role": "assistant", "content": said,
                    "tool_calls": [calls.call(name, args, i) for (name, args), i in zip(made, ids)]})
        out += [{"role": "tool", "tool_call_id": i, "name": name, "content": repo.run(name, args)}
                for (name, args), i in zip(made, ids)]
    return out + [{"role": "assistant", "content": answer}]


def counter(tokenizer) -> Callable[[list[str]], int]:
    """Tokens of texts by the tokenizer (a template adds PER_MESSAGE around each)."""
    backend = tokenizer.backend_tokenizer
    return lambda texts: sum(len(e.ids) for e in backend.encode_batch(texts, add_special_tokens=False)) + \
        PER_MESSAGE * len(texts)


def texts(messages: Messages, tools: list | None = None) -> list[str]:
    """What a session's length is counted over: each message's text, each call, the tool list."""
    return ([m["content"] or "" for m in messages] + [json.dumps(c["function"], ensure_ascii=False)
                                                      for m in messages for c in m.get("tool_calls") or []]
            + ([json.dumps(tools)] if tools else []))


def sessions(repo: Repository, count_tokens: Callable[[list[str]], int], count: int, seed: int = 0,
             min_tokens: int = 8000, max_tokens: int = 40_000) -> Iterator[Messages]:
    """`count` sessions, each aiming at a length drawn between min_tokens and max_tokens (by count_tokens) and
    never over max_tokens; the same for the same repository, counter and seed."""
    rng = random.Random(seed)
    base = [{"role": "system", "content": SYSTEM}]
    base_tokens = count_tokens(texts(base, TOOLS))
    for _ in range(count):
        target, dialogue, used, n, misses = rng.randint(min_tokens, max_tokens), list(base), base_tokens, 1, 0
        while used < target and misses < 20:
            task = messages_of(rng.choice(TASKS)(rng, repo), repo, n)
            cost = count_tokens(texts(task))
            if used + cost > max_tokens:
                misses += 1
                continue
            dialogue += task
            used += cost
            n += sum(len(m.get("tool_calls") or []) for m in task)
        made = calls.attach(dialogue, TOOLS)
        if problem := validate(made):  # the builder's own mistake, never a user's: stop loudly
            raise AssertionError(f"built an invalid dialogue: {problem}")
        yield made
