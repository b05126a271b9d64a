"""Converters from the record shapes users hold to the messages schema.

Every format is registered the same way: a converter takes one file's records, each with its
location (`file:line` or `file[i]`), and yields (location, dialogue) or (location, problem). Most
formats read one record at a time (`per_record`: a record may hold several dialogues, as a
chatterbot file does); an OpenAssistant tree spans many records (oasst.py). A problem is either
a `FormatError` (a bad record: listed, or skipped and counted under `data.on_bad_record: skip`) or a
`Dropped` (left out by design, such as a deleted OpenAssistant message: always counted). A converter
never raises on what a record holds: nothing is dropped silently.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator
from typing import Any, get_args

from loop.config import Format, OasstPaths
from loop.data import calls
from loop.data import oasst as trees
from loop.data.records import Converted, Dropped, FormatError, Located, Messages, parse_json, text_field


def messages(record: Any) -> list[Messages]:
    """`{"messages": [...]}`, with the dialogue's `tools` beside them where it offers any (a list, or that list
    as a JSON string, as some function-calling sets keep it); OpenAI's older `functions` / `function_call`
    shape is converted to the same."""
    if not isinstance(record, dict):
        raise FormatError("record is not an object")
    if "messages" not in record:
        raise FormatError("no 'messages' field")
    found = record["messages"]  # its shape is checked by data.validate, like every converted dialogue
    if not isinstance(found, list):
        return [found]
    older = (isinstance(m, dict) and (m.get("function_call") is not None or m.get("role") == "function") for m in found)
    if "functions" in record or any(older):
        return [openai_functions(record, found)]
    return [calls.attach(found, tools_field(record))]


def tools_field(record: dict, key: str = "tools") -> Any:
    """A record's tool list, parsed when it is kept as JSON text; None when it has none."""
    tools = record.get(key)
    if isinstance(tools, str):
        if not tools.strip():
            return None
        tools = parse_json(tools)
        if isinstance(tools, Exception):
            raise FormatError(f"field {key!r}: {tools}")
    return tools if tools != [] else None


def prompt_completion(record: Any) -> list[Messages]:
    """`{"prompt": str, "completion": str}`, or TRL's conversational shape with a list of messages on each side
    (the two lists are one dialogue; as everywhere in this loop, its assistant turns are what trains)."""
    if not isinstance(record, dict):
        raise FormatError("record is not an object")
    prompt, completion = record.get("prompt"), record.get("completion")
    if isinstance(prompt, list) or isinstance(completion, list):
        if not (isinstance(prompt, list) and isinstance(completion, list)):
            raise FormatError("a conversational record needs 'prompt' and 'completion' both as lists of messages")
        return [prompt + completion]
    return [[{"role": "user", "content": text_field(record, "prompt")},
             {"role": "assistant", "content": text_field(record, "completion")}]]


SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant"}
# Function-calling ShareGPT (LLaMA-Factory's shape, which glaive / xLAM-style sets are converted to): a call turn
# holds a {"name", "arguments"} object (or a list of them) as JSON text, an observation turn the result; the
# record's `tools` (JSON text or a list) and `system` sit beside the conversations.
SHAREGPT_TOOL_TURNS = {"function_call", "observation"}


def sharegpt(record: Any) -> list[Messages]:
    turns = record.get("conversations") if isinstance(record, dict) else None
    if not isinstance(turns, list):
        raise FormatError("no 'conversations' list")
    out = []
    system = record.get("system")
    if isinstance(system, str) and system.strip():
        out.append({"role": "system", "content": system})
    for i, turn in enumerate(turns):
        speaker = turn.get("from") if isinstance(turn, dict) else None
        if not isinstance(speaker, str) or speaker not in SHAREGPT_ROLES.keys() | SHAREGPT_TOOL_TURNS:
            raise FormatError(f"conversations[{i}]: 'from' must be one of "
                              f"{sorted(SHAREGPT_ROLES.keys() | SHAREGPT_TOOL_TURNS)}, got {speaker!r}")
        try:
            value = text_field(turn, "value")
            if speaker == "function_call":
                out.append({"role": "assistant", "content": None, "tool_calls": _calls_of(parse_json(value))})
            else:
                out.append({"role": "tool" if speaker == "observation" else SHAREGPT_ROLES[speaker],
                            "content": value})
        except FormatError as e:
            raise FormatError(f"conversations[{i}]: {e}") from None
    return [calls.attach(out, calls.wrapped(tools_field(record)))]


