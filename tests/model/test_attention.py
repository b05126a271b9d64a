"""Attention keeps packed dialogues apart: every choice gives each dialogue of a packed micro-batch
the logits it has alone, and choices that cannot are refused or fall back with a reason."""

import inspect
import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from loop.data import batches
from loop.data.tokenize import tokenize
from loop.model import architecture, attention, moe
from tests.conftest import FAMILIES


def native(model, ids: list[int]) -> torch.Tensor:
    """The model's own logits for one dialogue alone: its own causal (and sliding-window) masking."""
    return model(torch.tensor([ids])).logits[0]


def fake_varlen_kernel(with_gqa: bool):
    """torch's varlen_attn, computed per sequence with SDPA (its kernel is CUDA only), with the
    signature of torch 2.13 (enable_gqa) or 2.11 (none): it checks how it is called."""

    def varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), **kw):
        left, right = window_size
        assert right == 0 and torch.equal(cu_q, cu_k) and max_q == max_k
        assert with_gqa or "enable_gqa" not in kw, "torch 2.11 has no enable_gqa"
        if k.shape[1] != q.shape[1]:
            assert kw.get("enable_gqa"), "fewer key/value heads than query heads need enable_gqa"
            k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
        out = torch.empty_like(q)
        cu = cu_q.tolist()
        for a, b in zip(cu[:-1], cu[1:]):
            i = torch.arange(b - a)
            allowed = (i[:, None] >= i[None, :]) & ((i[:, None] - i[None, :] <= left) if left >= 0 else True)
            out[a:b] = F.scaled_dot_product_attention(*(t[a:b].transpose(0, 1) for t in (q, k, v)),
                                                      attn_mask=allowed, scale=scale).transpose(0, 1)
        return out

    if not with_gqa:
        params = [p for name, p in inspect.signature(varlen_attn).parameters.items() if name != "kw"]
        varlen_attn.__signature__ = inspect.Signature(params)
    return varlen_attn


CHOICES = ["sdpa", "sdpa_varlen", "varlen_attn (torch 2.13)", "varlen_attn (torch 2.11)"]


def models_with(choice: str, model_dir, monkeypatch):
    """(the model with the attention `choice`, the same model with its own sdpa masking, the implementation);
    torch's varlen kernel is faked by one with its signature (its kernel is CUDA only)."""
    impl = choice.split()[0]
    if impl == "varlen_attn":
        kernel = fake_varlen_kernel(with_gqa="2.13" in choice)
        monkeypatch.setattr(attention, "_varlen_kernel", lambda: (kernel, "2.13" in choice))
    attention.register()
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=impl).eval()
    moe.install(model, model.config, None)  # a mixture of experts' balancing loss is the loop's, not the forward's
    return model, AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa").eval(), impl


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("choice", CHOICES)
def test_packed_logits_equal_each_dialogue_alone(prepared, monkeypatch, family, choice):
    """Against the model's own masking on each dialogue alone: this is where restarting rotary position
    ids, grouped-query heads and sliding windows (64 tokens in the tiny Starcoder2 and Qwen2) are proven."""
    model_dir, tokenizer, dialogues = prepared(family)
    model, reference, impl = models_with(choice, model_dir, monkeypatch)
    by_length = sorted(dialogues, key=lambda d: -len(json.dumps(d)))
    chosen = [by_length[0], dialogues[3], dialogues[11], by_length[1], dialogues[17]]  # two past the windows
    columns = batches.Columns.from_dataset(tokenize(chosen, tokenizer, seq_len=512, on_too_long="drop"))
    lengths = columns.lengths()
    rows = [[(0, 0, lengths[0]), (1, 0, lengths[1])], [(2, 0, lengths[2]), (3, 0, lengths[3]), (4, 0, lengths[4])],
            []]
    assert min(lengths[0], lengths[3]) > 64
    layout = attention.layout(impl, "bfd")
    windows = architecture.Shape.of(model.config).mask_windows()
    batch = batches.collate(columns, rows, pad_id=0, layout=layout, mask_windows=windows)
    if layout == "varlen":  # one flattened row, no padding, no mask
        assert batch["input_ids"].shape[0] == 1 and "segment_ids" not in batch
        assert batch["cu_seq_lens_q"].tolist()[-1] == batch["input_ids"].shape[1]
    with torch.no_grad():
        packed = model(**batches.model_inputs(batches.to_device(batch, "cpu"))).logits
        worst, t = 0.0, 0
        for r, row in enumerate(rows):
            t, b = (t, 0) if layout == "varlen" else (0, r)
            for i, s, e in row:
                alone = native(reference, columns.tokens[columns.offsets[i] + s : columns.offsets[i] + e].tolist())
                worst = max(worst, (packed[b, t : t + e - s] - alone).abs().max().item())
                t += e - s
    assert worst < 1e-4, worst  # fp32: identical up to summation order


