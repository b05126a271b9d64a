"""Packing preference pairs, and what a pair's batch carries besides the tokens.

The sequences of loop/data/preference.py come two a pair (pair k: chosen 2k, rejected 2k + 1). A pair is
never split: its two sequences go into the same row, each a piece of its own (positions restart, targets
are shifted inside it, attention is kept inside it by the same layouts as packed dialogues: segment ids
for the "mask" layout, cumulative lengths for "varlen"), and whole pairs are packed best-fit-decreasing
into rows ("bfd") or one to a row ("pad"). So a micro-batch holds whole pairs, chosen before rejected,
and `collate` needs nothing new; `pair_keys` adds which sequence each target belongs to and, once the
reference pass has run, each sequence's reference log-probability.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from loop.config import PackingMode
from loop.data import packing
from loop.data.batches import Batch
from loop.data.packing import Row


def plan_rows(lengths: Sequence[int], seq_len: int, mode: PackingMode) -> list[Row]:
    """Rows of whole pairs from the sequences' lengths (chosen, rejected, chosen, ...)."""
    pair_lengths = [lengths[2 * k] + lengths[2 * k + 1] for k in range(len(lengths) // 2)]
    if mode == "bfd":
        groups = [sorted(b) for b in packing.best_fit_decreasing(pair_lengths, seq_len)]
    else:  # "pad": one pair a row (config validation refuses "concat")
        groups = [[k] for k in range(len(pair_lengths))]
    return [[(s, 0, lengths[s]) for k in group for s in (2 * k, 2 * k + 1)] for group in groups]


def pair_keys(reference: np.ndarray | None = None) -> Callable[[Batch, list[Row]], Batch]:
    """The batch keys preference tuning reads, for a Planner's `extra`:
    - sequence_ids: each piece's sequence, in the batch's order (pair j of the batch: pieces 2j, 2j + 1);
    - target_sequence: for each target (in target_index order), the piece it belongs to;
    - completion_tokens: each piece's targets (its completion's length, for IPO);
    - reference_logps: each piece's reference log-probability, when `reference` (one a sequence) is given."""

    def add(batch: Batch, rows: list[Row]) -> Batch:
        sequences = np.array([i for row in rows for i, _, _ in row], dtype=np.int64)
        where = batch["target_index"].numpy()
        if "segment_ids" in batch:  # "mask": a piece's positions carry its number
            piece = batch["segment_ids"].reshape(-1).numpy()[where]
        else:  # "varlen": pieces back to back in one row
            piece = np.searchsorted(batch["cu_seq_lens_q"].numpy()[1:], where, side="right")
        piece = piece.astype(np.int64)
        out = batch | {"sequence_ids": torch.from_numpy(sequences), "target_sequence": torch.from_numpy(piece),
                       "completion_tokens": torch.from_numpy(np.bincount(piece, minlength=len(sequences)))}
        if reference is not None:
            out["reference_logps"] = torch.from_numpy(reference[sequences].astype(np.float32))
        return out

    return add
