"""What a preparation's worker processes run: one work item (a unit of a source, or every unit of a source read
together) read, converted, validated and tokenized into flat arrays (a Chunk); and the processes themselves.

Why its own module: a spawned worker imports the module its functions live in, and what that imports. This one
imports neither torch nor transformers (the job carries the Rust tokenizer, and Jinja, transformers' render, is
imported only for a template render.py does not compile), and the workers start with the main module unseen (under
loop/train.py each imported the whole loop): torch alone is 190 MB and a second a worker, transformers 25 MB and
0.6 s. tests/data/test_cache_workers.py holds a worker to it.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from loop.data import dialogues as dlg
from loop.data.dialogues import Bad, SourceReport
from loop.data.records import Unit
from loop.data.sources import Planned, read
from loop.data.tokenize import DROPPED, TRUNCATED, Encoder

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

BATCH = 512  # dialogues a worker encodes at once


@dataclass
class Chunk:
    """What a worker made of one work item (a unit, or every unit of a source that must be read together)."""

    source: int
    tokens: np.ndarray
    trained: np.ndarray
    lengths: np.ndarray
    trained_counts: np.ndarray
    status: np.ndarray
    digests: np.ndarray
    split_keys: np.ndarray
    report: SourceReport
    bad: list[Bad] = field(default_factory=list)


@dataclass(frozen=True)
class Tokenizer:
    """What an Encoder reads of a tokenizer, without transformers: a worker unpickling the tokenizer itself
    imports transformers (25 MB and 0.6 s a worker) to encode with the Rust tokenizer inside it."""

    backend_tokenizer: Any  # tokenizers.Tokenizer
    chat_template: Any
    special_tokens_map: dict
    eos_token: str | None
    vocab: dict[str, int]

    @classmethod
    def of(cls, tokenizer: PreTrainedTokenizerBase) -> Tokenizer:
        return cls(tokenizer.backend_tokenizer, tokenizer.chat_template, dict(tokenizer.special_tokens_map),
                   tokenizer.eos_token, tokenizer.get_vocab())

    def get_vocab(self) -> dict[str, int]:
        return self.vocab


@dataclass
class Job:
    planned: list[Planned]
    tokenizer: PreTrainedTokenizerBase | Tokenizer  # a Tokenizer once made: what goes to the workers
    seq_len: int
    on_too_long: str
    oasst_paths: str
    dtype: str
    template_kwargs: dict = field(default_factory=dict)
    on_template_change: str = "per_turn"

    def __post_init__(self) -> None:
        if not isinstance(self.tokenizer, Tokenizer):
            self.tokenizer = Tokenizer.of(self.tokenizer)


_JOB: Job | None = None
_ENCODER: Encoder | None = None
_TABLES: dict = {}


def start(job: Job) -> None:
    """A worker's set-up: the job once, and an encoder (the tokenizer's own thread pool off: the workers are
    the parallelism)."""
    global _JOB, _ENCODER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _JOB, _ENCODER = job, Encoder(job.tokenizer, job.seq_len, job.on_too_long, job.template_kwargs,
                                  job.on_template_change)


def work(item: tuple[int, tuple[Unit, ...]]) -> Chunk:
    index, units = item
    planned = _JOB.planned[index]
    report, bad = SourceReport(), []
    records = (r for unit in units for r in read(planned.source, unit, tables=_TABLES))
    found = dlg.dialogues_of(planned.fmt, planned.source.path, records, _JOB.oasst_paths, report, bad)
    ids, masks, lengths, counts, status, digests, split_keys = [], [], [], [], [], [], []

    def encode(batch: list) -> None:
        for encoded, (where, dialogue) in zip(_ENCODER.encode([d for _, d in batch]), batch):
            if encoded.refused:  # the template renders it so that it cannot be trained (turns.py)
                bad.append((where, "template", encoded.refused))
                report.skipped["template"] += 1
                report.dialogues -= 1
                continue
            report.per_turn += encoded.per_turn
            report.per_turn_tokens += encoded.extra_tokens
            digest, key = dlg.keys(dialogue)  # every piece on the dialogue's side of the split
            for piece, (ids_, mask) in enumerate(encoded.pieces or [(np.zeros(0, np.int32), np.zeros(0, np.uint8))]):
                ids.append(ids_)
                masks.append(mask)
                lengths.append(len(ids_))
                counts.append(int(np.count_nonzero(mask)))
                status.append(encoded.status)
                digests.append(dlg.piece_digest(digest, piece))
                split_keys.append(key)

    batch: list = []
    for item in found:
        batch.append(item)
        if len(batch) == BATCH:
            encode(batch)
            batch = []
    if batch:
        encode(batch)
    report.truncated = status.count(TRUNCATED)
    report.dropped_too_long = status.count(DROPPED)
    cat = lambda xs, dtype: np.concatenate(xs).astype(dtype) if xs else np.zeros(0, dtype)  # noqa: E731
    return Chunk(index, cat(ids, _JOB.dtype), cat(masks, np.uint8), np.array(lengths, np.int32),
                 np.array(counts, np.int32), np.array(status, np.uint8), np.array(digests, np.uint64),
                 np.array(split_keys, np.uint64), report,
                 sorted(bad, key=lambda b: dlg.record_order(b[0], [planned.source.path])))


WORKER_BYTES = 8 << 20  # less JSONL than this is tokenized here sooner than a spawned worker imports (2-5 s)


def _worth_workers(job: Job) -> bool:
    """Whether the data is enough to pay for starting worker processes (num_proc 0 decides by it): a small
    run's whole preparation takes less than one worker's start."""
    units = [u for p in job.planned for u in p.units]
    return any(u.kind != "lines" for u in units) or sum(u.stop - u.start for u in units) >= WORKER_BYTES


def chunks(job: Job, num_proc: int, progress: bool):
    """Every work item's Chunk, in order: in worker processes when there is enough to share, else here."""
    from tqdm import tqdm

    items = [(i, p.units) if p.together else (i, (u,)) for i, p in enumerate(job.planned)
             for u in (p.units[:1] if p.together else p.units)]
    workers = min(num_proc or (len(os.sched_getaffinity(0)) if _worth_workers(job) else 1), len(items))
    bar = tqdm(total=len(items), desc="prepare data", unit="chunk", disable=not progress)
    if workers <= 1:
        start(job)
        for item in items:
            yield work(item)
            bar.update()
    else:
        with pool(job, workers) as running:
            with main_unseen():  # the workers start as the items are submitted
                done = running.map(work, items)
            for chunk in done:
                yield chunk
                bar.update()
    bar.close()


def pool(job: Job, workers: int):
    """Worker processes set up with the job once: spawned, not forked (the process that prepares may already hold
    DeepSpeed's and gloo's threads). What they import is this module and what it imports (see above)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(workers, multiprocessing.get_context("spawn"), initializer=start, initargs=(job,))


@contextlib.contextmanager
def main_unseen():
    """A spawned process imports its parent's main module first (for what was defined there): loop/train.py,
    that is torch, DeepSpeed and the whole loop in every preparation worker, for nothing they run. While this
    is open, the main module looks like `python -c`'s, which a spawned process does not import."""
    main = sys.modules["__main__"]
    saved = {name: getattr(main, name) for name in ("__spec__", "__file__") if hasattr(main, name)}
    main.__spec__ = None
    with contextlib.suppress(AttributeError):
        del main.__file__
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(main, name, value)
