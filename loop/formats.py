"""Converters from the record shapes users hold to the messages schema.

Every format is registered the same way: a converter takes one file's records, each with its
location (`file:line` or `file[i]`), and yields (location, dialogue) or (location, error). Most
formats read one record at a time (`per_record`: a record may hold several dialogues, as a
chatterbot file does); an OpenAssistant tree spans many records, so that converter reads them all.
A record that cannot be read, including one its file reader could not parse, comes out as an error,
so that the caller lists or counts it: nothing is dropped silently.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Literal, get_args

Messages = list[dict[str, str]]
Format = Literal["messages", "prompt_completion", "sharegpt", "alpaca", "oasst", "chatterbot"]
OasstPaths = Literal["longest", "all"]
Located = tuple[str, Any]  # (location, raw record, or the exception its reader raised)
Converted = tuple[str, "Messages | Exception"]


class FormatError(ValueError):
    """A record does not have the shape its format promises."""


def _text(record: dict, key: str) -> str:
    value = record.get(key)
    if not isinstance(value, str):
        raise FormatError(f"field {key!r} is missing or not a string")
    return value


def messages(record: Any) -> list[Messages]:
    if not isinstance(record, dict) or "messages" not in record:
        raise FormatError("no 'messages' field")
    return [record["messages"]]


def prompt_completion(record: Any) -> list[Messages]:
    if not isinstance(record, dict):
        raise FormatError("record is not an object")
    return [[{"role": "user", "content": _text(record, "prompt")},
             {"role": "assistant", "content": _text(record, "completion")}]]


SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant"}


def sharegpt(record: Any) -> list[Messages]:
    turns = record.get("conversations") if isinstance(record, dict) else None
    if not isinstance(turns, list):
        raise FormatError("no 'conversations' list")
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or turn.get("from") not in SHAREGPT_ROLES:
            raise FormatError(f"conversations[{i}]: 'from' must be one of {sorted(SHAREGPT_ROLES)}")
        out.append({"role": SHAREGPT_ROLES[turn["from"]], "content": turn.get("value")})
    return [out]


def alpaca(record: Any) -> list[Messages]:
    if not isinstance(record, dict):
        raise FormatError("record is not an object")
    instruction, extra = _text(record, "instruction"), record.get("input") or ""
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return [[{"role": "user", "content": prompt}, {"role": "assistant", "content": _text(record, "output")}]]


def chatterbot(record: Any) -> list[Messages]:
    """One chatterbot-corpus YAML document: `conversations: [[turn, turn, ...], ...]`.

    Turns alternate user / assistant; a trailing user turn has no answer and is left out.
    YAML reads some turns as numbers or booleans, so each turn is turned back into text.
    """
    conversations = record.get("conversations") if isinstance(record, dict) else None
    if not isinstance(conversations, list):
        raise FormatError("no 'conversations' list")
    dialogues = []
    for conv in conversations:
        turns = [str(t).strip() for t in conv] if isinstance(conv, list) else []
        turns = turns[: len(turns) // 2 * 2]
        if turns:
            dialogues.append([{"role": "user" if i % 2 == 0 else "assistant", "content": t}
                              for i, t in enumerate(turns)])
    return dialogues


def oasst_dialogues(messages_table: list[dict], mode: OasstPaths = "longest") -> list[Messages]:
    """OpenAssistant message trees (rows with message_id, parent_id, role prompter/assistant, text)
    to dialogues: every root-to-leaf path ("all") or, per tree, the longest path by turns ("longest",
    ties broken by the higher-ranked branch, i.e. lower `rank`)."""
    children: dict[str | None, list[dict]] = {}
    for row in messages_table:
        children.setdefault(row.get("parent_id"), []).append(row)
    for rows in children.values():
        rows.sort(key=lambda r: (r.get("rank") is None, r.get("rank") or 0))

    def paths(node: dict) -> list[list[dict]]:
        kids = children.get(node["message_id"], [])
        if not kids:
            return [[node]]
        return [[node, *p] for kid in kids for p in paths(kid)]

    dialogues = []
    for root in children.get(None, []):
        found = paths(root)
        if mode == "longest":
            found = [max(found, key=len)]
        for path in found:
            turns = [{"role": "user" if r["role"] == "prompter" else "assistant", "content": r["text"]}
                     for r in path]
            if turns and turns[-1]["role"] == "user":
                turns = turns[:-1]
            if len(turns) >= 2:
                dialogues.append(turns)
    return dialogues


def per_record(convert: Callable[[Any], list[Messages]]) -> Callable[..., Iterator[Converted]]:
    """A file converter from a converter of single records."""

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
            for j, dialogue in enumerate(found):
                yield (where if len(found) == 1 else f"{where}#{j}"), dialogue

    return each


def oasst(path: str, records: Iterable[Located], oasst_paths: OasstPaths = "longest",
          **_options) -> Iterator[Converted]:
    """OpenAssistant message rows of one file, as trees."""
    rows = []
    for where, record in records:
        if isinstance(record, Exception):
            yield where, record
        elif not isinstance(record, dict):
            yield where, FormatError("record is not an object")
        else:
            rows.append(record)
    for i, dialogue in enumerate(oasst_dialogues(rows, oasst_paths)):
        yield f"{path} (tree path {i})", dialogue


CONVERTERS: dict[str, Callable[..., Iterator[Converted]]] = {
    "messages": per_record(messages),
    "prompt_completion": per_record(prompt_completion),
    "sharegpt": per_record(sharegpt),
    "alpaca": per_record(alpaca),
    "chatterbot": per_record(chatterbot),
    "oasst": oasst,
}
assert set(CONVERTERS) == set(get_args(Format))


def convert(fmt: Format, path: str, records: Iterable[Located],
            oasst_paths: OasstPaths = "longest") -> Iterator[Converted]:
    """Every dialogue (or error) of one file's records, with its location."""
    return CONVERTERS[fmt](path, records, oasst_paths=oasst_paths)
