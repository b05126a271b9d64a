"""Models in a published shape with random weights (tools/make_tiny_model.py --like), as gpu_scale.sh trains."""

import json

import torch
from transformers import AutoModelForCausalLM

from tests.conftest import ROOT
from tools.builders import tiny


def test_a_model_like_a_published_config_has_its_shape_and_shrinks_keeping_its_architecture(tokenizer):
    """The GPU figures at scale are only about StarCoder2-3B if the model built is that model: the published
    parameter count, window, grouped-query heads and tying, with the project's tokenizer's special tokens and no
    dropout; shrunk for CPU it keeps its ratios (MLP width, query heads per key/value head)."""
    published = json.loads((ROOT / "configs" / "models" / "starcoder2-3b.json").read_text())
    full = tiny.like_config(published, tokenizer, None, 0.0)
    with torch.device("meta"):
        assert AutoModelForCausalLM.from_config(full).num_parameters() == 3_030_371_328  # 3.03B, as published
    assert (full.sliding_window, full.num_key_value_heads, full.tie_word_embeddings) == (4096, 2, True)
    assert all(getattr(full, k) == 0.0 for k in ("attention_dropout", "residual_dropout", "embedding_dropout"))
    assert (full.bos_token_id, full.eos_token_id) == (tokenizer.bos_token_id, tokenizer.eos_token_id)
    small = tiny.like_config(published, tokenizer, 4096, 0.1, hidden=64, layers=2, heads=4)
    assert (small.hidden_size, small.intermediate_size, small.num_hidden_layers) == (64, 256, 2)
    assert (small.num_attention_heads, small.num_key_value_heads) == (4, 1)  # 12 query heads a key/value head: 1
    assert small.vocab_size == max(4096, len(tokenizer)) and small.residual_dropout == 0.1
    assert small.sliding_window == 4096 and small.model_type == "starcoder2"
