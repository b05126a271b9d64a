import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from loop import data, packing


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
    ds = data.tokenize(corpus, tokenizer, seq_len=2048, on_too_long="truncate")
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


def _logits(model, batch):
    return model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                 attention_mask=batch["attention_mask"]).logits


@pytest.mark.parametrize("attn", ["sdpa"])
def test_packed_logits_equal_each_dialogue_alone(tiny_dir, tokenizer, corpus, attn):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir / "model", attn_implementation=attn).eval()
    ds = data.tokenize(corpus[:40], tokenizer, seq_len=256, on_too_long="drop")
    ids, masks = ds["input_ids"], ds["assistant_mask"]
    row = [(i, 0, len(ids[i])) for i in (3, 11, 17, 25)]
    with torch.no_grad():
        packed = _logits(model, packing.collate([row], ids, masks, pad_id=0))[0]
        naive = _logits(model, packing.collate([row], ids, masks, pad_id=0, isolate=False))[0]
        t, worst_packed, worst_naive = 0, 0.0, 0.0
        for i, s, e in row:
            alone = _logits(model, packing.collate([[(i, s, e)]], ids, masks, pad_id=0))[0]
            n = e - s
            worst_packed = max(worst_packed, (packed[t : t + n] - alone).abs().max().item())
            worst_naive = max(worst_naive, (naive[t : t + n] - alone).abs().max().item())
            t += n
    assert worst_packed < 1e-4, worst_packed  # fp32: identical up to summation order
    assert worst_naive > 1e-2, worst_naive  # without boundaries the test can tell


def test_attention_that_ignores_the_mask_is_refused_for_packing():
    with pytest.raises(ValueError, match="cannot keep packed dialogues apart"):
        packing.check_attention("bfd", "eager")
    packing.check_attention("pad", "eager")  # one dialogue per row needs no isolation


def test_varlen_path_flattens_a_micro_batch_and_matches_each_dialogue_alone(tiny_dir, tokenizer, corpus):
    """The flash-attention layout (one row, cu_seq_lens) through the reference varlen attention."""
    packing.register_attention()
    varlen = AutoModelForCausalLM.from_pretrained(tiny_dir / "model", attn_implementation="sdpa_varlen").eval()
    plain = AutoModelForCausalLM.from_pretrained(tiny_dir / "model", attn_implementation="sdpa").eval()
    ds = data.tokenize(corpus[:40], tokenizer, seq_len=256, on_too_long="drop")
    ids, masks = ds["input_ids"], ds["assistant_mask"]
    rows = [[(i, 0, len(ids[i])) for i in (3, 11)], [(i, 0, len(ids[i])) for i in (17, 25, 30)], []]
    batch = packing.make_batch(rows, ids, masks, 0, packing_mode="bfd", attention="sdpa_varlen")
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch
    assert batch["cu_seq_lens_q"].tolist()[-1] == batch["input_ids"].shape[1]  # no padding at all
    with torch.no_grad():
        logits = varlen(**{k: v for k, v in batch.items() if k != "targets"}).logits[0]
        t = 0
        for i, s, e in (p for row in rows for p in row):
            alone = _logits(plain, packing.collate([[(i, s, e)]], ids, masks, pad_id=0))[0]
            assert (logits[t : t + e - s] - alone).abs().max().item() < 1e-4
            t += e - s
    assert packing.make_batch([[], []], ids, masks, 0, "bfd", "sdpa_varlen")["input_ids"].shape == (1, 1)


def test_flash_attention_without_gpu_falls_back_with_a_message():
    attention, why = packing.resolve_attention("flash_attention_2")
    if not torch.cuda.is_available():
        assert attention == "sdpa" and "falling back to sdpa" in why
    assert packing.resolve_attention("sdpa") == ("sdpa", None)
    if not torch.cuda.is_available():
        assert packing.resolve_attention("auto") == ("sdpa", None)
    packing.check_attention("bfd", "auto")
