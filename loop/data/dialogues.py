"""From records to dialogues: convert, validate, report.

Nothing is lost silently. A bad record either stops the run (all bad records listed, each with file,
record and reason) or is skipped and counted by reason; what a format leaves out by design is counted too,
per source of the mixture.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from loop.config import Format, OasstPaths
from loop.data import calls, formats
from loop.data.records import DataError, Dropped, FormatError, Located, Messages, read_records

ROLES = {"system", "user", "assistant", "tool"}
Bad = tuple[str, str, str]  # (location, kind, reason)


def counts(by_kind: Counter) -> str:
    """'3 empty dialogue, 1 not JSON': a count by kind, as a person reads it."""
    return ", ".join(f"{n} {kind.replace('_', ' ')}" for kind, n in by_kind.items())


@dataclass
class SourceReport:
    """What became of one source's records, from reading to the training order."""

    name: str = ""
    role: str = "train"  # train | eval
    records: int = 0
    dialogues: int = 0  # valid dialogues read
    duplicates: int = 0  # exact repeats of an earlier dialogue of the same source
    skipped: Counter = field(default_factory=Counter)  # bad records, by kind
    left_out: Counter = field(default_factory=Counter)  # left out by design (formats.Dropped), by kind
    truncated: int = 0
    dropped_too_long: int = 0
    per_turn: int = 0  # dialogues trained as one sequence per assistant turn (an unmarked template, turns.py)
    per_turn_tokens: int = 0  # the tokens that costs beyond one sequence each
    held_out: int = 0  # split off for evaluation (eval_fraction)
    weighted: int = 0  # dialogues in the training order, every copy counted (weight)
    trained_tokens: int = 0  # their trained tokens, every copy counted

    def add(self, other: SourceReport) -> None:
        for name in ("records", "dialogues", "duplicates", "truncated", "dropped_too_long", "per_turn",
                     "per_turn_tokens", "held_out", "weighted", "trained_tokens"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.skipped += other.skipped
        self.left_out += other.left_out


@dataclass
class DataReport:
    """A run's data report: each source, and their totals (`total`)."""

    sources: list[SourceReport] = field(default_factory=list)
    fingerprint: str = ""  # of what the data is made of: a resumed run must see the same

    @property
    def total(self) -> SourceReport:
        total = SourceReport(name="all")
        for s in self.sources:
            total.add(s)
        return total

    def describe(self) -> str:
        t = self.total
        left_out = f", left out {counts(t.left_out)}" if t.left_out else ""
        skipped = counts(t.skipped) or "none"
        duplicates = f", {t.duplicates} duplicates" if t.duplicates else ""
        per_turn = (f", {t.per_turn} trained one sequence per turn as the template renders them "
                    f"(+{t.per_turn_tokens} tokens)" if t.per_turn else "")
        return (f"{t.dialogues} dialogues{duplicates}, skipped {skipped}{left_out}, truncated {t.truncated}, "
                f"dropped as too long {t.dropped_too_long}{per_turn}")

    def describe_sources(self) -> list[str]:
        """One line per source of a mixture (nothing for a single source)."""
        if len(self.sources) < 2:
            return []
        trained = sum(s.trained_tokens for s in self.sources) or 1
        return [f"  {s.name} ({s.role}): {s.records} records, {s.dialogues} dialogues, {s.duplicates} duplicates, "
                f"skipped {sum(s.skipped.values())}, truncated {s.truncated}, dropped {s.dropped_too_long}"
                + (f"; {s.weighted} in the order, {s.trained_tokens / trained:.1%} of trained tokens"
                   if s.role == "train" else "") for s in self.sources]

    def as_scalars(self) -> dict[str, float]:
        t = self.total
        out = {"data/dialogues": t.dialogues, "data/duplicates": t.duplicates, "data/truncated": t.truncated,
               "data/dropped_too_long": t.dropped_too_long}
        if t.per_turn:
            out |= {"data/per_turn": t.per_turn, "data/per_turn_tokens": t.per_turn_tokens}
        out.update({f"data/skipped/{k}": v for k, v in t.skipped.items()})
        out.update({f"data/left_out/{k}": v for k, v in t.left_out.items()})
        for s in self.sources if len(self.sources) > 1 else []:
            out[f"data/mixture/{s.name}/dialogues"] = s.weighted if s.role == "train" else s.dialogues
        return out


def validate(dialogue: Any) -> tuple[str, str] | None:
    """Check one dialogue against the messages schema; return (kind, reason) or None if valid."""
    if not isinstance(dialogue, list):
        return "not_a_list", f"messages must be a list of {{role, content}} objects, got {type(dialogue).__name__}"
    if not dialogue:
        return "empty", "the dialogue is empty (it needs a list of messages)"
    for i, m in enumerate(dialogue):
        if not isinstance(m, dict):
            return "not_an_object", f"messages[{i}] must be an object with role and content, got {type(m).__name__}"
        if not isinstance(m.get("role"), str) or m["role"] not in ROLES:
            return "bad_role", f"messages[{i}]: role must be one of {sorted(ROLES)}, got {m.get('role')!r}"
        if problem := _content_problem(m):
            return "empty_content", f"messages[{i}]: {problem}"
    messages, tools = calls.split(dialogue)
    if tools is not None and (problem := calls.check_tools(tools)):
        return "bad_tools", problem
    roles = [m["role"] for m in messages]
    if "system" in roles[1:]:
        return "system_not_first", f"messages[{roles.index('system', 1)}]: a system message may only come first"
    return _order_problem(messages[1:] if roles[0] == "system" else messages,
                          None if tools is None else [calls.tool_name(t) for t in tools])


def _content_problem(m: dict) -> str | None:
    """What is wrong with a message's content for its role: text, or a tool call where text may be missing."""
    content = m.get("content")
    for key in ("reasoning_content", "thinking", "reasoning"):  # an assistant's reasoning, for templates that know it
        if m.get(key) is not None and (m["role"] != "assistant" or not isinstance(m[key], str)):
            return f"{key} must be a string, on an assistant message"
    if m["role"] == "tool":
        return None if isinstance(content, str) else "a tool message's content (the result) must be a string"
    if m["role"] == "assistant" and m.get("tool_calls") is not None:
        if not isinstance(m["tool_calls"], list) or not m["tool_calls"]:
            return "tool_calls must be a non-empty list of calls"
        return None if content is None or isinstance(content, str) else "content must be a string"
    if m.get("tool_calls") is not None:
        return f"only assistant messages make tool calls, not {m['role']}"
    return None if isinstance(content, str) and content.strip() else "content must be a non-empty string"


def _order_problem(turns: list[dict], names: list[str] | None) -> tuple[str, str] | None:
    """Turns alternate user / assistant; an assistant's tool calls are each answered by a tool message (by
    tool_call_id, name, or in order) before the assistant speaks again; the last turn is the assistant's."""
    expected, pending = "user", []
    for i, m in enumerate(turns):
        if m["role"] == "tool":
            if not pending:
                return "tool_without_call", f"turn {i}: a tool result with no tool call before it to answer"
            key = "id" if m.get("tool_call_id") is not None else "name" if m.get("name") is not None else None
            wanted = m.get("tool_call_id") if key == "id" else m.get("name")
            at = next((k for k, c in enumerate(pending) if key is None or
                       (c.get("id") if key == "id" else c["function"]["name"]) == wanted), None)
            if at is None:
                return "tool_without_call", f"turn {i}: a tool result for {wanted!r}, which no pending call made"
            pending.pop(at)
            continue
        if pending:
            names_left = [c["function"]["name"] for c in pending]
            return "unanswered_call", f"turn {i}: the call(s) to {names_left} were never answered by a tool message"
        if m["role"] != expected:
            return "not_alternating", f"turn {i}: expected {expected}, got {m['role']}"
        for c in m.get("tool_calls") or []:
            if problem := calls.check_call(c, names):
                return problem[0], f"turn {i}: {problem[1]}"
        pending = list(m.get("tool_calls") or [])
        expected = "assistant" if m["role"] == "user" or pending else "user"
    if pending:
        return "unanswered_call", (f"the call(s) to {[c['function']['name'] for c in pending]} were never answered "
                                   "by a tool message")
    if not turns or turns[-1]["role"] != "assistant":
        return "no_final_assistant", "the dialogue must end with an assistant turn"
    return None


def dialogues_of(fmt: str, path: str, records: Iterable[Located], oasst_paths: OasstPaths, report: SourceReport,
                 bad: list[Bad]) -> Iterator[tuple[str, Messages]]:
    """The valid dialogues of one source's records, with their locations; bad records go to `bad` and every
    count to `report`. The one path from records to dialogues, in a worker or in this process."""
    def counted() -> Iterator[Located]:
        for item in records:
            report.records += 1
            yield item

    for where, item in formats.convert(fmt, path, counted(), oasst_paths):
        if isinstance(item, Dropped):
            report.left_out[item.kind] += 1
        elif isinstance(item, Exception):
            bad.append((where, "invalid_json" if isinstance(item, DataError) else "format", str(item)))
            report.skipped[bad[-1][1]] += 1
        elif problem := validate(item):
            bad.append((where, *problem))
            report.skipped[problem[0]] += 1
        else:
            report.dialogues += 1
            yield where, item


def digest(dialogue: Messages) -> int:
    """A 64-bit hash of a dialogue's content: equal dialogues, and only they (in practice), share it. It finds
    duplicates and decides a dialogue's side of the eval split, whatever the order of the records."""
    h = hashlib.blake2b(digest_size=8)
    for message in dialogue:  # message by message: a huge one is hashed without a second copy of the dialogue
        _hash_message(h, message)
    return int.from_bytes(h.digest(), "little")


def _hash_message(h: Any, message: dict) -> None:
    content = message.get("content")
    if len(message) == 2 and "content" in message and type(role := message.get("role")) is str:
        rest = _ROLE_JSON.get(role) or _role_json(role)  # most messages: role and content
    else:
        rest = json.dumps({k: v for k, v in message.items() if k != "content"}, sort_keys=True,
                          ensure_ascii=False).encode()
    h.update(rest + b"\x00")
    if not isinstance(content, str):
        content = json.dumps(content, sort_keys=True)
    for at in range(0, len(content), 1 << 20):  # a megabyte at a time: no copy of a huge message
        h.update(content[at : at + (1 << 20)].encode("utf-8", "surrogatepass"))
    h.update(b"\x01")


def _role_json(role: str) -> bytes:
    """`json.dumps({"role": role}, sort_keys=True, ensure_ascii=False).encode()`, written without json.dumps."""
    return ('{"role": ' + json.encoder.encode_basestring(role) + "}").encode()


_ROLE_JSON: dict[str, bytes] = {role: _role_json(role) for role in ROLES}


def split_key(dialogue: Messages) -> int:
    """What decides a dialogue's side of the eval split: its first question (the digest of its first user
    message; of the whole dialogue when it has none). Dialogues that open with the same question land on the
    same side, so a held-out question is never trained on, even when another dialogue asks it too."""
    first = next((m for m in dialogue if m.get("role") == "user"), None)
    return digest([first] if first is not None else dialogue)


def keys(dialogue: Messages) -> tuple[int, int]:
    """(digest, split_key) of a dialogue in one pass over it."""
    whole, first = hashlib.blake2b(digest_size=8), None
    for message in dialogue:
        _hash_message(whole, message)
        if first is None and message.get("role") == "user":
            first = hashlib.blake2b(digest_size=8)
            _hash_message(first, message)
    value = int.from_bytes(whole.digest(), "little")
    return value, int.from_bytes(first.digest(), "little") if first is not None else value


def held_out(key: int, eval_fraction: float) -> bool:
    """Whether a dialogue with this split_key is held out for evaluation: a stable eval_fraction of keys."""
    return key % 10_000 < eval_fraction * 10_000


def piece_digest(digest_value: int, piece: int) -> int:
    """The digest of a dialogue's `piece`-th sequence (one per turn, turns.py): distinct from the others, so
    dedup keeps them all; the eval split goes by the dialogue's split_key, the same for every piece."""
    return (digest_value + piece * 10_000) % (1 << 64) if piece else digest_value


def collect(files: list[str], fmt: Format, oasst_paths: OasstPaths = "longest",
            report: SourceReport | None = None) -> tuple[list[Messages], SourceReport, list[Bad]]:
    """Read, convert and validate every record of `files` in this process: (dialogues, report, bad records as
    (location, kind, reason)). For tools and small sets; a run prepares its data in parallel (prepare.py)."""
    report, dialogues, bad = report or SourceReport(), [], []
    for path in files:
        records = list(read_records(path))
        try:
            chosen = formats.detect(path, records[:20]) if fmt == "auto" else fmt
        except FormatError as e:
            raise DataError(str(e)) from None
        dialogues += [d for _, d in dialogues_of(chosen, path, records, oasst_paths, report, bad)]
    return dialogues, report, sorted(bad, key=lambda b: record_order(b[0], files))


def record_order(where: str, files: list[str]) -> tuple[int, int, str]:
    """Sort key of a location (`file:line`, `file[i]`, `file#k`, with a suffix): file, then number."""
    file = next((i for i, f in enumerate(files) if where.startswith(f)), len(files))
    number = re.match(r"[:\[#](\d+)", where[len(files[file]):] if file < len(files) else "")
    return file, int(number.group(1)) if number else -1, where


def refuse_bad(bad: list[Bad], skip_hint: str = "set data.on_bad_record: skip", hints: Iterable[str] = ()) -> None:
    """Every bad record, one per line (the first 200), as one error; `hints` say what would fix many at once."""
    if bad:
        lines = "\n".join(f"  {where}: {reason}" for where, _, reason in bad[:200])
        more = f"\n  ... and {len(bad) - 200} more" if len(bad) > 200 else ""
        advice = "".join(f"\n  {h}" for h in hints)
        raise DataError(f"{len(bad)} bad record(s); fix them or {skip_hint}\n{lines}{more}{advice}")


def load_dialogues(files: list[str], fmt: Format, on_bad_record: str, oasst_paths: OasstPaths = "longest",
                   skip_hint: str = "set data.on_bad_record: skip") -> tuple[list[Messages], SourceReport]:
    """Read, convert and validate every record of `files`; raises DataError listing every bad record unless
    on_bad_record is "skip"."""
    dialogues, report, bad = collect(files, fmt, oasst_paths)
    if on_bad_record == "error":
        refuse_bad(bad, skip_hint)
    return dialogues, report


def length_stats(lengths) -> dict[str, float]:
    """Token-length summary of a set of dialogues."""
    if not len(lengths):
        return {"count": 0}
    s = sorted(lengths)
    pick = lambda q: s[min(len(s) - 1, int(q * len(s)))]  # noqa: E731
    return {"count": len(s), "min": s[0], "median": pick(0.5), "p95": pick(0.95), "max": s[-1],
            "mean": sum(s) / len(s), "total": sum(s)}
