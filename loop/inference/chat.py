"""An interactive multi-turn chat on the terminal, streaming each answer (tools/generate.py --chat)."""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

from loop.data import calls, templates
from loop.inference import sampling, toolcalls

QUIT = ("/quit", "/exit")
COMMANDS = "/reset, /save FILE, /quit, /exit"
COMMAND = re.compile(r"/[A-Za-z]+")  # a line whose first word is this is a command; /usr/bin/env is text


def history_file() -> Path:
    """Where the lines typed in any chat are kept between sessions (the user's cache, not the model's folder,
    which may be read-only or shared)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "loop" / "chat_history"


@contextlib.contextmanager
def line_editing(path: Path) -> Iterator[None]:
    """readline's line editing, with the history of earlier sessions loaded and this one's saved on the way out."""
    try:
        import readline
    except ImportError:  # not on every platform
        yield
        return
    with contextlib.suppress(OSError):
        readline.read_history_file(path)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            path.parent.mkdir(parents=True, exist_ok=True)
            readline.set_history_length(1000)
            readline.write_history_file(path)


def chat(model, tokenizer, cfg: sampling.SamplingConfig, stop, read=input, write=print,
         history: Path | None = None, tools: list[dict] | None = None) -> None:
    """An interactive multi-turn chat that streams each answer: line editing, and history kept between sessions
    (readline, on a terminal); Ctrl-C cancels the answer being written (at the prompt it ends the chat); /reset
    starts over; /save FILE appends the conversation as a messages-schema JSON line (an empty one is not
    saved); an empty line is ignored, and an unknown /command refused; Ctrl-D, /quit or /exit ends. With
    `tools` every prompt offers them; each call the model makes is shown as a structured call and its result
    is asked for (a line you type), then the model goes on."""
    with line_editing(history or history_file()):
        _talk(model, tokenizer, cfg, stop, read, write, tools)


def _results(made: list[dict], read, write) -> list[dict] | None:
    """The tool messages answering `made` calls, each result typed by the user (None: the chat ends)."""
    out = []
    for c in made:
        try:
            result = read(f"result of {c['name']}> ")
        except (EOFError, KeyboardInterrupt):
            write("")
            return None
        out.append({"role": "tool", "name": c["name"], "content": result})
    return out


def _talk(model, tokenizer, cfg: sampling.SamplingConfig, stop, read, write, tools: list[dict] | None) -> None:
    from transformers import TextStreamer

    conversation: list[dict] = []
    names = None if tools is None else [calls.tool_name(t) for t in tools]
    parser = templates.tool_parser(getattr(tokenizer, "chat_template", None))  # the calls' format, as trained
    write("chat: type a message; /reset starts over, /save FILE keeps the conversation, Ctrl-D or /quit ends")
    while True:
        try:
            line = read("user> ").strip()
        except (EOFError, KeyboardInterrupt):
            write("")
            return
        if not line:
            continue
        if line in QUIT:
            return
        if line == "/reset":
            conversation = []
            write("(conversation cleared)")
            continue
        if line.startswith("/save"):
            target = line.removeprefix("/save").strip()
            if not target:
                write("usage: /save FILE")
                continue
            if not conversation:  # an empty dialogue is no record: the messages schema refuses it
                write("nothing to save yet: the conversation is empty")
                continue
            with open(target, "a") as f:
                f.write(json.dumps({"messages": conversation, **({"tools": tools} if tools else {})},
                                   ensure_ascii=False) + "\n")
            write(f"saved {len(conversation)} messages to {target}")
            continue
        if COMMAND.fullmatch(line.split()[0]):  # a mistyped command is not a question for the model
            write(f"unknown command {line.split()[0]}; the commands are {COMMANDS}")
            continue
        conversation.append({"role": "user", "content": line})
        while True:  # answers, and after each tool call its results, until an answer calls nothing
            write("assistant> ", end="", flush=True)
            # A streamer of its own for each answer: one left by a cancelled answer would print the next prompt.
            streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
            try:
                (reply,) = sampling.answer(model, tokenizer, [calls.attach(conversation, tools)], cfg, stop,
                                           streamer=streamer)
            except KeyboardInterrupt:
                write("\n(cancelled)")
                while conversation and conversation.pop()["role"] != "user":
                    pass  # back to before the line typed: its calls and results go with it
                break
            text, found = toolcalls.parse(reply, parser, tools) if tools is not None else (reply, [])
            made = [c for c in found if "error" not in c]
            for c in found:
                write(f"tool call: {calls.describe(c, names)}")
            if not made:
                conversation.append({"role": "assistant", "content": reply})
                break
            conversation.append({"role": "assistant", "content": text or None,
                                 "tool_calls": [calls.call(c["name"], c["arguments"]) for c in made]})
            results = _results(made, read, write)
            if results is None:
                return
            conversation += results
