"""Answer prompts with a trained model, or chat with it.

Loads a model directory (or Hub id) or a complete, intact training checkpoint (every file checked against
its recorded digest), renders prompts with the model's saved chat template, samples, and stops at the
template's end token.

  python tools/generate.py outputs/quickstart/final                    # built-in coding prompts
  python tools/generate.py outputs/quickstart/checkpoints              # its newest intact checkpoint
  python tools/generate.py MODEL --prompts-file prompts.txt --out answers.md --temperature 0.7
  python tools/generate.py MODEL --held-out outputs/quickstart --compare artifacts/tiny-starcoder
                                # questions the run held out, with the base model's answers beside
  python tools/generate.py MODEL --chat                                # interactive, streams tokens
  python tools/generate.py MODEL --tools tools.json --prompts-file q.txt   # offer tools; calls shown parsed

In --chat mode each line you type is a user turn and the conversation is kept across turns, with line
editing and a history kept between sessions (~/.cache/loop/chat_history); Ctrl-C cancels the answer
being written, /reset starts over, /save FILE appends the conversation as a messages-schema JSON line
(there must be one to save), an empty line is ignored, an unknown /command is refused (not sent to the model),
and Ctrl-D, /quit or /exit (or Ctrl-C at the prompt) ends.

With --tools FILE (a JSON list of function definitions, or {"tools": [...]}, as apply_chat_template takes them)
the tools are rendered into every prompt, and a tool call the model writes is printed as a structured call:
its name and its parsed arguments (or what is malformed about it). In --chat mode you then type each call's
result, and the model goes on with it.
Answers in batch mode are written to ./answers.md (RUN_DIR/answers.md with --held-out) unless --out says
otherwise.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import NoReturn

from loop import config
from loop.data import calls, templates
from loop.data.prepare import held_out_prompts
from loop.data.records import DataError, looks_like_hub_id
from loop.engine.safe_load import ConsolidationError
from loop.inference import chat, sampling, toolcalls
from loop.inference.load import load_for_generation
from loop.report import timings
from loop.state.checkpoints import CheckpointError

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


def fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def load(name: str):
    if not Path(name).exists() and not looks_like_hub_id(name):  # else the Hub library's "Repo id must be ..."
        fail(f"not found: {name}")
    try:
        return load_for_generation(name)
    except (CheckpointError, ConsolidationError, OSError, ValueError) as e:
        fail(f"{name}: cannot load a model from it ({e})")


def questions(a: argparse.Namespace) -> list[str]:
    """The held-out questions of a run, the lines of a prompts file, or the built-in coding prompts."""
    if a.held_out:
        try:
            return held_out_prompts(config.from_file(a.held_out / "config.yaml").data, a.count)
        except (config.ConfigError, DataError, OSError) as e:
            fail(f"--held-out {a.held_out}: {e}")
    if a.prompts_file:
        if problem := config.not_a_file(a.prompts_file):  # a named pipe would wait forever
            fail(f"--prompts-file {a.prompts_file} {problem}")
        try:
            return [line.strip() for line in a.prompts_file.read_text().splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            fail(f"--prompts-file: {e}")
    return BUILT_IN_PROMPTS


def offered(path: Path | None) -> list[dict] | None:
    """The tools of --tools FILE, checked before a model is loaded."""
    if path is None:
        return None
    if problem := config.not_a_file(path):  # a named pipe would wait forever
        fail(f"--tools {path} {problem}")
    try:
        return calls.read_tools(path.read_text(), f"--tools {path}")
    except OSError as e:
        fail(f"--tools {path}: cannot be read ({e.strerror or e})")
    except ValueError as e:
        fail(str(e))


def shown(answer: str, tools: list[dict] | None, parser: str = "hermes") -> str:
    """An answer with each tool call in it (written as `parser`, a templates.tool_parser name, reads it) shown as a
    structured call (name and parsed arguments)."""
    if tools is None:
        return answer
    text, found = toolcalls.parse(answer, parser, tools)
    names = [calls.tool_name(t) for t in tools]
    return "\n".join([*([text] if text else []), *(f"- tool call: {calls.describe(c, names)}" for c in found)])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="model directory, Hub id, or a checkpoint folder (step_N)")
    p.add_argument("--prompts-file", type=Path, help="one prompt per line (default: built-in coding prompts)")
    p.add_argument("--held-out", type=Path, metavar="RUN_DIR",
                   help="ask questions the run in RUN_DIR held out for evaluation (from its config.yaml)")
    p.add_argument("--count", type=int, default=6, help="how many held-out questions (default 6)")
    p.add_argument("--compare", metavar="BASE", help="also answer with this model (the base), side by side")
    p.add_argument("--out", type=Path, help="write answers here (default RUN_DIR/answers.md with --held-out, "
                                            "else ./answers.md)")
    p.add_argument("--chat", action="store_true", help="interactive multi-turn chat, streaming tokens")
    p.add_argument("--tools", type=Path, metavar="FILE",
                   help="a JSON list of tool (function) definitions to offer the model; its calls are shown parsed")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.2, help="0 means greedy")
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--repetition-penalty", type=float, default=1.2)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    started = time.monotonic()
    import torch

    prompts = [] if a.chat else questions(a)  # bad arguments fail before a model is loaded
    a.out = a.out or (a.held_out / "answers.md" if a.held_out else Path("answers.md"))
    tools = offered(a.tools)
    torch.manual_seed(a.seed)
    model, tokenizer = load(a.model)
    if tokenizer.chat_template is None:
        fail(f"{a.model}: its tokenizer has no chat template, so there is no way to ask it a question (a pretrained "
             "base?); use a model saved by loop/train.py, or pass a base as --compare next to one")
    if tools and not templates.renders_tools(tokenizer.chat_template):
        fail(f"{a.model}: its chat template does not render tools, so --tools would not reach the model")
    cfg = sampling.SamplingConfig(max_new_tokens=a.max_new_tokens, do_sample=a.temperature > 0,
                                  temperature=a.temperature or 1.0, top_k=a.top_k, top_p=a.top_p,
                                  repetition_penalty=a.repetition_penalty)
    stop = sampling.end_token_id(tokenizer, model)
    if a.chat:
        chat.chat(model, tokenizer, cfg, stop, tools=tools)
        return 0
    conversations = [calls.attach([{"role": "user", "content": q}], tools) for q in prompts]
    parser = templates.tool_parser(tokenizer.chat_template)
    answers = [shown(ans, tools, parser) for ans in sampling.answer(model, tokenizer, conversations, cfg, stop)]
    if a.compare:
        base, base_tokenizer = load(a.compare)
        if base_tokenizer.chat_template is None:  # a pretrained base: ask it the same rendered prompt
            base_tokenizer.chat_template = tokenizer.chat_template
        torch.manual_seed(a.seed)
        base_parser = templates.tool_parser(base_tokenizer.chat_template)
        said = sampling.answer(base, base_tokenizer, conversations, cfg, sampling.end_token_id(base_tokenizer, base))
        before = [shown(ans, tools, base_parser) for ans in said]
        text = "\n\n".join(f"## {q}\n\n- before ({a.compare}): {b}\n- after ({a.model}): {ans}"
                             for q, b, ans in zip(prompts, before, answers))
    else:
        text = "\n\n".join(f"## {q}\n\n{ans}" for q, ans in zip(prompts, answers))
    try:
        a.out.write_text(text + "\n")
    except OSError as e:
        print(text)
        fail(f"--out {a.out}: cannot write the answers ({e.strerror or e}); they are printed above")
    print(text)
    print(f"\nwrote {len(answers)} answers to {a.out}")
    if a.held_out and (a.held_out / timings.FILE).is_file():  # the end of the quickstart: where its time went
        print(timings.describe(timings.record(a.held_out, {"answers": time.monotonic() - started})))
    return 0


if __name__ == "__main__":
    sys.exit(main())
