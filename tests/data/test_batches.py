import dataclasses
import random
import threading

import numpy as np
import pytest
import torch

from loop.data import batches, packing
from loop.data.packing import IGNORE
from loop.data.tokenize import tokenize


def reference_collate(ids, masks, rows, pad_id, isolate=True):
    """The layout spelled out one token at a time (the loop's original host code)."""
    T = max(1, max((sum(e - s for _, s, e in row) for row in rows), default=1))
    out = {k: torch.full((len(rows), T), v) for k, v in (("input_ids", pad_id), ("targets", IGNORE),
                                                        ("position_ids", 0))}
    segment = -torch.arange(1, len(rows) * T + 1).view(len(rows), T)
    k = 0
    for b, row in enumerate(rows):
        t = 0
        for i, s, e in row:
            for j in range(s, e):
                out["input_ids"][b, t] = ids[i][j]
                out["targets"][b, t] = ids[i][j + 1] if j + 1 < e and masks[i][j + 1] else IGNORE
                out["position_ids"][b, t] = j - s if isolate else t
                segment[b, t] = k if isolate else 0
                t += 1
            k += 1
    out["segment_ids"] = segment
    return out


def random_dialogues(n=60, seed=0):
    rng = random.Random(seed)
    ids = [[rng.randrange(1, 500) for _ in range(rng.randint(2, 90))] for _ in range(n)]
    masks = [[int(rng.random() < 0.5) for _ in x] for x in ids]
    return ids, masks


@pytest.mark.parametrize("mode", ["bfd", "pad", "concat"])
def test_vectorized_collate_equals_the_token_by_token_layout(mode):
    ids, masks = random_dialogues()
    columns = batches.Columns.from_lists(ids, masks)
    rows = packing.plan_rows(columns.lengths(), 128, mode)
    chosen = [rows[3], [], rows[0], rows[-1]]  # a filler in the middle, the short last row
    isolate = mode != "concat"
    got = batches.collate(columns, chosen, pad_id=0, layout="mask", isolate=isolate)
    want = reference_collate(ids, masks, chosen, 0, isolate)
    for key in want:
        assert torch.equal(got[key], want[key]), key
    flat = batches.collate(columns, chosen, pad_id=0, layout="varlen")
    pieces = [p for row in chosen for p in row]
    want_flat = reference_collate(ids, masks, [pieces], 0)
    for key in ("input_ids", "targets", "position_ids"):
        assert torch.equal(flat[key], want_flat[key]), key
    lengths = [e - s for _, s, e in pieces]
    assert flat["cu_seq_lens_q"].tolist() == np.concatenate([[0], np.cumsum(lengths)]).tolist()
    assert flat["max_length_q"] == max(lengths)
    assert columns.trained_in(packing.Rows.of(chosen).pieces) == int((want["targets"] != IGNORE).sum())


def test_columns_from_a_tokenized_dataset_with_dropped_dialogues(tokenizer, corpus):
    ds = tokenize(corpus[:50], tokenizer, seq_len=40, on_too_long="drop")  # a selection over the table
    assert 0 < len(ds) < 50
    columns = batches.Columns.from_dataset(ds)
    assert columns.lengths().tolist() == [len(x) for x in ds["input_ids"]]
    expected = batches.Columns.from_lists(ds["input_ids"], ds["assistant_mask"])
    assert np.array_equal(columns.tokens, expected.tokens) and np.array_equal(columns.trained, expected.trained)
    assert len(batches.Columns.from_dataset(ds.select([]))) == 0


def test_the_mask_is_built_on_the_device_from_sequence_ids():
    ids, masks = random_dialogues(10)
    columns = batches.Columns.from_lists(ids, masks)
    rows = [[(0, 0, len(ids[0])), (1, 0, len(ids[1]))], [(2, 0, len(ids[2]))]]
    batch = batches.to_device(batches.collate(columns, rows, pad_id=0), "cpu")
    mask = batch["attention_mask"]
    a, b = len(ids[0]), len(ids[1])
    assert mask.shape == (2, 1, a + b, a + b) and "segment_ids" not in batch
    assert mask[0, 0, a + 1, a] and not mask[0, 0, a, a - 1]  # inside the second piece, not into the first
    assert not mask[0, 0, 3, 4]  # causal
    pad = len(ids[2])
    assert mask[1, 0, pad, pad] and not mask[1, 0, pad, 0]  # padding sees only itself (no empty softmax row)


def planner(rows, columns, world=2, rank=0):
    return batches.Planner(packing.Rows.of(rows), columns, pad_id=0, layout="varlen", isolate=True, seed=3, world=world,
                           rank=rank, micro_batch_size=2, accumulation=2)


def test_a_step_is_a_pure_function_of_its_number_and_covers_every_process():
    ids, masks = random_dialogues(80)
    columns = batches.Columns.from_lists(ids, masks)
    rows = packing.plan_rows(columns.lengths(), 128, "bfd")
    first, again = planner(rows, columns)(5), planner(rows, columns)(5)
    for a, b in zip(first.micro_batches, again.micro_batches):
        assert all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)
    other = planner(rows, columns, rank=1)(5)
    assert (first.rows, first.trained, first.piece_lengths) == (other.rows, other.trained, other.piece_lengths)
    mine = sum(int((b["targets"] != IGNORE).sum()) for b in first.micro_batches)
    theirs = sum(int((b["targets"] != IGNORE).sum()) for b in other.micro_batches)
    assert mine + theirs == first.trained  # the normalizer counts every process's targets


