"""Packing preference pairs: a pair's two sequences always share a row (and so a micro-batch), chosen first,
pairs are packed best-fit-decreasing, and every target knows its sequence in both attention layouts."""

import random

import numpy as np
import pytest
import torch

from loop.data import batches, packing, pairs
from loop.data.packing import IGNORE


def random_pairs(n=50, seed=0):
    """Sequences two a pair: a shared prompt (mask 0), then each side's completion (mask 1)."""
    rng = random.Random(seed)
    ids, masks = [], []
    for _ in range(n):
        prompt = [rng.randrange(1, 500) for _ in range(rng.randint(1, 40))]
        for _side in range(2):
            completion = [rng.randrange(1, 500) for _ in range(rng.randint(1, 40))]
            ids.append(prompt + completion)
            masks.append([0] * len(prompt) + [1] * len(completion))
    return ids, masks


@pytest.mark.parametrize("mode", ["bfd", "pad"])
def test_a_pairs_two_sequences_share_a_row_chosen_first_and_rows_fit(mode):
    ids, masks = random_pairs()
    lengths = [len(x) for x in ids]
    rows = pairs.plan_rows(lengths, 200, mode)
    seen = sorted(i for row in rows for i, _, _ in row)
    assert seen == list(range(len(ids)))  # every sequence once, whole
    for row in rows:
        indices = [i for i, _, _ in row]
        assert indices[0::2] == [i - 1 for i in indices[1::2]] and all(i % 2 == 0 for i in indices[0::2])
        assert all(s == 0 and e == lengths[i] for i, s, e in row) and sum(lengths[i] for i in indices) <= 200
    if mode == "bfd":
        pair_lengths = [lengths[2 * k] + lengths[2 * k + 1] for k in range(len(ids) // 2)]
        assert len(rows) == len(packing.best_fit_decreasing(pair_lengths, 200)) < len(ids) // 2
    else:
        assert len(rows) == len(ids) // 2


@pytest.mark.parametrize("layout", ["mask", "varlen"])
def test_every_target_knows_its_sequence_and_the_reference_follows_the_pieces(layout):
    ids, masks = random_pairs()
    columns = batches.Columns.from_lists(ids, masks)
    rows = pairs.plan_rows(columns.lengths(), 200, "bfd")
    reference = np.arange(len(ids), dtype=np.float32) * -1.5
    chosen = [rows[2], [], rows[0]]  # a filler row in the middle
    batch = pairs.pair_keys(reference)(batches.collate(columns, chosen, 0, layout), chosen)
    sequences = [i for row in chosen for i, _, _ in row]
    assert batch["sequence_ids"].tolist() == sequences
    assert batch["reference_logps"].tolist() == reference[sequences].tolist()
    targets = batch["targets"].reshape(-1)[batch["target_index"]]
    for piece, sequence in enumerate(sequences):
        mine = targets[batch["target_sequence"] == piece].tolist()
        completion = [t for t, m in zip(ids[sequence], masks[sequence]) if m]
        assert mine == completion  # the last prompt token predicts the first completion token
        assert batch["completion_tokens"][piece] == len(mine)
    assert (batches.model_inputs(batch).keys() & {"sequence_ids", "target_sequence", "reference_logps"}) == set()


def test_a_planned_step_holds_whole_pairs_on_every_process_and_counts_them():
    ids, masks = random_pairs(n=80)
    columns = batches.Columns.from_lists(ids, masks)
    rows = pairs.plan_rows(columns.lengths(), 150, "bfd")
    world, micro, accumulation = 2, 2, 3
    steps = []
    for rank in range(world):
        planner = batches.Planner(rows, columns, 0, "mask", True, 7, world, rank, micro, accumulation,
                                  extra=pairs.pair_keys())
        steps.append([planner(s) for s in range(planner.steps_per_epoch)])
    for per_rank in zip(*steps):
        counted = []
        for step in per_rank:
            for batch in step.micro_batches:
                sequences = batch["sequence_ids"].tolist()
                assert sequences[0::2] == [s - 1 for s in sequences[1::2]]  # whole pairs, chosen first
                counted += sequences
        assert len(per_rank[0].piece_lengths) == len(counted)  # the step's normaliser counts every process
    every = sorted(i for per_rank in steps for step in per_rank for b in step.micro_batches
                   for i in b["sequence_ids"].tolist())
    assert every == list(range(len(ids)))  # one epoch: every pair once
    assert torch.all(steps[0][0].micro_batches[0]["targets"].reshape(-1)[
        steps[0][0].micro_batches[0]["target_index"]] != IGNORE)
