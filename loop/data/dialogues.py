"""From records to dialogues: convert, validate, split, report.

Nothing is lost silently. A bad record either stops the run (all bad records listed, each with file,
record and reason) or is skipped and counted by reason; what a format leaves out by design is counted too.
"""

from __future__ import annotations

import json
import re
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from loop.config import Format, OasstPaths
from loop.data import formats
from loop.data.formats import Messages
from loop.data.records import DataError, read_records

ROLES = {"system", "user", "assistant"}


@dataclass
class DataReport:
    records: int = 0
    dialogues: int = 0
    skipped: Counter = field(default_factory=Counter)  # bad records, by kind
    left_out: Counter = field(default_factory=Counter)  # left out by design (formats.Dropped), by kind
    truncated: int = 0
    dropped_too_long: int = 0
    fingerprint: str = ""  # of the train and eval dialogues: a resumed run must see the same data

    def describe(self) -> str:
        left_out = f", left out {dict(self.left_out)}" if self.left_out else ""
        skipped = ", ".join(f"{n} {kind}" for kind, n in self.skipped.items()) or "none"
        return (f"{self.dialogues} dialogues, skipped {skipped}{left_out}, truncated {self.truncated}, "
                f"dropped as too long {self.dropped_too_long}")

    def as_scalars(self) -> dict[str, float]:
        out = {"data/dialogues": self.dialogues, "data/truncated": self.truncated,
               "data/dropped_too_long": self.dropped_too_long}
        out.update({f"data/skipped/{k}": v for k, v in self.skipped.items()})
        out.update({f"data/left_out/{k}": v for k, v in self.left_out.items()})
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
        if not isinstance(m.get("content"), str) or not m["content"].strip():
            return "empty_content", f"messages[{i}]: content must be a non-empty string"
    roles = [m["role"] for m in dialogue]
    if "system" in roles[1:]:
        return "system_not_first", f"messages[{roles.index('system', 1)}]: a system message may only come first"
    turns = roles[1:] if roles[0] == "system" else roles
    for i, role in enumerate(turns):
        if role != ("user" if i % 2 == 0 else "assistant"):
            return "not_alternating", f"turn {i}: expected {'user' if i % 2 == 0 else 'assistant'}, got {role}"
    if not turns or turns[-1] != "assistant":
        return "no_final_assistant", "the dialogue must end with an assistant turn"
    return None


def collect(files: list[str], fmt: Format, oasst_paths: OasstPaths = "longest",
            report: DataReport | None = None) -> tuple[list[Messages], DataReport, list[tuple[str, str, str]]]:
    """Read, convert and validate every record of `files`: (dialogues, report, bad records as
    (location, kind, reason)). Bad records are counted in the report by kind; nothing raises here."""
    report, dialogues, bad = report or DataReport(), [], []
    for path in files:
        records = list(read_records(path))
        report.records += len(records)
        for where, item in formats.convert(fmt, path, records, oasst_paths):
            if isinstance(item, formats.Dropped):
                report.left_out[item.kind] += 1
            elif isinstance(item, Exception):
                bad.append((where, "invalid_json" if isinstance(item, DataError) else "format", str(item)))
            elif problem := validate(item):
                bad.append((where, *problem))
            else:
                dialogues.append(item)
    for _, kind, _ in bad:
        report.skipped[kind] += 1
    report.dialogues += len(dialogues)
    return dialogues, report, sorted(bad, key=lambda b: _record_order(b[0], files))


def _record_order(where: str, files: list[str]) -> tuple[int, int, str]:
    """Sort key of a location (`file:line`, `file[i]`, `file#k`, with a suffix): file, then number."""
    file = next((i for i, f in enumerate(files) if where.startswith(f)), len(files))
    number = re.match(r"[:\[#](\d+)", where[len(files[file]):] if file < len(files) else "")
    return file, int(number.group(1)) if number else -1, where


def refuse_bad(bad: list[tuple[str, str, str]]) -> None:
    """Every bad record, one per line (the first 200), as one error."""
    if bad:
        lines = "\n".join(f"  {where}: {reason}" for where, _, reason in bad[:200])
        more = f"\n  ... and {len(bad) - 200} more" if len(bad) > 200 else ""
        raise DataError(f"{len(bad)} bad record(s); fix them or set data.on_bad_record: skip\n{lines}{more}")


def load_dialogues(files: list[str], fmt: Format, on_bad_record: str,
                   oasst_paths: OasstPaths = "longest") -> tuple[list[Messages], DataReport]:
    """Read, convert and validate every record of `files`.

    Raises DataError listing every bad record unless on_bad_record is "skip".
    """
    dialogues, report, bad = collect(files, fmt, oasst_paths)
    if on_bad_record == "error":
        refuse_bad(bad)
    return dialogues, report


def split(dialogues: list[Messages], eval_fraction: float) -> tuple[list[Messages], list[Messages]]:
    """Hold out a stable eval split: a dialogue's side depends on its content alone, not on order."""
    train, held = [], []
    for d in dialogues:
        bucket = zlib.crc32(json.dumps(d, sort_keys=True).encode()) % 10_000
        (held if bucket < eval_fraction * 10_000 else train).append(d)
    return train, held


def length_stats(lengths: list[int]) -> dict[str, float]:
    """Token-length summary of a set of dialogues."""
    if not lengths:
        return {"count": 0}
    s = sorted(lengths)
    pick = lambda q: s[min(len(s) - 1, int(q * len(s)))]  # noqa: E731
    return {"count": len(s), "min": s[0], "median": pick(0.5), "p95": pick(0.95), "max": s[-1],
            "mean": sum(s) / len(s), "total": sum(s)}