def test_prefetch_keeps_order_raises_errors_and_stops_its_thread():
    ids, masks = random_dialogues(80)
    columns = batches.Columns.from_lists(ids, masks)
    make = planner(packing.plan_rows(columns.lengths(), 128, "bfd"), columns)
    with batches.prefetch(make, 3, 9) as steps:
        assert [s.index for s in steps] == list(range(3, 9))

    def broken(step):
        if step == 2:
            raise RuntimeError("bad step")
        return make(step)

    with pytest.raises(RuntimeError, match="bad step"), batches.prefetch(broken, 0, 5) as steps:
        list(steps)
    with batches.prefetch(make, 0, 1000, depth=2) as steps:
        next(steps)  # leave early: the thread is blocked on a full queue, and must still stop
    assert not [t for t in threading.enumerate() if t.name == "prefetch"]


def test_bits_read_as_the_bool_array_they_pack():
    rng = np.random.default_rng(0)
    for size in (0, 1, 7, 8, 9, 1003):
        flags = rng.random(size) < 0.5
        bits = batches.Bits(np.packbits(flags), size)
        assert len(bits) == size and np.array_equal(np.asarray(bits), flags)
        for _ in range(50):
            a, b = sorted(rng.integers(0, size + 1, 2))
            assert np.array_equal(bits[a:b], flags[a:b]) and bits[a:b].dtype == np.bool_
        at = rng.integers(0, max(size, 1), 20) if size else np.zeros(0, np.int64)
        assert np.array_equal(bits[at], flags[at])
        columns = batches.Columns.from_arrays(np.zeros(size, np.int32), bits, np.array([0, size]))
        assert columns.trained_counts.tolist() == [int(flags.sum())]


@pytest.mark.parametrize("layout,size", [("varlen", 2), ("varlen", 3), ("mask", 2), ("mask", 4)])
def test_processes_sharing_a_row_hold_its_chunks_and_every_target_once(layout, size):
    """Sequence parallelism: the chunks of a row, side by side, are the row (padded to a multiple of the size);
    each target and each real token is in exactly one chunk, at the place the loss and the router read it from,
    with its sequence beside it; what attention reads (segment ids, cu_seq_lens) stays whole and covers the
    padding as a sequence of its own."""
    from loop.data.pairs import pair_keys

    ids, masks = random_dialogues(40, seed=3)
    columns = batches.Columns.from_lists(ids, masks)
    rows = packing.plan_rows(columns.lengths(), 157, "bfd")  # 157: no size divides the rows evenly
    whole = pair_keys()(batches.collate(columns, rows[:3], pad_id=0, layout=layout), rows[:3])
    parts = [batches.split_sequence(whole, size, r, pad_id=0) for r in range(size)]
    for key in ("input_ids", "targets", "position_ids"):
        joined = torch.cat([p[key] for p in parts], dim=1)
        T = whole[key].shape[1]
        assert torch.equal(joined[:, :T], whole[key]), key
        assert (joined[:, T:] == {"input_ids": 0, "targets": IGNORE, "position_ids": 0}[key]).all()
    width = parts[0]["input_ids"].shape[1]
    T = whole["input_ids"].shape[1]
    for key, aligned in (("target_index", "target_sequence"), ("token_index", None)):  # back to the whole row
        found = {}
        for r, p in enumerate(parts):
            for k, at in enumerate(p[key].tolist()):
                found[at // width * T + at % width + r * width] = p[aligned][k].item() if aligned else None
        assert sorted(found) == whole[key].tolist(), key
        if aligned:
            assert [found[at] for at in whole[key].tolist()] == whole[aligned].tolist()
    assert all((p["targets"].reshape(-1)[p["target_index"]] != IGNORE).all() for p in parts)
    assert sum(int((p["targets"] != IGNORE).sum()) for p in parts) == len(whole["target_index"])
    assert all(torch.equal(p["completion_tokens"], whole["completion_tokens"]) for p in parts)
    if layout == "varlen":
        assert parts[0]["cu_seq_lens_q"][-1] == width * size
        assert parts[0]["cu_seq_lens_q"][:len(whole["cu_seq_lens_q"])].tolist() == whole["cu_seq_lens_q"].tolist()
    else:
        assert parts[0]["segment_ids"].shape == (len(rows[:3]), width * size)
        segments = parts[0]["segment_ids"][:, whole["input_ids"].shape[1]:]
        assert (segments < 0).all() and len(set(segments.reshape(-1).tolist())) == segments.numel()


def test_a_step_shared_by_processes_of_a_row_counts_its_targets_once():
    """Two data-parallel groups of two: the step's normaliser is every target of the step's rows, and the four
    processes' chunks hold each of them once, as the two processes of plain data parallelism do."""
    ids, masks = random_dialogues(80)
    columns = batches.Columns.from_lists(ids, masks)
    rows = packing.plan_rows(columns.lengths(), 128, "bfd")
    plain = [planner(rows, columns, rank=r)(5) for r in range(2)]
    split = [dataclasses.replace(planner(rows, columns, rank=r // 2), sequence=(2, r % 2))(5) for r in range(4)]
    assert {(s.rows, s.trained, tuple(s.piece_lengths)) for s in split} == \
        {(plain[0].rows, plain[0].trained, tuple(plain[0].piece_lengths))}
    held = sum(int((b["targets"] != IGNORE).sum()) for s in split for b in s.micro_batches)
    assert held == plain[0].trained