def test_without_boundaries_packed_dialogues_see_each_other(prepared):
    """What the test above would catch: the naive stream (one causal mask over the row) differs."""
    model_dir, tokenizer, dialogues = prepared("llama")
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa").eval()
    columns = batches.Columns.from_dataset(tokenize(dialogues[:20], tokenizer, seq_len=512, on_too_long="drop"))
    first, second = columns.lengths()[:2]
    row = [[(0, 0, first), (1, 0, second)]]
    with torch.no_grad():
        naive = model(**batches.model_inputs(batches.to_device(batches.collate(columns, row, 0, isolate=False),
                                                               "cpu"))).logits
        alone = native(model, columns.tokens[columns.offsets[1] : columns.offsets[2]].tolist())
    assert (naive[0, first : first + second] - alone).abs().max().item() > 1e-2


def test_choices_without_their_kernel_fall_back_with_a_reason():
    assert attention.resolve("sdpa") == ("sdpa", None)
    if torch.cuda.is_available():
        return
    chosen, why = attention.resolve("flash_attention_2")
    assert chosen == "sdpa" and "falling back to sdpa" in why
    chosen, why = attention.resolve("varlen_attn")
    assert chosen == "sdpa_varlen" and "CUDA" in why  # the same flattened layout, computed per dialogue
    assert attention.resolve("auto") == ("sdpa_varlen", None)  # on CPU each dialogue's block beats a masked row


def test_auto_prefers_flash_then_torch_varlen_unless_the_model_uses_attention_dropout(monkeypatch):
    monkeypatch.setattr(attention, "torch_varlen_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert attention.resolve("auto") == ("varlen_attn", None)
    assert attention.resolve("auto", attention_dropout=0.1) == ("sdpa", None)
    chosen, why = attention.resolve("varlen_attn", attention_dropout=0.1)
    assert chosen == "sdpa" and "dropout" in why


def test_a_varlen_model_generates_as_sdpa_does_and_keeps_its_training_choice(tiny_dir):
    """Generation pads a batch and keeps a KV cache, which the varlen functions cannot take (they failed with
    a KeyError on cu_seq_lens_q): for_generation runs it on SDPA, then gives the model its choice back."""
    from transformers import AutoTokenizer

    attention.register()
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir / "model")
    tokenizer.pad_token, tokenizer.padding_side = tokenizer.eos_token or "<|end|>", "left"
    batch = tokenizer(["what is a list", "hi"], return_tensors="pt", padding=True)  # left-padded
    answers = {}
    for name in ("sdpa", "sdpa_varlen"):
        model = AutoModelForCausalLM.from_pretrained(tiny_dir / "model", attn_implementation=name).eval()
        with attention.for_generation(model):
            answers[name] = model.generate(**batch, max_new_tokens=8, do_sample=False, pad_token_id=0)
        assert model.config._attn_implementation == name
    assert torch.equal(answers["sdpa"], answers["sdpa_varlen"])
