"""Packing dialogues into rows, and the deterministic order in which rows are consumed.

A row is a list of pieces (dialogue index, start, end). In "bfd" mode whole dialogues are packed by
best-fit decreasing; each keeps its own position ids (restarting at 0) and a block-diagonal causal
mask stops attention from crossing into a neighbour. Targets are shifted inside each dialogue, so
no token learns to predict the start of the next dialogue. "pad" (one dialogue per row) and
"concat" (the original code's stream cut into blocks, attention crossing boundaries) remain for
comparison.

The order of rows is a pure function of (seed, epoch), and a step's rows are a slice of it, so a
resumed run jumps straight to its step without reading the batches it already consumed.
"""

from __future__ import annotations

import bisect
import functools
import random
from collections.abc import Sequence

import torch

Piece = tuple[int, int, int]  # (dialogue index, start, end)
Row = list[Piece]
IGNORE = -100

# How each attention implementation is kept inside a dialogue. "mask": a boolean (B, 1, T, T)
# block-diagonal mask (eager ignores it for GPTBigCode, so it cannot pack). "varlen": the micro-batch
# is flattened into one row and cumulative sequence lengths (cu_seq_lens_q/k, max_length_q/k) are
# passed through the model to the attention function, as flash-attention's varlen kernel needs.
# GPTBigCode does not forward position_ids to its attention, so they cannot mark the boundaries.
ATTENTION_MODE = {"sdpa": "mask", "flash_attention_2": "varlen", "flash_attention_3": "varlen",
                  "sdpa_varlen": "varlen"}


def check_attention(packing: str, attn_implementation: str) -> None:
    if packing == "bfd" and attn_implementation not in {*ATTENTION_MODE, "auto"}:
        raise ValueError(
            f"model.attn_implementation {attn_implementation!r} cannot keep packed dialogues apart "
            f"(it ignores the block-diagonal mask); use one of {sorted(ATTENTION_MODE)} "
            "or set data.packing: pad"
        )


def resolve_attention(requested: str) -> tuple[str, str | None]:
    """The attention to use and, if it differs from the request, why (flash-attention needs CUDA + flash_attn).

    "auto" takes the fastest one that keeps packed dialogues apart: flash-attention's varlen kernel
    when CUDA and flash_attn are there, else SDPA with block-diagonal masks.
    """
    import importlib.util

    if requested == "auto":
        usable = torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None
        return ("flash_attention_2" if usable else "sdpa"), None
    if requested.startswith("flash_attention"):
        package = "flash_attn_interface" if requested.endswith("3") else "flash_attn"
        if not torch.cuda.is_available() or importlib.util.find_spec(package) is None:
            return "sdpa", (f"{requested} needs a CUDA GPU and the {package} package; "
                            "falling back to sdpa with block-diagonal masks")
    return requested, None


def sdpa_varlen(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Reference varlen attention (causal SDPA per packed sequence, from cu_seq_lens_q).

    Takes exactly what flash-attention's varlen path takes, so the flattened packing can be checked
    on any device; registered with transformers' AttentionInterface as "sdpa_varlen".
    """
    cu = kwargs["cu_seq_lens_q"].tolist()
    if key.shape[1] != query.shape[1]:  # multi-query: one key/value head for all query heads
        key = key.expand(-1, query.shape[1], -1, -1)
        value = value.expand(-1, query.shape[1], -1, -1)
    out = torch.empty_like(query)
    for start, end in zip(cu[:-1], cu[1:]):
        out[:, :, start:end] = torch.nn.functional.scaled_dot_product_attention(
            query[:, :, start:end], key[:, :, start:end], value[:, :, start:end],
            dropout_p=dropout if module.training else 0.0, is_causal=True, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register("sdpa_varlen", sdpa_varlen)


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


def plan_rows(lengths: Sequence[int], seq_len: int, mode: str) -> list[Row]:
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


def trained_tokens(row: Row, masks: Sequence[Sequence[int]]) -> int:
    """Positions with a target in this row: trained tokens of each piece except its first."""
    return sum(sum(masks[i][s + 1 : e]) for i, s, e in row)


def make_batch(rows: list[Row], ids: Sequence[Sequence[int]], masks: Sequence[Sequence[int]], pad_id: int,
               packing_mode: str, attention: str) -> dict[str, torch.Tensor | int]:
    """The micro-batch layout the attention needs: flattened varlen, or rows with a mask."""
    if packing_mode != "concat" and ATTENTION_MODE.get(attention) == "varlen":
        return collate_varlen(rows, ids, masks, pad_id)
    return collate(rows, ids, masks, pad_id, isolate=packing_mode != "concat")


def collate_varlen(rows: list[Row], ids: Sequence[Sequence[int]], masks: Sequence[Sequence[int]],
                   pad_id: int) -> dict[str, torch.Tensor | int]:
    """One flattened row for varlen attention: every piece of the micro-batch back to back, with
    cumulative sequence lengths instead of a mask. No padding at all."""
    pieces = [piece for row in rows for piece in row]
    flat = collate([pieces], ids, masks, pad_id, with_mask=False)  # only fillers: one untrained pad token
    lengths = torch.tensor([e - s for _, s, e in pieces] or [1])
    cu = torch.cat([torch.zeros(1, dtype=torch.int32), lengths.cumsum(0).to(torch.int32)])
    longest = int(lengths.max())
    return flat | {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def collate(rows: list[Row], ids: Sequence[Sequence[int]], masks: Sequence[Sequence[int]],
            pad_id: int, isolate: bool = True, with_mask: bool = True) -> dict[str, torch.Tensor]:
    """Tensors for one micro-batch: input_ids, targets (already shifted), position_ids, attention_mask
    (left out with with_mask=False, for layouts that mark boundaries otherwise).

    attention_mask is boolean (B, 1, T, T): query i may see key j when both belong to the same
    piece and j <= i (isolate=True), or simply j <= i (isolate=False, the naive stream).
    An empty row is a filler that trains nothing; it keeps every rank running the same number of
    forward passes, which ZeRO-3's collectives require.
    """
    T = max(1, max((sum(e - s for _, s, e in row) for row in rows), default=1))
    B = len(rows)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    targets = torch.full((B, T), IGNORE, dtype=torch.long)
    position_ids = torch.zeros((B, T), dtype=torch.long)
    segment = -torch.arange(1, T + 1).repeat(B, 1)  # padding: each position its own segment
    for b, row in enumerate(rows):
        t = 0
        for k, (i, s, e) in enumerate(row):
            n = e - s
            piece_ids = torch.tensor(ids[i][s:e], dtype=torch.long)
            piece_mask = torch.tensor(masks[i][s + 1 : e], dtype=torch.bool)
            input_ids[b, t : t + n] = piece_ids
            targets[b, t : t + n - 1] = torch.where(piece_mask, piece_ids[1:], IGNORE)
            if isolate:
                position_ids[b, t : t + n] = torch.arange(n)
                segment[b, t : t + n] = k
            else:
                position_ids[b, t : t + n] = torch.arange(t, t + n)
                segment[b, t : t + n] = 0
            t += n
    batch = {"input_ids": input_ids, "targets": targets, "position_ids": position_ids}
    if with_mask:
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        batch["attention_mask"] = ((segment[:, :, None] == segment[:, None, :]) & causal)[:, None]
    return batch


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