def _calls_of(value: Any) -> list[dict]:
    """A call turn's `{"name", "arguments"}` object (or list of them) as schema tool_calls."""
    if isinstance(value, Exception):
        raise FormatError(f"a function_call value must be a JSON {{name, arguments}} object: {value}")
    found = value if isinstance(value, list) else [value]
    if not found or not all(isinstance(c, dict) and isinstance(c.get("name"), str) for c in found):
        raise FormatError("a function_call value must be a {name, arguments} object or a list of them")
    return [calls.call(c["name"], c.get("arguments", {})) for c in found]


def openai_functions(record: dict, found: Messages) -> Messages:
    """OpenAI's older function-calling shape in the schema: `functions` (bare definitions) become `tools`, an
    assistant's `function_call` one tool call, a `function` message a tool result named by the function."""
    functions = tools_field(record, "functions")
    if functions is not None and record.get("tools") is not None:
        raise FormatError("a record gives both 'tools' and the older 'functions'; keep one")
    out = []
    for i, m in enumerate(found):
        if not isinstance(m, dict) or (m.get("function_call") is None and m.get("role") != "function"):
            out.append({k: v for k, v in m.items() if k != "function_call"} if isinstance(m, dict) else m)
        elif m.get("role") == "function":
            out.append({**{k: v for k, v in m.items() if k != "role"}, "role": "tool"})
        else:
            made = m["function_call"]
            if not isinstance(made, dict) or not isinstance(made.get("name"), str):
                raise FormatError(f"messages[{i}]: function_call must be an object with a name and arguments")
            out.append({**{k: v for k, v in m.items() if k != "function_call"},
                        "tool_calls": [calls.call(made["name"], made.get("arguments", {}))]})
    if functions is None:
        return out
    if not isinstance(functions, list):
        raise FormatError(f"field 'functions' must be a list of function definitions, got {type(functions).__name__}")
    return calls.attach(out, calls.wrapped(functions))


def alpaca(record: Any) -> list[Messages]:
    if not isinstance(record, dict):
        raise FormatError("record is not an object")
    instruction, extra = text_field(record, "instruction"), text_field(record, "input", optional=True)
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return [[{"role": "user", "content": prompt}, {"role": "assistant", "content": text_field(record, "output")}]]


