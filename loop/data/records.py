"""Records as users keep them: reading JSONL (line by line, so that a broken line is reported by number),
JSON, YAML, Parquet, a dataset folder or a Hub dataset id, in pieces that workers read on their own; and
what can be wrong with one record (`DataError` for input that cannot be read, `FormatError` for a shape its
format does not promise, `Dropped` for what a format leaves out by design), shared by every converter."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from loop.config import UserError, first_line, not_a_file

Messages = list[dict[str, Any]]
Located = tuple[str, Any]  # (location, raw record, or the exception its reader raised)
Converted = tuple[str, "Messages | Exception"]
WHOLE_FILE = (".json", ".yml", ".yaml")  # read at once: one record list (JSON) or one document (YAML)


class DataError(UserError, ValueError):
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


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    """A JSON object, refused when it names a key twice (json keeps the last silently)."""
    found = dict(pairs)
    if len(found) != len(pairs):
        seen: set[str] = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise _DuplicateKey(f"the key {twice!r} appears twice in one object")
    return found


MAX_DEPTH = 200  # deeper is no record (an OpenAssistant tree nests 2 a turn), and what reads it next would recurse
NESTED = "nested too deeply to be a record"


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether lists and objects nest more than `limit` deep (walked with a stack: no recursion of its own)."""
    stack = [(value, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth > limit:
                return True
            stack.extend((v, depth + 1) for v in (value.values() if isinstance(value, dict) else value))
    return False


def loads(raw: bytes | str) -> Any:
    """One JSON document, nested at most MAX_DEPTH deep, each key once per object; a ValueError that says what
    is wrong without repeating the document (UnicodeDecodeError for bytes that are not UTF-8)."""
    try:
        value = json.loads(raw, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as e:
        raise ValueError(f"{e.msg}, column {e.colno}" if e.lineno == 1 else
                         f"{e.msg}, line {e.lineno} column {e.colno}") from None
    except RecursionError:
        raise ValueError(NESTED) from None
    opened = raw.count(b"[") + raw.count(b"{") if isinstance(raw, bytes) else raw.count("[") + raw.count("{")
    if opened > MAX_DEPTH and _deeper_than(value, MAX_DEPTH):  # nesting deeper takes that many brackets: most
        raise ValueError(NESTED)  # records are not walked at all
    return value


def parse_json(raw: bytes | str) -> Any:
    """One JSON document, or a DataError that says what is wrong with it (never RecursionError)."""
    try:
        return loads(raw)
    except UnicodeDecodeError as e:
        return DataError(f"invalid UTF-8 ({e.reason} at byte {e.start})")
    except ValueError as e:
        return DataError(f"invalid JSON ({e})")


@dataclass(frozen=True)
class Unit:
    """A piece of one source that one worker reads on its own: a byte range of JSONL lines (`first_line` is
    the number of its first line), a Parquet row group, a row range of a dataset, or a whole file."""

    kind: str  # "lines" | "row_group" | "rows" | "whole"
    start: int = 0
    stop: int = 0
    first_line: int = 1


def plan_lines(path: Path, chunk_bytes: int = 4 << 20) -> tuple[list[Unit], str]:
    """A JSONL file cut into units at line boundaries, and the file's content hash (one pass over it, done at every
    start to find the cache: XXH3, 15 GB/s here, where blake2b's 0.9 GB/s took 6 s a start at 1M dialogues)."""
    import xxhash

    digest, units = xxhash.xxh3_128(), []
    start, line, offset = 0, 1, 0
    with path.open("rb") as f:
        while block := f.read(chunk_bytes):
            digest.update(block)
            cut = block.rfind(b"\n")
            if cut >= 0:  # the unit so far ends at this block's last newline (a long line spans blocks)
                units.append(Unit("lines", start, offset + cut + 1, line))
                start, line = offset + cut + 1, line + _newlines(block)
            offset += len(block)
    if offset > start:
        units.append(Unit("lines", start, offset, line))
    return units, digest.hexdigest()


def _newlines(block: bytes) -> int:
    """bytes.count compares a byte at a time (1.6 of a cached start's 6 s at 1M realistic dialogues); numpy's
    vectorized compare counts the same in a third of the time."""
    return int(np.count_nonzero(np.frombuffer(block, np.uint8) == ord("\n")))


def read_lines(path: Path, unit: Unit) -> Iterator[Located]:
    """The records of a unit of JSONL lines. Each line is read, decoded and parsed on its own, and its bytes let
    go before it is parsed: a 50 MB line costs about twice its size, not the whole unit's or four times."""
    name, at, n = str(path), unit.start, unit.first_line
    with path.open("rb") as f:
        f.seek(at)
        for raw in f:
            if at >= unit.stop:
                break
            at += len(raw)
            if raw.strip():
                try:
                    text, raw = raw.decode("utf-8"), None
                except UnicodeDecodeError as e:
                    text = DataError(f"invalid UTF-8 ({e.reason} at byte {e.start})")
                yield f"{name}:{n}", text if isinstance(text, DataError) else parse_json(text.rstrip("\r\n"))
            n += 1


def read_whole(path: Path) -> Iterator[Located]:
    if path.suffix == ".json":
        try:
            data = parse_json(path.read_bytes())
        except OSError as e:
            data = DataError(f"cannot be read ({first_line(e)})")
        if isinstance(data, DataError):
            raise DataError(f"{path}: not a readable JSON file: {data}")
        rows = data.get("data", data) if isinstance(data, dict) else data
        if not isinstance(rows, list):
            raise DataError(f"{path}: expected a list of records (or {{'data': [...]}})")
        yield from ((f"{path}[{i}]", record) for i, record in enumerate(rows))
    else:
        import yaml

        from loop.config import ConfigError
        from loop.config.parse import load_yaml

        try:  # BaseLoader: every scalar stays text as written (no `yes` -> True, no 1.0 -> 1)
            yield str(path), load_yaml(path.read_bytes().decode("utf-8"), "YAML", yaml.BaseLoader)
        except UnicodeDecodeError as e:
            yield str(path), DataError(f"not valid UTF-8 ({e.reason} at byte {e.start})")
        except ConfigError as e:  # what is wrong, by line and column, never the value (an alias bomb's is huge)
            yield str(path), DataError(str(e).removeprefix("YAML: "))


def parquet_row_groups(path: Path) -> int:
    """How many row groups a Parquet file has; its footer is read, so a broken file is said here, once."""
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path).metadata.num_row_groups
    except Exception as e:  # noqa: BLE001 - pyarrow raises many kinds
        raise DataError(f"{path}: not a readable Parquet file ({first_line(e)})") from None


def read_row_group(path: Path, unit: Unit) -> Iterator[Located]:
    import pyarrow.parquet as pq

    try:
        file = pq.ParquetFile(path)
        rows = file.read_row_group(unit.start, use_threads=False).to_pylist()
        first = sum(file.metadata.row_group(g).num_rows for g in range(unit.start))
    except Exception as e:  # noqa: BLE001 - a corrupted page shows up in many ways
        yield f"{path}[row group {unit.start}]", DataError(f"unreadable Parquet row group ({first_line(e)})")
        return
    yield from ((f"{path}[{first + i}]", record) for i, record in enumerate(rows))


def load_dataset(path: str, subset: str | None, split: str | None):
    """A dataset folder or Hub dataset through `datasets.load_dataset`, the same path either way (`ID:SPLIT`
    names a split too); a DataError in one line when it cannot be loaded."""
    import datasets

    local = Path(path).exists()
    name, _, named_split = (path, "", "") if local else path.partition(":")
    try:
        return datasets.load_dataset(name, subset, split=split or named_split or "train")
    except (datasets.exceptions.DataFilesNotFoundError, datasets.data_files.EmptyDatasetError):
        raise DataError(f"{path}: no data files {'in this folder' if local else 'found'}") from None
    except Exception as e:  # noqa: BLE001 - the Hub, the network and datasets raise many kinds
        where = "as a dataset folder" if local else "locally, nor as a Hub dataset"
        raise DataError(f"{path}: cannot be loaded {where} ({first_line(e)})") from None


def read_rows(path: str, table, unit: Unit) -> Iterator[Located]:
    """Rows start..stop of a loaded dataset, converted to Python a slice at a time (not row by row)."""
    rows = table.data.table.slice(unit.start, unit.stop - unit.start).to_pylist()
    yield from ((f"{path}[{unit.start + i}]", record) for i, record in enumerate(rows))


def renamed(records: Iterator[Located], columns: dict[str, str]) -> Iterator[Located]:
    """Records with the source's field names mapped onto the schema's (`columns`: source field -> schema field)."""
    if not columns:
        yield from records
        return
    for where, record in records:
        if isinstance(record, dict):
            record = {columns.get(k, k): v for k, v in record.items()}
        yield where, record


def read_records(path: str, subset: str | None = None, split: str | None = None) -> Iterator[tuple[str, Any]]:
    """Every (location, record) of a local JSONL / JSON / YAML / Parquet file, dataset folder or Hub dataset
    id, in order, in this process (tools and small checks; a run reads units in parallel, prepare.py)."""
    check_exists(path)
    p = Path(path)
    if p.suffix in FILE_SUFFIXES:
        check_file(p)
    if p.suffix == ".jsonl":
        for unit in plan_lines(p)[0]:
            yield from read_lines(p, unit)
    elif p.suffix in WHOLE_FILE:
        yield from read_whole(p)
    elif p.suffix == ".parquet":
        for group in range(parquet_row_groups(p)):
            yield from read_row_group(p, Unit("row_group", group, group + 1))
    elif p.is_dir() or not p.exists():
        table = load_dataset(path, subset, split)
        yield from read_rows(path, table, Unit("rows", 0, len(table)))
    else:
        raise DataError(f"{path}: unsupported file type {p.suffix!r} (use .jsonl, .json, .parquet or .yml)")


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?(:[\w.-]+)?")
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".yml", ".yaml", ".csv", ".txt", ".arrow")


def looks_like_hub_id(text: str) -> bool:
    """`name`, `namespace/name` or either with `:split`, and not a file name."""
    return bool(HUB_ID.fullmatch(text)) and not text.partition(":")[0].endswith(LOCAL_SUFFIXES)


FILE_SUFFIXES = (".jsonl", *WHOLE_FILE, ".parquet")  # read as files (anything else: a dataset folder or Hub id)


def check_file(path: Path) -> None:
    """A data file is opened for reading only once it is known to be a regular file that opens: a named pipe
    would block the read forever, a directory named `*.jsonl` fail inside it, an unreadable one traceback."""
    if problem := not_a_file(path):
        raise DataError(f"{path} {problem}")
    try:
        with path.open("rb"):
            pass
    except OSError as e:
        raise DataError(f"{path} cannot be read ({e.strerror or type(e).__name__})") from None


def check_exists(path: str, what: str = "") -> None:
    """A path that is not here and cannot be a Hub id is a missing file, said as such."""
    if not Path(path).exists() and not looks_like_hub_id(path):
        raise DataError(f"not found: {path}" + (f" ({what})" if what else ""))
