"""A run's data, end to end, kept in a cache folder that the next run starts from.

One process prepares: every source of the mixture is read in units, converted, validated and tokenized
by worker processes on every core it has (with a progress bar); duplicates are found and the eval split
taken by content; tokens (two bytes each for vocabularies under 65,536), trained flags (a bit each) and per-dialogue
counts go to flat files in a folder named by the key of everything they were made of (the sources'
content, how they are read, the template, tokenizer and row length). The other processes, and every
later run with the same key, memory-map that folder: no Python object per dialogue, no second
tokenization, a cached start in seconds. What training takes from it (the order with the mixture's
weights, the packed rows, per source) is computed from the arrays, and the packing kept beside them.

Why by hand rather than `datasets.map`: the cache lookup must come before reading any record, the result
must stay a few flat arrays (the loop reads them by offset), and bad records must be named by file and
line, in order, from parallel workers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from loop.config import DataConfig, first_line
from loop.data import cache
from loop.data import dialogues as dlg
from loop.data.batches import Bits, Columns
from loop.data.dialogues import Bad, DataReport, SourceReport
from loop.data.packing import Rows
from loop.data.records import DataError
from loop.data.sources import Planned, plan, read, resolve
from loop.data.tokenize import DROPPED, fingerprint, tokenizer_fingerprint
from loop.data.workers import Job, chunks

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

CACHE_VERSION = "5"  # 2: every file's digest in meta.json, rows-KEY.json beside each packing; 3: the eval
# split is made by first question (dialogues.split_key); 4: trained flags at a bit each (batches.Bits); 5: a
# too-long dialogue is cut only after an answer that calls no tool (tokenize.cut_points)
NPY = ("offsets", "trained_counts", "use", "source")  # the per-dialogue arrays of a prepared folder
TRAIN, EVAL, UNUSED = 0, 1, 2  # what a prepared dialogue is for (UNUSED: a duplicate dropped, or too long)
log = logging.getLogger("loop")


def cache_root(data: DataConfig) -> Path:
    if data.cache_dir:
        return Path(data.cache_dir)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "loop" / "data"


def key_of(planned: list[Planned], data: DataConfig, tokenizer: PreTrainedTokenizerBase) -> tuple[str, str]:
    """(the data's fingerprint: what it is made of, the cache key: that and how it is tokenized)."""
    made_of = fingerprint([(p.source.role, p.source.path, p.source.split, p.source.subset, p.source.columns, p.fmt,
                            p.content) for p in planned], data.oasst_paths, data.dedup, data.eval_fraction,
                          bool(data.eval_files), data.on_bad_record)
    return made_of, fingerprint(CACHE_VERSION, made_of, tokenizer_fingerprint(tokenizer), data.seq_len,
                                data.on_too_long, *((data.template_kwargs, data.on_template_change)
                                                    if data.template_kwargs or data.on_template_change != "per_turn"
                                                    else ()))


def prepare(data: DataConfig, tokenizer: PreTrainedTokenizerBase, progress: bool = True) -> Path:
    """The cache folder of this data (prepared now unless a run already did, and its files verify against
    their digests: one that does not is prepared again, with a warning); DataError for bad records (listed,
    unless data.on_bad_record: skip) or when no training dialogue is left."""
    planned = [plan(source) for source in resolve(data)]
    made_of, key = key_of(planned, data, tokenizer)
    root = cache_root(data)
    folder = root / f"prepared-{key}"
    cache.clean_stale(root)  # what preparations killed half way left (at every lookup: all may be cached)
    try:
        if folder.exists():
            cache.check(folder / "meta.json")
            return folder
    except cache.Unverified as e:
        log.warning(f"the data cache {folder} does not verify ({e}); preparing it again")
    except OSError as e:
        raise DataError(f"cannot read the data cache {folder} ({e.strerror or first_line(e)}); set data.cache_dir to a "
                        "folder this run may read and write") from None
    try:
        with cache.work_folder(root, key) as tmp:
            _build(tmp, planned, data, tokenizer, made_of, progress)
            cache.publish(tmp, folder)
    except OSError as e:
        raise DataError(f"cannot write the data cache under {root} ({first_line(e)}); set data.cache_dir to a "
                        "folder with space") from None
    return folder


def _build(tmp: Path, planned: list[Planned], data: DataConfig, tokenizer, made_of: str, progress: bool) -> None:
    dtype = "uint16" if len(tokenizer) <= np.iinfo(np.uint16).max else "int32"
    job = Job(planned, tokenizer, data.seq_len, data.on_too_long, data.oasst_paths, dtype, data.template_kwargs,
              data.on_template_change)
    reports = [SourceReport(name=p.source.name, role=p.source.role) for p in planned]
    bad: list[list[Bad]] = [[] for _ in planned]
    per_dialogue: dict[str, list] = {k: [] for k in ("lengths", "trained_counts", "status", "digests", "split_keys",
                                                         "source")}
    spare = np.zeros(0, np.uint8)  # the trained flags after the last whole byte written
    with (tmp / "tokens.bin").open("wb") as tokens, (tmp / "trained.bin").open("wb") as trained:
        for chunk in chunks(job, data.num_proc, progress):
            tokens.write(chunk.tokens.tobytes())
            flags = np.concatenate([spare, chunk.trained])
            whole = len(flags) - len(flags) % 8
            trained.write(np.packbits(flags[:whole]).tobytes())
            spare = flags[whole:]
            for name in ("lengths", "trained_counts", "status", "digests", "split_keys"):
                per_dialogue[name].append(getattr(chunk, name))
            per_dialogue["source"].append(np.full(len(chunk.lengths), chunk.source, np.uint16))
            reports[chunk.source].add(chunk.report)
            bad[chunk.source] += chunk.bad
        trained.write(np.packbits(spare).tobytes())
    arrays = {k: np.concatenate(v) if v else np.zeros(0, np.int64) for k, v in per_dialogue.items()}
    everything = [b for found in bad for b in found]
    if data.on_bad_record == "error":
        hints = [f"{p.source.path}: {p.hint}" for p, found in zip(planned, bad) if found and p.hint]
        dlg.refuse_bad(everything, hints=hints)
    use = _uses(arrays, planned, reports, data)
    if not (use == TRAIN).any():
        sources = ", ".join(p.source.path for p in planned if p.source.role == "train")
        total = DataReport(reports).describe()
        raise DataError(f"no training dialogues in {sources}: {sum(r.records for r in reports)} records read, {total}")
    offsets = np.zeros(len(arrays["lengths"]) + 1, dtype=np.int64)
    np.cumsum(arrays["lengths"], out=offsets[1:])
    for name, values in zip(NPY, (offsets, arrays["trained_counts"], use, arrays["source"])):
        np.save(tmp / f"{name}.npy", values)
    meta = {"version": CACHE_VERSION, "fingerprint": made_of, "dtype": dtype, "tokens": int(offsets[-1]),
            "sources": [{"name": p.source.name, "role": p.source.role, "fmt": p.fmt} for p in planned],
            "reports": [vars(r) | {"skipped": dict(r.skipped), "left_out": dict(r.left_out)} for r in reports]}
    cache.write_record(tmp / "meta.json", ["tokens.bin", "trained.bin", *(f"{n}.npy" for n in NPY)], meta)


def _uses(arrays: dict, planned: list[Planned], reports: list[SourceReport], data: DataConfig) -> np.ndarray:
    """What each dialogue is for: duplicates counted (and with data.dedup kept once), the eval split taken from
    each train source by first question (so copies of a dialogue, and dialogues asking the same first question,
    always land on one side), too-long ones unused."""
    source, digests, status = arrays["source"], arrays["digests"], arrays["status"]
    use = np.full(len(source), TRAIN, dtype=np.uint8)
    for i, p in enumerate(planned):
        mine = np.flatnonzero(source == i)
        _, first = np.unique(digests[mine], return_index=True)
        reports[i].duplicates = len(mine) - len(first)
        if data.dedup:
            repeated = np.ones(len(mine), bool)
            repeated[first] = False
            use[mine[repeated]] = UNUSED
        if p.source.role == "eval":
            use[mine[use[mine] == TRAIN]] = EVAL
        elif not data.eval_files:
            held = dlg.held_out(arrays["split_keys"][mine], data.eval_fraction)  # by first question
            use[mine[held & (use[mine] == TRAIN)]] = EVAL
            reports[i].held_out = int((use[mine] == EVAL).sum())
    use[status == DROPPED] = UNUSED
    return use


@dataclass
class Prepared:
    """Prepared data as a run trains on it: the dialogues' columns (memory-mapped), the training rows with the
    mixture's weights applied, each eval set's rows, and the report."""

    columns: Columns
    order: np.ndarray  # the training dialogues, every copy of the mixture's weights counted, in source order
    train_rows: Rows
    eval_rows: dict[str, Rows]
    report: DataReport
    folder: Path | None  # the cache folder (None: prepared in memory, as preference pairs are)


def open_prepared(folder: Path, data: DataConfig, seed: int) -> Prepared:
    """A prepared cache folder as this run trains on it (the weights are the config's, chosen by `seed`)."""
    meta = json.loads((folder / "meta.json").read_text())
    load = lambda name: np.load(folder / f"{name}.npy", mmap_mode="r")  # noqa: E731
    offsets, use, source = load("offsets"), load("use"), load("source")
    tokens = np.memmap(folder / "tokens.bin", dtype=meta["dtype"], mode="r") if meta["tokens"] else np.zeros(0)
    packed = np.memmap(folder / "trained.bin", dtype=np.uint8, mode="r") if meta["tokens"] else np.zeros(0, np.uint8)
    columns = Columns.from_arrays(tokens, Bits(packed, meta["tokens"]), offsets, load("trained_counts"))
    reports = [SourceReport(**{**r, "skipped": Counter(r["skipped"]), "left_out": Counter(r["left_out"])})
               for r in meta["reports"]]
    weights = {s.name: s.weight for s in resolve(data) if s.role == "train"}
    lengths = columns.lengths()
    order = []
    for i, s in enumerate(meta["sources"]):
        if s["role"] != "train":
            continue
        mine = np.flatnonzero((source == i) & (use == TRAIN))
        copies = weighted(mine, weights.get(s["name"], 1.0), seed + i)
        reports[i].weighted = len(copies)
        reports[i].trained_tokens = int(columns.trained_counts[copies].sum())
        order.append(copies)
    order = np.concatenate(order) if order else np.zeros(0, np.int64)
    train_rows = _rows(folder, lengths, order, data)
    evals: dict[str, list[np.ndarray]] = {}
    for i, s in enumerate(meta["sources"]):
        mine = np.flatnonzero((source == i) & (use == EVAL))
        if len(mine):
            evals.setdefault(s["name"], []).append(mine)
    eval_rows = {name: _rows(folder, lengths, np.concatenate(parts), data) for name, parts in evals.items()}
    return Prepared(columns, order, train_rows, eval_rows, DataReport(reports, meta["fingerprint"]), folder)


def weighted(dialogues: np.ndarray, weight: float, seed: int) -> np.ndarray:
    """Each dialogue floor(weight) times, and once more for a share of them equal to the fraction left,
    chosen by seed: a weight of 0.25 keeps a quarter of the source, 3 trains each dialogue three times."""
    whole, part = int(weight), weight - int(weight)
    extra = dialogues[np.random.default_rng(seed).random(len(dialogues)) < part] if part else dialogues[:0]
    return np.concatenate([np.tile(dialogues, whole), extra]).astype(np.int64)


def _rows(folder: Path, lengths: np.ndarray, order: np.ndarray, data: DataConfig) -> Rows:
    """The packed rows of these dialogues (in this order), kept beside the cache: packing a million dialogues
    takes seconds, reading them back a moment."""
    key = hashlib.blake2b(np.ascontiguousarray(order).tobytes() + f"{data.seq_len}:{data.packing}".encode(),
                          digest_size=12).hexdigest()
    record = folder / f"rows-{key}.json"
    pieces, starts = (folder / f"rows-{key}-{name}.npy" for name in ("pieces", "starts"))
    try:
        cache.check(record)
        return Rows(np.load(pieces, mmap_mode="r"), np.load(starts, mmap_mode="r"))
    except cache.Unverified as e:
        if pieces.exists() or starts.exists() or record.exists():
            log.warning(f"the packed rows in {folder} do not verify ({e}); packing them again")
    except OSError:  # unreadable: packed here, and written if the folder lets us
        pass
    rows = Rows.pack(lengths[order], data.seq_len, data.packing, dialogues=order)
    try:  # written under temporary names, then renamed: a reader never sees half a file
        for path, values in ((pieces, rows.pieces), (starts, rows.starts)):
            tmp = cache.temporary(path)
            np.save(tmp, values)
            tmp.rename(path)
        cache.write_record(record, [pieces.name, starts.name], {})
    except OSError:  # a read-only cache still trains; it packs again next time
        pass
    return rows


def held_out_prompts(data: DataConfig, count: int) -> list[str]:
    """The first question of `count` dialogues a run held out for evaluation (its eval sources, or the split
    of its train sources), read in this process, stopping as soon as there are enough."""
    firsts: list[str] = []
    for planned in map(plan, resolve(data)):
        if planned.source.role != ("eval" if data.eval_files else "train"):
            continue
        records = (r for unit in planned.units for r in read(planned.source, unit))
        for _, dialogue in dlg.dialogues_of(planned.fmt, planned.source.path, records, data.oasst_paths,
                                            SourceReport(), []):
            if data.eval_files or dlg.held_out(dlg.split_key(dialogue), data.eval_fraction):
                first = next(m["content"] for m in dialogue if m["role"] == "user")
                if first not in firsts:
                    firsts.append(first)
                if len(firsts) == count:
                    return firsts
    return firsts
