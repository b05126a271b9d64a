"""OpenAssistant message trees (oasst1 / oasst2 rows) to dialogues.

Each row is one message: `message_id`, `parent_id` (none for a tree's first prompt), `role`
("prompter" or "assistant", nothing else), `text`, `rank` (lower is better among siblings, none when
unranked), and the moderation fields `deleted` and `review_result`. A deleted message, one that failed
review, and everything below them are left out and counted; so is a prompt that nobody answered. A
malformed row, one whose parent is not in the file, or one that does not alternate roles is a bad record.

Dialogues are root-to-leaf paths ending on an answer: all of them ("all"), or per tree the one with the
most turns, ties going to the best-ranked branch ("longest"). Each is located at its root's line.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

from loop.config import OasstPaths
from loop.data.records import Converted, Dropped, FormatError, Located, text_field

ROLES = {"prompter": "user", "assistant": "assistant"}


def _problem(row) -> FormatError | None:
    if not isinstance(row, dict):
        return FormatError("record is not an object")
    try:
        text_field(row, "text")
        if not isinstance(row.get("message_id"), str | int):
            raise FormatError("field 'message_id' is missing")
    except FormatError as e:
        return e
    if not isinstance(row.get("role"), str) or row["role"] not in ROLES:
        return FormatError(f"role must be one of {sorted(ROLES)}, got {row.get('role')!r}")
    return None


def _rank(row: dict) -> float:
    rank = row.get("rank")
    return rank if isinstance(rank, int | float) else math.inf


def dialogues(records: list[Located], mode: OasstPaths) -> Iterator[Converted]:
    rows: dict = {}  # message_id -> (location, row), kept messages only
    removed: dict = {}  # message_id -> why it was left out (its descendants follow it)
    for where, row in records:
        problem = row if isinstance(row, Exception) else _problem(row)
        if problem:
            yield where, problem
        elif row["message_id"] in rows or row["message_id"] in removed:
            yield where, FormatError(f"message_id {row['message_id']!r} appears twice")
        elif row.get("deleted") is True:
            removed[row["message_id"]] = "oasst_deleted"
            yield where, Dropped("oasst_deleted", "a deleted message")
        elif row.get("review_result") is False:
            removed[row["message_id"]] = "oasst_review_failed"
            yield where, Dropped("oasst_review_failed", "a message that failed review")
        else:
            rows[row["message_id"]] = (where, row)

    children: dict = {}
    roots = []
    for mid, (_, row) in rows.items():
        parent = row.get("parent_id")
        if parent is None:
            roots.append(mid)
        else:
            children.setdefault(parent, []).append(mid)
    reached, cut = set(), set()
    for mid in roots:  # walk each tree from its root; a role that does not alternate cuts the branch
        where, row = rows[mid]
        if row["role"] != "prompter":
            yield where, FormatError("a tree must start with a prompter message")
            continue
        stack = [mid]
        while stack:
            node = stack.pop()
            reached.add(node)
            for kid in children.get(node, []):
                if rows[kid][1]["role"] == rows[node][1]["role"]:
                    cut.add(kid)
                    yield rows[kid][0], FormatError(f"role {rows[kid][1]['role']!r} follows a message of the same "
                                                    "role")
                else:
                    stack.append(kid)
    for mid, (where, row) in rows.items():
        if mid not in reached and mid not in cut and row.get("parent_id") is not None:
            cause = _unreached_cause(mid, rows, removed, cut)
            if cause == "missing":
                yield where, FormatError(f"parent {row['parent_id']!r} is not in this file")
            else:
                yield where, Dropped("oasst_below_left_out", f"below a message left out ({cause})")

    for mid in (m for m in roots if m in reached):
        paths = list(_paths(mid, rows, children, reached))
        for node in (n for path in paths for n in path[-1:]):
            if rows[node][1]["role"] == "prompter":
                yield rows[node][0], Dropped("oasst_unanswered", "a prompt that nobody answered")
        complete = {tuple(p[: len(p) - (rows[p[-1]][1]["role"] == "prompter")]) for p in paths}
        complete = sorted((p for p in complete if len(p) >= 2),
                          key=lambda p: (-len(p), [_rank(rows[n][1]) for n in p]))
        if mode == "longest":
            complete = complete[:1]
        for k, path in enumerate(complete):
            yield (f"{rows[mid][0]} (tree path {k})",
                   [{"role": ROLES[rows[n][1]["role"]], "content": rows[n][1]["text"]} for n in path])


def _paths(node, rows: dict, children: dict, reached: set) -> Iterator[list]:
    kids = [k for k in children.get(node, []) if k in reached and rows[k][1]["role"] != rows[node][1]["role"]]
    if not kids:
        yield [node]
        return
    for kid in kids:
        for rest in _paths(kid, rows, children, reached):
            yield [node, *rest]


def _unreached_cause(mid, rows: dict, removed: dict, cut: set) -> str:
    """Why a message is not in any tree: an ancestor was left out, broke the roles, or is missing."""
    seen = set()
    while mid in rows and mid not in seen:
        seen.add(mid)
        mid = rows[mid][1].get("parent_id")
        if mid in cut:
            return "a bad message"
    return removed.get(mid, "missing")
