"""From packed rows to tensors, off the training thread.

The tokenized dialogues are flat arrays (`Columns`, memory-mapped from the data cache), so a micro-batch is a
few vectorized gathers instead of thousands of per-item lookups. A `Step` is
everything one optimizer step needs, built for this process while the previous step computes: its
micro-batches (pinned when a GPU is used), and, for all processes, the trained-token count that
normalizes the loss and the dialogue lengths that FLOPs are counted from. The block-diagonal mask
of the "mask" layout is never built on the host: batches carry per-token sequence ids, and
`to_device` turns them into the mask on the device in one comparison.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from loop.config import Layout
from loop.data import packing
from loop.data.packing import IGNORE, Row, Rows

Batch = dict[str, torch.Tensor | int]


@dataclass(frozen=True)
class Bits:
    """Flags at one bit each (np.packbits' order), read like a bool array by slice or index array: the trained
    flags of a prepared folder, which at a byte a flag took half as much disk as the tokens themselves."""

    packed: np.ndarray  # uint8, ceil(size / 8) bytes, the last one's spare bits 0
    size: int

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, at: slice | np.ndarray) -> np.ndarray:
        if isinstance(at, slice):
            start, stop, step = at.indices(self.size)
            if step != 1 or stop <= start:
                return self[np.arange(start, stop, step)]
            first = start >> 3
            bits = np.unpackbits(self.packed[first : (stop + 7) >> 3])
            return bits[start - 8 * first : stop - 8 * first].view(np.bool_)
        at = np.asarray(at, dtype=np.int64)
        return ((self.packed[at >> 3] >> (7 - (at & 7))) & 1).astype(np.bool_)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        flags = self[0 : self.size]
        return flags if dtype is None else flags.astype(dtype)

    def tobytes(self) -> bytes:
        return self.packed.tobytes()


@dataclass(frozen=True)
class Columns:
    """Every dialogue's token ids and trained flags back to back, with offsets. The arrays keep the dtype they
    were stored in (memory-mapped from the data cache: two bytes a token for vocabularies under 65,536)."""

    tokens: np.ndarray  # all dialogues concatenated (uint16 or int32)
    trained: np.ndarray | Bits  # bool, per token: is it an assistant token (a target)?
    offsets: np.ndarray  # int64, dialogue i is tokens[offsets[i]:offsets[i + 1]]
    trained_counts: np.ndarray  # int32, each dialogue's trained tokens: trained counts in O(1) per piece

    @classmethod
    def from_arrays(cls, tokens: np.ndarray, trained: np.ndarray | Bits, offsets: np.ndarray,
                    trained_counts: np.ndarray | None = None) -> Columns:
        if not isinstance(trained, Bits):
            trained = trained.view(np.bool_) if trained.dtype == np.uint8 else trained.astype(bool)
        offsets = offsets.astype(np.int64, copy=False)
        if trained_counts is None:
            cum = np.concatenate([[0], np.cumsum(trained, dtype=np.int64)])
            trained_counts = (cum[offsets[1:]] - cum[offsets[:-1]]).astype(np.int32)
        return cls(tokens, trained, offsets, trained_counts)

    @classmethod
    def from_dataset(cls, ds) -> Columns:
        """From a tokenized Dataset's Arrow table (its selection applied); for tools and tests."""
        if len(ds) == 0:
            return cls.from_lists([], [])
        table = ds.with_format("arrow")[:]
        ids, mask = table.column("input_ids").combine_chunks(), table.column("assistant_mask").combine_chunks()
        offsets = ids.offsets.to_numpy()
        base = offsets[0]  # a sliced list array's offsets start inside its values
        values = ids.values.to_numpy(zero_copy_only=False)[base : offsets[-1]]
        flags = mask.values.to_numpy(zero_copy_only=False)[mask.offsets.to_numpy()[0] :][: len(values)]
        return cls.from_arrays(values, flags.astype(np.uint8), offsets - base)

    @classmethod
    def from_lists(cls, ids: Sequence[Sequence[int]], masks: Sequence[Sequence[int]]) -> Columns:
        lengths = [len(x) for x in ids]
        offsets = np.zeros(len(ids) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        flat = lambda xs: np.fromiter((t for x in xs for t in x), dtype=np.int64, count=offsets[-1])  # noqa: E731
        return cls.from_arrays(flat(ids), flat(masks).astype(np.uint8), offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def trained_in(self, pieces: np.ndarray) -> int:
        """Positions with a target in these pieces ((dialogue, start, end) rows): the trained tokens of each
        piece except its first."""
        if not len(pieces):
            return 0
        i, s, e = pieces.T
        start = self.offsets[i]
        whole = (s == 0) & (e == self.offsets[i + 1] - start)
        total = int(self.trained_counts[i[whole]].sum()) - int(self.trained[start[whole]].sum())
        for first, a, b in zip(start[~whole], s[~whole], e[~whole]):  # parts of dialogues (concat packing)
            total += int(self.trained[first + a + 1 : first + b].sum())
        return total


MaskWindows = int | dict[str, int | None] | None  # see loop/model/architecture.py: Shape.mask_windows


def collate(columns: Columns, rows: list[Row], pad_id: int, layout: Layout = "mask", isolate: bool = True,
            mask_windows: MaskWindows = None) -> Batch:
    """Host tensors for one micro-batch: input_ids, targets (already shifted inside each piece),
    position_ids, and either `segment_ids` ("mask": rows padded to the longest, turned into the mask
    on the device, cut to the model's sliding windows) or cumulative lengths ("varlen": every piece
    back to back in one row, no padding; the attention function applies each layer's window).

    An empty row is a filler that trains nothing: it keeps every process running the same number of
    forward passes, which ZeRO-3's collectives require. isolate=False is the naive stream ("concat").
    """
    if layout == "varlen":
        rows = [[p for row in rows for p in row]]
    pieces = [p for row in rows for p in row]
    i, s, e = (np.array(pieces, dtype=np.int64).reshape(-1, 3).T if pieces else (np.zeros(0, np.int64),) * 3)
    lens = e - s
    per_row = np.array([sum(b - a for _, a, b in row) for row in rows], dtype=np.int64)
    B, T = len(rows), max(1, int(per_row.max(initial=0)))
    # Where each piece starts in the flat (B*T) output, and each of its tokens in the source.
    row_of = np.repeat(np.arange(B), [len(row) for row in rows])
    first = np.concatenate([[0], np.cumsum(lens)[:-1]]) if len(lens) else lens
    row_first = np.concatenate([[0], np.cumsum(per_row)[:-1]])[row_of] if len(lens) else lens
    dst_start = row_of * T + (first - row_first)
    in_piece = np.arange(lens.sum()) - np.repeat(first, lens)
    src = np.repeat(columns.offsets[i] + s, lens) + in_piece
    dst = np.repeat(dst_start, lens) + in_piece
    last = in_piece == np.repeat(lens - 1, lens)
    nxt = np.minimum(src + 1, len(columns.tokens) - 1)

    input_ids = np.full(B * T, pad_id, dtype=np.int64)
    targets = np.full(B * T, IGNORE, dtype=np.int64)
    position_ids = np.zeros(B * T, dtype=np.int64)
    input_ids[dst] = columns.tokens[src]
    targets[dst] = np.where(~last & columns.trained[nxt], columns.tokens[nxt].astype(np.int64), IGNORE)
    position_ids[dst] = in_piece if isolate else dst - np.repeat(row_of * T, lens)
    batch: Batch = {k: torch.from_numpy(v.reshape(B, T)) for k, v in
                    (("input_ids", input_ids), ("targets", targets), ("position_ids", position_ids))}
    batch["target_index"] = torch.from_numpy(np.flatnonzero(targets != IGNORE))  # rows the loss reads
    batch["token_index"] = torch.from_numpy(dst)  # the real tokens (a mixture of experts' router statistics)
    if layout == "varlen":
        cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32) if len(lens) else np.array([0, 1], np.int32)
        longest = int(lens.max(initial=1))
        return batch | {"cu_seq_lens_q": torch.from_numpy(cu), "cu_seq_lens_k": torch.from_numpy(cu),
                        "max_length_q": longest, "max_length_k": longest}
    segment = -np.arange(1, B * T + 1)  # padding: each position a segment of its own
    segment[dst] = np.repeat(np.arange(len(lens)) if isolate else np.zeros(len(lens), np.int64), lens)
    return batch | {"segment_ids": torch.from_numpy(segment.reshape(B, T)), "mask_windows": mask_windows}


def split_sequence(batch: Batch, size: int, rank: int, pad_id: int) -> Batch:
    """This process's chunk of a collated batch when `size` processes share each row (sequence parallelism,
    loop/model/sequence_parallel.py): the rows padded to a multiple of `size` (the padding trains nothing and,
    as a sequence of its own, attends to nothing else), then the `rank`-th of `size` equal column chunks of the
    tokens, targets (shifted before the split, so no target crosses a chunk's edge unseen) and positions. What
    attention reads stays whole: the block mask's segment ids, `cu_seq_lens`; the loss's indices are this
    chunk's, with each target's sequence (preference pairs) kept beside it."""
    B, T = batch["input_ids"].shape
    c = -(-T // size)
    pad = c * size - T
    out = dict(batch)
    for key, fill in (("input_ids", pad_id), ("targets", IGNORE), ("position_ids", 0)):
        whole = torch.nn.functional.pad(batch[key], (0, pad), value=fill)
        out[key] = whole[:, rank * c : (rank + 1) * c].contiguous()
    if "segment_ids" in batch:
        extra = -torch.arange(B * T + 1, B * T + 1 + B * pad).reshape(B, pad)  # unique, like the padding's
        out["segment_ids"] = torch.cat([batch["segment_ids"], extra], dim=1)
    if "cu_seq_lens_q" in batch and pad:
        cu = torch.cat([batch["cu_seq_lens_q"], torch.tensor([c * size], dtype=batch["cu_seq_lens_q"].dtype)])
        longest = max(int(batch["max_length_q"]), pad)
        out |= {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}
    for key, aligned in (("target_index", "target_sequence"), ("token_index", None)):
        row, column = batch[key] // T, batch[key] % T
        keep = (column >= rank * c) & (column < (rank + 1) * c)
        out[key] = row[keep] * c + column[keep] - rank * c
        if aligned in batch:
            out[aligned] = batch[aligned][keep]
    return out


def to_device(batch: Batch, device: torch.device | str) -> Batch:
    """Copy a batch to the device (asynchronously from pinned memory) and build the block-diagonal
    causal mask there from the sequence ids: query i sees key j when both are in one piece, j <= i and,
    under a sliding window of w tokens, i - j < w. Per layer type when the model's layers differ."""
    out = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
    segment, windows = out.pop("segment_ids", None), out.pop("mask_windows", None)
    if segment is not None:
        i = torch.arange(segment.shape[1], device=segment.device)
        distance = i[:, None] - i[None, :]
        block = (segment[:, :, None] == segment[:, None, :]) & (distance >= 0)

        def cut(window: int | None) -> torch.Tensor:
            return (block if window is None else block & (distance < window))[:, None]

        out["attention_mask"] = ({kind: cut(w) for kind, w in windows.items()} if isinstance(windows, dict)
                                 else cut(windows))
    return out


# What only the loss reads: the targets and, for preference pairs, their sequences (loop/data/pairs.py).
LOSS_ONLY = ("targets", "target_index", "token_index", "sequence_ids", "target_sequence", "completion_tokens",
             "reference_logps")


def model_inputs(batch: Batch) -> Batch:
    """What goes to the model: everything but what the loss takes."""
    return {k: v for k, v in batch.items() if k not in LOSS_ONLY}


@dataclass
class Step:
    """One optimizer step as the loop sees it: this process's micro-batches and, over every process,
    the rows, trained targets (which normalize the loss) and dialogue lengths (tokens and FLOPs)."""

    index: int  # 0-based optimizer step
    micro_batches: list[Batch]
    rows: int
    trained: int
    piece_lengths: list[int]

    @property
    def tokens(self) -> int:
        return sum(self.piece_lengths)


@dataclass(frozen=True)
class Planner:
    """Turns a step number into its `Step`: a pure function of (seed, step), so resume needs no state."""

    rows: Rows  # or a list of rows of pieces
    columns: Columns
    pad_id: int
    layout: Layout
    isolate: bool
    seed: int
    world: int
    rank: int
    micro_batch_size: int
    accumulation: int
    mask_windows: MaskWindows = None
    pin: bool = False
    # What an objective adds to each collated batch, from its rows (loop/data/pairs.py: which sequence each
    # target belongs to, and the reference log-probabilities of preference tuning).
    extra: Callable[[Batch, list[Row]], Batch] | None = None
    # Sequence parallelism: (processes sharing each row, this one's place among them); `world` and `rank` are
    # then the data-parallel groups' (loop/model/sequence_parallel.py).
    sequence: tuple[int, int] = (1, 0)

    def __post_init__(self) -> None:  # rows given as lists of pieces (tools, tests) become arrays
        if not isinstance(self.rows, Rows):
            object.__setattr__(self, "rows", Rows.of(list(self.rows)))

    def batch(self, rows: list[Row]) -> Batch:
        batch = collate(self.columns, rows, self.pad_id, self.layout, self.isolate, self.mask_windows)
        batch = self.extra(batch, rows) if self.extra else batch
        return split_sequence(batch, *self.sequence, self.pad_id) if self.sequence[0] > 1 else batch

    @property
    def steps_per_epoch(self) -> int:
        return packing.steps_per_epoch(len(self.rows), self.world * self.micro_batch_size * self.accumulation)

    def __call__(self, step: int) -> Step:
        epoch, in_epoch = divmod(step, self.steps_per_epoch)
        order = packing.epoch_order(len(self.rows), self.seed, epoch)
        ids = [[packing.step_rows(order, in_epoch, m, r, self.world, self.micro_batch_size, self.accumulation)
                for m in range(self.accumulation)] for r in range(self.world)]
        chosen = [j for per_rank in ids for micro in per_rank for j in micro if j is not None]
        every = (np.concatenate([self.rows.pieces[self.rows.starts[j] : self.rows.starts[j + 1]] for j in chosen])
                 if chosen else np.zeros((0, 3), np.int64))
        micro_batches = []
        for micro in ids[self.rank]:
            batch = self.batch([self.rows.row(j) if j is not None else [] for j in micro])
            micro_batches.append({k: v.pin_memory() if self.pin and torch.is_tensor(v) else v
                                  for k, v in batch.items()})
        return Step(step, micro_batches, len(chosen), self.columns.trained_in(every),
                    (every[:, 2] - every[:, 1]).tolist())

    @property
    def shard_batches(self) -> int:
        return -(-len(self.rows) // (self.world * self.micro_batch_size))

    def shard(self) -> Iterator[Batch]:
        """This process's share of all rows in order (fillers at the end), for evaluation."""
        for b in range(self.shard_batches):
            start = (b * self.world + self.rank) * self.micro_batch_size
            span = range(start, start + self.micro_batch_size)
            yield self.batch([self.rows.row(j) if j < len(self.rows) else [] for j in span])


def planners(prepared, cfg, pad_id: int, layout: Layout, world: int, rank: int, mask_windows: MaskWindows = None,
             extra: Callable[[Batch, list[Row]], Batch] | None = None, sequence: tuple[int, int] = (1, 0)
             ) -> tuple[Planner, dict[str, Planner]]:
    """The training planner and, per eval set, this process's share of its rows, from prepared data
    (loop/data/prepare.py: the dialogues, their order with the mixture's weights, and the cached packing;
    loop/data/preference.py: preference pairs, packed whole); `extra` adds an objective's keys to each batch."""
    d, t = cfg.data, cfg.training
    planner = Planner(prepared.train_rows, prepared.columns, pad_id, layout, d.packing != "concat", t.seed, world,
                      rank, t.micro_batch_size, t.gradient_accumulation_steps, mask_windows,
                      pin=torch.cuda.is_available(), extra=extra, sequence=sequence)
    return planner, {name: dataclasses.replace(planner, rows=rows) for name, rows in prepared.eval_rows.items()}


@contextmanager
def prefetch(make: Callable[[int], Step], first: int, last: int, depth: int = 2) -> Iterator[Iterator[Step]]:
    """Steps first..last-1, built `depth` ahead on a background thread, in order.

    A thread rather than DataLoader workers: a step is a few milliseconds of vectorized numpy that
    mostly releases the GIL, and worker processes would copy the dataset and fork a process that holds
    the DeepSpeed / process-group state. The order stays the planner's, so resume is unaffected.
    An error in the thread is raised in the loop; leaving the block stops the thread.
    """
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def work() -> None:
        for step in range(first, last):
            try:
                item: Step | BaseException = make(step)
            except BaseException as e:  # noqa: BLE001 - handed to the loop, which raises it
                item = e
            while not stop.is_set():
                try:
                    ready.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if stop.is_set() or isinstance(item, BaseException):
                return

    def steps() -> Iterator[Step]:
        for _ in range(first, last):
            item = ready.get()
            if isinstance(item, BaseException):
                raise item
            yield item

    thread = threading.Thread(target=work, name="prefetch", daemon=True)
    thread.start()
    try:
        yield steps()
    finally:
        stop.set()
        thread.join()
