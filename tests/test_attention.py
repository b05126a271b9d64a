"""Attention keeps packed dialogues apart: every choice gives each dialogue of a packed micro-batch
the logits it has alone, and choices that cannot are refused or fall back with a reason."""

import inspect

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from loop import attention, batches, data


@pytest.fixture(scope="module")
def columns(tokenizer, corpus):
    return batches.Columns.from_dataset(data.tokenize(corpus[:40], tokenizer, seq_len=256, on_too_long="drop"))


def logits(model, batch):
    return model(**batches.model_inputs(batches.to_device(batch, "cpu"))).logits


def fake_varlen_kernel(with_gqa: bool):
    """torch's varlen_attn, computed per sequence with SDPA (its kernel is CUDA only), with the
    signature of torch 2.13 (enable_gqa) or 2.11 (none): it checks how it is called."""

    def varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), **kw):
        assert window_size == (-1, 0) and torch.equal(cu_q, cu_k) and max_q == max_k
        assert with_gqa or "enable_gqa" not in kw, "torch 2.11 has no enable_gqa"
        if k.shape[1] != q.shape[1]:
            assert kw.get("enable_gqa"), "fewer key/value heads than query heads need enable_gqa"
            k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
        out = torch.empty_like(q)
        cu = cu_q.tolist()
        for a, b in zip(cu[:-1], cu[1:]):
            out[a:b] = F.scaled_dot_product_attention(*(t[a:b].transpose(0, 1) for t in (q, k, v)), is_causal=True,
                                                      scale=scale).transpose(0, 1)
        return out

    if not with_gqa:
        params = [p for name, p in inspect.signature(varlen_attn).parameters.items() if name != "kw"]
        varlen_attn.__signature__ = inspect.Signature(params)
    return varlen_attn


@pytest.mark.parametrize("choice", ["sdpa", "sdpa_varlen", "varlen_attn (torch 2.13)", "varlen_attn (torch 2.11)"])
def test_packed_logits_equal_each_dialogue_alone(tiny_dir, columns, monkeypatch, choice):
    impl = choice.split()[0]
    if impl == "varlen_attn":
        kernel = fake_varlen_kernel(with_gqa="2.13" in choice)
        monkeypatch.setattr(attention, "_varlen_kernel", lambda: (kernel, "2.13" in choice))
    attention.register()
    model = AutoModelForCausalLM.from_pretrained(tiny_dir / "model", attn_implementation=impl).eval()
    alone_model = AutoModelForCausalLM.from_pretrained(tiny_dir / "model", attn_implementation="sdpa").eval()
    lengths = columns.lengths()
    rows = [[(i, 0, lengths[i]) for i in (3, 11)], [(i, 0, lengths[i]) for i in (17, 25, 30)], []]
    layout = attention.layout(impl, "bfd")
    batch = batches.collate(columns, rows, pad_id=0, layout=layout)
    if layout == "varlen":  # one flattened row, no padding, no mask
        assert batch["input_ids"].shape[0] == 1 and "segment_ids" not in batch
        assert batch["cu_seq_lens_q"].tolist()[-1] == batch["input_ids"].shape[1]
    with torch.no_grad():
        packed = logits(model, batch)
        naive = logits(alone_model, batches.collate(columns, rows, pad_id=0, isolate=False))
        worst = worst_naive = 0.0
        t = 0
        for r, row in enumerate(rows):
            t = t if layout == "varlen" else 0
            b = 0 if layout == "varlen" else r
            for i, s, e in row:
                alone = logits(alone_model, batches.collate(columns, [[(i, s, e)]], pad_id=0))[0]
                worst = max(worst, (packed[b, t : t + e - s] - alone).abs().max().item())
                if layout == "mask":
                    worst_naive = max(worst_naive, (naive[r, t : t + e - s] - alone).abs().max().item())
                t += e - s
    assert worst < 1e-4, worst  # fp32: identical up to summation order
    if layout == "mask":
        assert worst_naive > 1e-2, worst_naive  # without boundaries the test can tell


def test_attention_that_ignores_the_mask_is_refused_for_packing():
    assert "cannot keep packed dialogues apart" in attention.packing_problem("bfd", "eager")
    assert attention.packing_problem("pad", "eager") is None  # one dialogue per row needs no isolation
    assert attention.packing_problem("bfd", "auto") is None


def test_choices_without_their_kernel_fall_back_with_a_reason():
    assert attention.resolve("sdpa") == ("sdpa", None)
    if torch.cuda.is_available():
        return
    chosen, why = attention.resolve("flash_attention_2")
    assert chosen == "sdpa" and "falling back to sdpa" in why
    chosen, why = attention.resolve("varlen_attn")
    assert chosen == "sdpa_varlen" and "CUDA" in why  # the same flattened layout, computed per dialogue
    assert attention.resolve("auto") == ("sdpa", None)


def test_auto_prefers_flash_then_torch_varlen_unless_the_model_uses_attention_dropout(monkeypatch):
    monkeypatch.setattr(attention, "torch_varlen_available", lambda: True)
    assert attention.resolve("auto") == ("varlen_attn", None)
    assert attention.resolve("auto", attention_dropout=0.1) == ("sdpa", None)
    chosen, why = attention.resolve("varlen_attn", attention_dropout=0.1)
    assert chosen == "sdpa" and "dropout" in why
