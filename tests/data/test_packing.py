import random

import pytest

from loop.data import packing
from loop.data.tokenize import tokenize


def test_best_fit_decreasing_places_every_item_once_within_capacity():
    rng = random.Random(0)
    lengths = [rng.randint(1, 100) for _ in range(500)]
    bins = packing.best_fit_decreasing(lengths, 128)
    assert sorted(i for b in bins for i in b) == list(range(500))
    assert all(sum(lengths[i] for i in b) <= 128 for b in bins)
    lower_bound = -(-sum(lengths) // 128)
    assert len(bins) <= lower_bound * 1.02 + 1


def test_too_long_item_is_refused():
    with pytest.raises(ValueError, match="more than the row length"):
        packing.best_fit_decreasing([10, 300], 256)


def test_shipped_corpus_packs_at_least_99_percent_at_2048(tokenizer, corpus):
    ds = tokenize(corpus, tokenizer, seq_len=2048, on_too_long="truncate")
    lengths = [len(x) for x in ds["input_ids"]]
    rows = packing.plan_rows(lengths, 2048, "bfd")
    # The corpus is ~37.05 rows of tokens: 38 rows is optimal, and only the remainder row is short.
    assert len(rows) == -(-sum(lengths) // 2048)
    rows.sort(key=lambda r: sum(e - s for _, s, e in r))
    assert packing.efficiency(rows[1:], 2048) >= 0.99
    assert packing.efficiency(packing.plan_rows(lengths, 2048, "pad"), 2048) < 0.1


def test_concat_mode_keeps_every_token():
    rows = packing.plan_rows([5, 7, 3], 4, "concat")
    assert sum(e - s for row in rows for _, s, e in row) == 15
    assert all(sum(e - s for _, s, e in row) <= 4 for row in rows)


def test_step_rows_cover_an_epoch_once_and_fill_the_tail():
    order = packing.epoch_order(37, seed=1, epoch=0)
    steps = packing.steps_per_epoch(37, 3 * 3 * 2)
    per_step = [[j for micro in range(2) for rank in range(3)
                 for j in packing.step_rows(order, step, micro, rank, world=3, micro_batch_size=3, accumulation=2)]
                for step in range(steps)]
    seen = [j for step in per_step for j in step]
    assert steps == 3 and sorted(j for j in seen if j is not None) == list(range(37))
    assert seen.count(None) == 3 * 18 - 37 and None not in per_step[0] + per_step[1]  # fillers only at the end
