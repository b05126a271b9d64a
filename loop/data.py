"""From files to tokenized dialogues: read, convert, validate, split, tokenize, truncate.

Nothing is lost silently. A bad record either stops the run (all bad records listed, each with file,
record and reason) or is skipped and counted by reason; a dialogue longer than the sequence length is
cut at a turn boundary or dropped, and counted.
"""

from __future__ import annotations

import hashlib
import json
import re
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
from transformers import PreTrainedTokenizerBase

from loop import formats, templates
from loop.formats import Messages

ROLES = {"system", "user", "assistant"}


class DataError(ValueError):
    """Bad input data; the message lists every bad record with file, record and reason."""


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


def read_records(path: str) -> Iterator[tuple[str, Any]]:
    """Yield (location, record) from a local JSONL / JSON / YAML / Parquet file or a Hub dataset id.

    JSONL is read line by line here (not by `datasets`) so that a broken line is reported by number.
    """
    check_exists(path)
    p = Path(path)
    if p.suffix == ".jsonl":
        with p.open("rb") as f:
            for n, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    yield f"{path}:{n}", json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError as e:
                    yield f"{path}:{n}", DataError(f"invalid UTF-8 ({e.reason} at byte {e.start})")
                except json.JSONDecodeError as e:
                    yield f"{path}:{n}", DataError(f"invalid JSON ({e.msg}, column {e.colno})")
    elif p.suffix == ".json":
        try:
            data = json.loads(p.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"{path}: not valid UTF-8 JSON: {e}") from None
        rows = data.get("data", data) if isinstance(data, dict) else data
        if not isinstance(rows, list):
            raise DataError(f"{path}: expected a list of records (or {{'data': [...]}})")
        for i, record in enumerate(rows):
            yield f"{path}[{i}]", record
    elif p.suffix in (".yml", ".yaml"):
        import yaml

        try:  # BaseLoader: every scalar stays text as written (no `yes` -> True, no 1.0 -> 1)
            yield path, yaml.load(p.read_text(encoding="utf-8"), Loader=yaml.BaseLoader)
        except (UnicodeDecodeError, yaml.YAMLError) as e:
            yield path, DataError(f"not valid UTF-8 YAML: {str(e).splitlines()[0]}")
    elif p.suffix == ".parquet":
        try:
            table = datasets.load_dataset("parquet", data_files=str(p), split="train")
        except Exception as e:  # noqa: BLE001 - pyarrow and datasets raise many kinds
            raise DataError(f"{path}: not a readable Parquet file ({_first_line(e)})") from None
        for i, record in enumerate(table):
            yield f"{path}[{i}]", record
    elif p.is_dir() or not p.exists():
        # A Hub dataset id or a local dataset folder, optionally `NAME:SPLIT` (default split: train).
        name, _, split_name = path.partition(":") if not p.exists() else (path, "", "")
        try:
            table = datasets.load_dataset(name, split=split_name or "train")
        except (datasets.exceptions.DataFilesNotFoundError, datasets.data_files.EmptyDatasetError):
            raise DataError(f"{path}: no data files {'in this folder' if p.exists() else 'found'}") from None
        except Exception as e:  # noqa: BLE001 - the Hub, the network and datasets raise many kinds
            where = "as a dataset folder" if p.exists() else "locally, nor as a Hub dataset"
            raise DataError(f"{path}: cannot be loaded {where} ({_first_line(e)})") from None
        for i, record in enumerate(table):
            yield f"{path}[{i}]", record
    else:
        raise DataError(f"{path}: unsupported file type {p.suffix!r} (use .jsonl, .json, .parquet or .yml)")


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?(:[\w.-]+)?")
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".yml", ".yaml", ".csv", ".txt", ".arrow")


def looks_like_hub_id(text: str) -> bool:
    """`name`, `namespace/name` or either with `:split`, and not a file name."""
    return bool(HUB_ID.fullmatch(text)) and not text.partition(":")[0].endswith(LOCAL_SUFFIXES)


def check_exists(path: str, what: str = "") -> None:
    """A path that is not here and cannot be a Hub id is a missing file, said as such."""
    if not Path(path).exists() and not looks_like_hub_id(path):
        raise DataError(f"not found: {path}" + (f" ({what})" if what else ""))


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:300]


