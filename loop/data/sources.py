"""The sources of a run's data mixture: each train_files / eval_files entry resolved to what to read (its
name, role, weight, format and fields), and planned as units that workers read on their own, with a hash
of its content (what the cache key and the resume guard compare).

A source is refused before anything is read when it cannot be: missing, an unknown file type, given twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import xxhash

from loop.config import DataConfig, DataSource
from loop.data import formats
from loop.data.records import (
    WHOLE_FILE,
    DataError,
    FormatError,
    Unit,
    check_exists,
    check_file,
    load_dataset,
    parquet_row_groups,
    plan_lines,
    read_lines,
    read_row_group,
    read_rows,
    read_whole,
    renamed,
)

ROWS_PER_UNIT = 20_000
SAMPLE = 20  # records a format is recognised from


@dataclass(frozen=True)
class Source:
    name: str
    role: str  # "train" | "eval"
    path: str
    weight: float
    split: str | None
    subset: str | None
    fmt: str  # as configured ("auto" until planned)
    columns: tuple[tuple[str, str], ...]

    @property
    def kind(self) -> str:
        """How it is read: lines (JSONL), whole (JSON, YAML), parquet, or dataset (a folder or Hub id)."""
        suffix = Path(self.path).suffix
        if suffix == ".jsonl":
            return "lines"
        if suffix in WHOLE_FILE:
            return "whole"
        if suffix == ".parquet":
            return "parquet"
        if Path(self.path).is_dir() or not Path(self.path).exists():
            return "dataset"
        raise DataError(f"{self.path}: unsupported file type {suffix!r} (use .jsonl, .json, .parquet, .yml, a "
                        "dataset folder or a Hub dataset id)")


def _default_name(entry: DataSource) -> str:
    base = entry.path.rstrip("/").partition(":")[0] if not Path(entry.path).exists() else entry.path.rstrip("/")
    return Path(base).stem or base


def resolve(data: DataConfig) -> list[Source]:
    """Every train and eval source, named, in config order; the same source twice in one role is refused."""
    found: list[Source] = []
    for role, entries in (("train", data.train_files), ("eval", data.eval_files)):
        for entry in entries:
            check_exists(entry.path)
            source = Source(entry.name or _default_name(entry), role, entry.path, entry.weight, entry.split,
                            entry.config, entry.format or data.format, tuple(sorted(entry.columns.items())))
            if source.kind != "dataset":  # an unsupported file type, a FIFO or a directory: refused before reading
                check_file(Path(source.path))
            same = [s for s in found if s.role == role and (s.path, s.split, s.subset, s.columns, s.fmt) ==
                    (source.path, source.split, source.subset, source.columns, source.fmt)]
            if same:
                raise DataError(f"data.{role}_files: {entry.path} is given twice; to train on it more than once, "
                                "give it a weight (weight: 2)")
            if any(s.name == source.name and s.role == role for s in found):
                raise DataError(f"data.{role}_files: two sources are named {source.name!r}; give each a name")
            found.append(source)
    return found


@dataclass(frozen=True)
class Planned:
    """A source ready to read: its record format, its units, the hash of its content, and what its first
    records look like when they do not match the format it was given."""

    source: Source
    fmt: str
    units: tuple[Unit, ...]
    content: str
    hint: str | None = None

    @property
    def together(self) -> bool:
        """Whether one worker must read all its units (an OpenAssistant tree spans many records)."""
        return self.fmt == "oasst"


def plan(source: Source) -> Planned:
    """Units, content hash and format of a source, from one pass over a local file (or the dataset's own
    fingerprint) and its first records."""
    path = Path(source.path)
    kind = source.kind
    if kind == "lines":
        units, content = plan_lines(path)
    elif kind == "whole":
        units, content = [Unit("whole")], _file_hash(path)
    elif kind == "parquet":
        units = [Unit("row_group", g, g + 1) for g in range(parquet_row_groups(path))]
        content = _file_hash(path)
    else:
        table = load_dataset(source.path, source.subset, source.split)
        units = [Unit("rows", s, min(s + ROWS_PER_UNIT, len(table))) for s in range(0, len(table), ROWS_PER_UNIT)]
        content = table._fingerprint
    sample = []
    for unit in units:  # the first records, for the format and the hint
        sample += list(read(source, unit, limit=SAMPLE - len(sample)))
        if len(sample) >= SAMPLE:
            break
    try:
        fmt = formats.detect(source.path, sample) if source.fmt == "auto" else source.fmt
    except FormatError as e:
        raise DataError(str(e)) from None
    hint = formats.hint(fmt, [r for _, r in sample]) if source.fmt != "auto" else None
    return Planned(source, fmt, tuple(units), content, hint)


def read(source: Source, unit: Unit, limit: int | None = None, tables: dict | None = None):
    """The located records of one unit of a source, its fields renamed onto the schema."""
    path = Path(source.path)
    if unit.kind == "lines":
        records = read_lines(path, unit)
    elif unit.kind == "whole":
        records = read_whole(path)
    elif unit.kind == "row_group":
        records = read_row_group(path, unit)
    else:
        key = (source.path, source.subset, source.split)
        if tables is None or key not in tables:
            table = load_dataset(*key)
            if tables is not None:
                tables[key] = table
        table = tables[key] if tables is not None else table
        records = read_rows(source.path, table, unit)
    for n, item in enumerate(renamed(records, dict(source.columns))):
        if limit is not None and n >= limit:
            return
        yield item


def _file_hash(path: Path) -> str:
    digest = xxhash.xxh3_128()  # as records.plan_lines
    with path.open("rb") as f:
        while block := f.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()
