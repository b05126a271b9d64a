"""Records as users keep them: reading JSONL (line by line, so that a broken line is reported by number),
JSON, YAML, Parquet, a dataset folder or a Hub dataset id; and what can be wrong with one record
(`DataError` for input that cannot be read, `FormatError` for a shape its format does not promise,
`Dropped` for what a format leaves out by design), shared by every converter."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets

from loop.config import first_line

Messages = list[dict[str, str]]
Located = tuple[str, Any]  # (location, raw record, or the exception its reader raised)
Converted = tuple[str, "Messages | Exception"]


class DataError(ValueError):
    """Bad input data; the message lists every bad record with file, record and reason."""


class FormatError(ValueError):
    """A record does not have the shape its format promises."""


class Dropped(Exception):
    """Something left out on purpose; `kind` is how it is counted (e.g. oasst_deleted)."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind = kind


def text_field(record: dict, key: str, optional: bool = False) -> str:
    value = record.get(key)
    if optional and value is None:
        return ""
    if key not in record:
        raise FormatError(f"field {key!r} is missing")
    if not isinstance(value, str):
        raise FormatError(f"field {key!r} is not a string (got {type(value).__name__})")
    return value


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
            yield path, DataError(f"not valid UTF-8 YAML: {first_line(e)}")
    elif p.suffix == ".parquet":
        try:
            table = datasets.load_dataset("parquet", data_files=str(p), split="train")
        except Exception as e:  # noqa: BLE001 - pyarrow and datasets raise many kinds
            raise DataError(f"{path}: not a readable Parquet file ({first_line(e)})") from None
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
            raise DataError(f"{path}: cannot be loaded {where} ({first_line(e)})") from None
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