def chatterbot(record: Any) -> list[Messages | Exception]:
    """One chatterbot-corpus YAML document: `conversations: [[turn, turn, ...], ...]`.

    Turns alternate user / assistant and are kept as written (the file is read without YAML's type
    guessing, so `yes` stays "yes"). A trailing user turn has no answer: it is left out, and counted.
    """
    conversations = record.get("conversations") if isinstance(record, dict) else None
    if not isinstance(conversations, list):
        raise FormatError("no 'conversations' list")
    found: list[Messages | Exception] = []
    for conv in conversations:
        if not isinstance(conv, list) or not all(isinstance(t, str) for t in conv):
            found.append(FormatError("a conversation must be a list of text turns"))
            continue
        if len(conv) < 2:
            found.append(FormatError(f"a conversation needs a question and an answer, got {len(conv)} turn(s)"))
            continue
        if len(conv) % 2:
            found.append(Dropped("unanswered_last_turn", "the last turn has no answer and is left out"))
        found.append([{"role": "user" if i % 2 == 0 else "assistant", "content": t.strip()}
                      for i, t in enumerate(conv[: len(conv) // 2 * 2])])
    return found


def per_record(convert: Callable[[Any], list]) -> Callable[..., Iterator[Converted]]:
    """A file converter from a converter of single records (which may return several dialogues or
    problems; each gets its own `#k` location)."""

    @functools.wraps(convert)
    def each(path: str, records: Iterable[Located], **_options) -> Iterator[Converted]:
        for where, record in records:
            if isinstance(record, Exception):
                yield where, record
                continue
            try:
                found = convert(record)
            except FormatError as e:
                yield where, e
                continue
            for j, item in enumerate(found):
                yield (where if len(found) == 1 else f"{where}#{j}"), item

    return each


def oasst(path: str, records: Iterable[Located], oasst_paths: OasstPaths = "longest",
          **_options) -> Iterator[Converted]:
    return trees.dialogues(list(records), oasst_paths)


CONVERTERS: dict[str, Callable[..., Iterator[Converted]]] = {
    "messages": per_record(messages),
    "prompt_completion": per_record(prompt_completion),
    "sharegpt": per_record(sharegpt),
    "alpaca": per_record(alpaca),
    "chatterbot": per_record(chatterbot),
    "oasst": oasst,
}
assert set(CONVERTERS) | {"auto"} == set(get_args(Format))


def convert(fmt: Format, path: str, records: Iterable[Located],
            oasst_paths: OasstPaths = "longest") -> Iterator[Converted]:
    """Every dialogue (or problem) of one file's records, with its location."""
    return CONVERTERS[fmt](path, records, oasst_paths=oasst_paths)


def _is_sharegpt(turns: Any) -> bool:
    return isinstance(turns, list) and bool(turns) and isinstance(turns[0], dict) and "from" in turns[0]


# What each format's records look like, checked in this order on a source's first records (data.format: auto).
SIGNATURES: dict[str, Callable[[dict], bool]] = {
    "messages": lambda r: isinstance(r.get("messages"), list),
    "sharegpt": lambda r: _is_sharegpt(r.get("conversations")),
    "chatterbot": lambda r: isinstance(r.get("conversations"), list) and not _is_sharegpt(r["conversations"]),
    "oasst": lambda r: {"message_id", "role", "text"} <= r.keys(),
    "prompt_completion": lambda r: "prompt" in r and "completion" in r,
    "alpaca": lambda r: "instruction" in r and "output" in r,
}
PREFERENCE_KEYS = {"chosen", "rejected"}  # preference pairs: another objective's data, not dialogues


def looks_like(record: Any) -> str | None:
    """The format whose records look like this one, or None."""
    if not isinstance(record, dict):
        return None
    return next((fmt for fmt, matches in SIGNATURES.items() if matches(record)), None)


def detect(path: str, sample: list[Located]) -> str:
    """The format of a source from its first records (data.format: auto), or a FormatError that says what
    they look like instead."""
    records = [r for _, r in sample if isinstance(r, dict)]
    if not records:  # nothing to recognise: an empty source, or records none of which can be read (all bad)
        return "messages"
    found = [f for f in map(looks_like, records) if f]
    if found:
        return max(dict.fromkeys(found), key=found.count)  # the most common; ties go to the first seen
    keys = sorted({k for r in records for k in r})
    if PREFERENCE_KEYS <= set(keys):
        raise FormatError(f"{path}: its records are preference pairs (chosen / rejected), not dialogues; train "
                          "them with training.objective: dpo")
    raise FormatError(f"{path}: no known record shape in its first records (fields {keys[:12]}); set data.format "
                      f"(one of {sorted(SIGNATURES)}) or map its fields with columns: {{FIELD: messages}}")


def hint(fmt: str, records: list[Any]) -> str | None:
    """When records meant as `fmt` look like another format: what to set instead."""
    other = [f for f in map(looks_like, records) if f and f != fmt]
    if not other:
        return None
    best = max(dict.fromkeys(other), key=other.count)
    return f"these records look like {best}: set data.format: {best} (or format: {best} on this source)"