def collect(files: list[str], fmt: formats.Format, oasst_paths: formats.OasstPaths = "longest",
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


def load_dialogues(files: list[str], fmt: formats.Format, on_bad_record: str,
                   oasst_paths: formats.OasstPaths = "longest") -> tuple[list[Messages], DataReport]:
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


def _encode_fitting(tokenizer, dialogue: Messages, seq_len: int, on_too_long: str):
    """Encode a dialogue; if too long, keep the longest prefix ending on an assistant turn."""
    ids, mask = templates.encode(tokenizer, dialogue)
    if len(ids) <= seq_len:
        return ids, mask, "ok"
    if on_too_long == "truncate":
        ends = [i + 1 for i, m in enumerate(dialogue) if m["role"] == "assistant"][:-1]
        for end in reversed(ends):
            ids, mask = templates.encode(tokenizer, dialogue[:end])
            if len(ids) <= seq_len:
                return ids, mask, "truncated"
    return [], [], "dropped"


def fingerprint(*parts: Any) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(json.dumps(part, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    return fingerprint(tokenizer.backend_tokenizer.to_str(), tokenizer.chat_template)


def tokenize(
    dialogues: list[Messages],
    tokenizer: PreTrainedTokenizerBase,
    seq_len: int,
    on_too_long: str,
    num_proc: int = 1,
    cache_dir: str | None = None,
    report: DataReport | None = None,
) -> datasets.Dataset:
    """Tokenize through the chat template into a Dataset of input_ids and assistant_mask.

    Runs through `datasets.map` with num_proc; with a cache_dir the result is stored under a key
    of the data, template, tokenizer and length, so a second run with the same inputs reuses it.
    """
    if not dialogues:  # e.g. eval_fraction: 0
        return datasets.Dataset.from_dict({"input_ids": [], "assistant_mask": []})
    texts = [json.dumps(d, sort_keys=True) for d in dialogues]
    ds = datasets.Dataset.from_dict({"messages": texts})

    def encode(batch: dict) -> dict:
        out: dict[str, list] = {"input_ids": [], "assistant_mask": [], "status": []}
        for text in batch["messages"]:
            ids, mask, status = _encode_fitting(tokenizer, json.loads(text), seq_len, on_too_long)
            out["input_ids"].append(ids)
            out["assistant_mask"].append(mask)
            out["status"].append(status)
        return out

    key = fingerprint(hashlib.sha256("\n".join(texts).encode()).hexdigest(), tokenizer_fingerprint(tokenizer),
                      seq_len, on_too_long)
    kwargs: dict[str, Any] = {"new_fingerprint": key}
    if cache_dir:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        kwargs["cache_file_name"] = str(Path(cache_dir) / f"tokenized-{key}.arrow")
    ds = ds.map(encode, batched=True, batch_size=256, num_proc=num_proc if len(ds) > 1000 else None,
                remove_columns=["messages"], desc="tokenize", **kwargs)
    statuses = list(ds["status"])
    if report is not None:
        counts = Counter(statuses)
        report.truncated += counts.get("truncated", 0)
        report.dropped_too_long += counts.get("dropped", 0)
    keep = [i for i, s in enumerate(statuses) if s != "dropped"]
    return ds.select(keep).remove_columns("status") if len(keep) < len(ds) else ds.remove_columns("status")


def prepare(cfg, tokenizer: PreTrainedTokenizerBase) -> tuple[datasets.Dataset, datasets.Dataset, DataReport]:
    """Train and eval datasets for a DataConfig: load, validate, split, tokenize. Bad records of the
    train and eval files are listed together; an empty training set is an error here, before any model
    work."""
    train, report, bad = collect(cfg.train_files, cfg.format, cfg.oasst_paths)
    if cfg.eval_files:
        held, _, bad_eval = collect(cfg.eval_files, cfg.format, cfg.oasst_paths, report)
        bad += bad_eval
    else:
        train, held = split(train, cfg.eval_fraction)
    if cfg.on_bad_record == "error":
        refuse_bad(bad)
    report.fingerprint = fingerprint(train, held)
    common = dict(tokenizer=tokenizer, seq_len=cfg.seq_len, on_too_long=cfg.on_too_long,
                  num_proc=cfg.num_proc, cache_dir=cfg.cache_dir, report=report)
    train_ds, eval_ds = tokenize(train, **common), tokenize(held, **common)
    if len(train_ds) == 0:
        raise DataError(f"no training dialogues in {', '.join(cfg.train_files)}: {report.records} records read, "
                        f"{report.describe()}")
    return train_ds, eval_ds, report


def length_stats(lengths: list[int]) -> dict[str, float]:
    """Token-length summary of a set of dialogues."""
    if not lengths:
        return {"count": 0}
    s = sorted(lengths)
    pick = lambda q: s[min(len(s) - 1, int(q * len(s)))]  # noqa: E731
    return {"count": len(s), "min": s[0], "median": pick(0.5), "p95": pick(0.95), "max": s[-1],
            "mean": sum(s) / len(s), "total": sum(s)}


def held_out_prompts(cfg, count: int) -> list[str]:
    """The first question of `count` dialogues a run held out for evaluation (its eval files, or the
    split of its train files), for showing what a model learned on questions it never saw."""
    if cfg.eval_files:
        held, _ = load_dialogues(cfg.eval_files, cfg.format, "skip", cfg.oasst_paths)
    else:
        train, _ = load_dialogues(cfg.train_files, cfg.format, "skip", cfg.oasst_paths)
        held = split(train, cfg.eval_fraction)[1]
    firsts = [next(m["content"] for m in d if m["role"] == "user") for d in held]
    return sorted(set(firsts), key=firsts.index)[:count]
