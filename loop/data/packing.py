"""Packing dialogues into rows, and the deterministic order in which rows are consumed.

A row is a list of pieces (dialogue index, start, end). In "bfd" mode whole dialogues are packed by
best-fit decreasing; each keeps its own position ids (restarting at 0) and attention is kept inside
it (see loop/model/attention.py); targets are shifted inside each dialogue, so no token learns to
predict the start of the next one (batches.py). "pad" (one dialogue per row) and "concat" (the original
code's stream cut into blocks, attention crossing boundaries) remain for comparison.

The order of rows is a pure function of (seed, epoch), and a step's rows are a slice of it, so a
resumed run jumps straight to its step without reading the batches it already consumed.
"""

from __future__ import annotations

import bisect
import functools
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from loop.config import PackingMode

Piece = tuple[int, int, int]  # (dialogue index, start, end)
Row = list[Piece]
IGNORE = -100


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Pack items into as few bins as we can: each item, longest first, goes to the fullest bin it fits.

    Bins are bucketed by their exact space left, and only the distinct values (at most `capacity`)
    are kept sorted, so each placement is O(log capacity): a million dialogues pack in ~3 s.
    Neither itertools nor datasets has a bin packer.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    spaces: list[int] = []  # sorted distinct space-left values of open bins
    by_space: dict[int, list[int]] = {}  # space left -> open bins with exactly that space
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"dialogue {i} has {n} tokens, more than the row length {capacity}")
        k = bisect.bisect_left(spaces, n)
        if k < len(spaces):
            space = spaces[k]
            b = by_space[space].pop()
            if not by_space[space]:
                del by_space[space]
                spaces.pop(k)
        else:
            bins.append([])
            space, b = capacity, len(bins) - 1
        bins[b].append(i)
        left = space - n
        if left > 0:
            if left not in by_space:
                by_space[left] = []
                bisect.insort(spaces, left)
            by_space[left].append(b)
    return bins


def plan_rows(lengths: Sequence[int], seq_len: int, mode: PackingMode) -> list[Row]:
    """Group dialogues (by token length) into rows of at most seq_len tokens."""
    if mode == "bfd":
        return [[(i, 0, lengths[i]) for i in sorted(b)] for b in best_fit_decreasing(lengths, seq_len)]
    if mode == "pad":
        return [[(i, 0, n)] for i, n in enumerate(lengths)]
    rows, row, used = [], [], 0  # concat: one stream, cut every seq_len tokens, remainder kept
    for i, n in enumerate(lengths):
        start = 0
        while start < n:
            take = min(n - start, seq_len - used)
            row.append((i, start, start + take))
            used, start = used + take, start + take
            if used == seq_len:
                rows.append(row)
                row, used = [], 0
    if row:
        rows.append(row)
    return rows


def efficiency(rows: list[Row], seq_len: int) -> float:
    """Real tokens / token slots, with every row padded to seq_len."""
    real = sum(e - s for row in rows for _, s, e in row)
    return real / max(1, len(rows) * seq_len)


@dataclass(frozen=True)
class Rows:
    """Packed rows as two arrays, however many there are: row j holds pieces[starts[j]:starts[j + 1]], each
    piece a (dialogue index, start, end); no Python object per dialogue or row."""

    pieces: np.ndarray  # (pieces, 3) int64
    starts: np.ndarray  # (rows + 1,) int64

    @classmethod
    def of(cls, rows: list[Row]) -> Rows:
        starts = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum([len(r) for r in rows], out=starts[1:])
        pieces = np.array([p for r in rows for p in r], dtype=np.int64).reshape(-1, 3)
        return cls(pieces, starts)

    @classmethod
    def pack(cls, lengths: np.ndarray, seq_len: int, mode: PackingMode, dialogues: np.ndarray | None = None) -> Rows:
        """The rows of `plan_rows` over these lengths; piece indices name `dialogues[i]` when given (the
        dialogue each packed occurrence is a copy of)."""
        rows = cls.of(plan_rows(lengths.tolist(), seq_len, mode))
        if dialogues is not None and len(rows.pieces):
            rows.pieces[:, 0] = dialogues[rows.pieces[:, 0]]
        return rows

    def __len__(self) -> int:
        return len(self.starts) - 1

    def row(self, j: int) -> Row:
        return [tuple(p) for p in self.pieces[self.starts[j] : self.starts[j + 1]].tolist()]

    def tokens(self) -> int:
        return int((self.pieces[:, 2] - self.pieces[:, 1]).sum())

    def efficiency(self, seq_len: int) -> float:
        """Real tokens / token slots, with every row padded to seq_len."""
        return self.tokens() / max(1, len(self) * seq_len)


@functools.lru_cache(maxsize=2)  # asked once per step; shuffled once per epoch
def epoch_order(num_rows: int, seed: int, epoch: int) -> tuple[int, ...]:
    order = list(range(num_rows))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return tuple(order)


def steps_per_epoch(num_rows: int, rows_per_step: int) -> int:
    return -(-num_rows // rows_per_step)


def step_rows(order: Sequence[int], step_in_epoch: int, micro: int, rank: int, world: int,
              micro_batch_size: int, accumulation: int) -> list[int | None]:
    """Row indices for one micro-batch of one rank; None marks a filler past the epoch's end."""
    rows_per_step = world * micro_batch_size * accumulation
    base = step_in_epoch * rows_per_step + (micro * world + rank) * micro_batch_size
    return [order[j] if j < len(order) else None for j in range(base, base + micro_batch_size)]
