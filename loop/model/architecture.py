"""What the loop must know about an architecture before any weight is loaded: its shape, read through the
standard config names, and whether the loop can train it.

Verified end to end (packing, loss, resume, export, generation; tests/model/test_families.py): GPTBigCode
(StarCoder), Starcoder2, Llama (CodeLlama, DeepSeek-Coder), Qwen2 (Qwen2.5-Coder), Qwen3 and Qwen3-MoE
(Qwen3-Coder-30B-A3B). Another decoder-only model whose class supports the attention the packing needs is
trained too, with a warning, unless it is a mixture of experts whose router the loop does not know
(loop/model/moe.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from loop.config import Config, ConfigError
from loop.model import moe

VERIFIED = ("gpt_bigcode", "starcoder2", "llama", "qwen2", "qwen3", "qwen3_moe")


@dataclass(frozen=True)
class Shape:
    """An architecture's shape, read through the standard config names (GPTBigCode answers to them too)."""

    hidden: int
    layers: int
    q_heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    max_positions: int | None  # None: no fixed limit (ALiBi)
    windows: tuple[int | None, ...]  # each layer's sliding window (None: full causal attention)

    @classmethod
    def of(cls, model_config) -> Shape:
        c = model_config
        heads = c.num_attention_heads
        window = getattr(c, "sliding_window", None)
        kinds = getattr(c, "layer_types", None) or ["sliding_attention" if window else "full_attention"] * \
            c.num_hidden_layers
        return cls(hidden=c.hidden_size, layers=c.num_hidden_layers, q_heads=heads,
                   kv_heads=getattr(c, "num_key_value_heads", None) or heads,
                   head_dim=getattr(c, "head_dim", None) or c.hidden_size // heads, vocab=c.vocab_size,
                   max_positions=getattr(c, "n_positions", None) or getattr(c, "max_position_embeddings", None),
                   windows=tuple(window if kind == "sliding_attention" else None for kind in kinds))

    def mask_windows(self) -> int | dict[str, int | None] | None:
        """What the block-diagonal mask must also cut: one window for every layer, or per layer type when
        they differ (transformers takes a mask per layer type for such models), or nothing."""
        distinct = set(self.windows)
        if distinct == {None}:
            return None
        if len(distinct) == 1:
            return next(iter(distinct))
        return {"full_attention": None, "sliding_attention": next(w for w in distinct if w)}


def check_trainable(model_config, cfg: Config, attention: str) -> str | None:
    """Refuse, before any weight is loaded, a model the loop cannot train (or a run it cannot do with
    it); return a warning for one that is trainable but not among the verified families."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    kind, packing = model_config.model_type, cfg.data.packing
    if getattr(model_config, "is_encoder_decoder", False) or type(model_config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ConfigError(
            f"model.name_or_path: {kind!r} is not a decoder-only causal language model; loop/train.py fine-tunes "
            f"those (verified: {', '.join(VERIFIED)})")
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(model_config)]
    moe.check(model_config, model_class)
    needs = {"sdpa": "_supports_sdpa", "flash_attention_2": "_supports_flash_attn",
             "flash_attention_3": "_supports_flash_attn"}.get(attention, "_supports_attention_backend")
    if packing != "pad" and not getattr(model_class, needs, False):
        raise ConfigError(
            f"model.attn_implementation: {model_class.__name__} does not support {attention!r}, so packed dialogues "
            "would see each other; set data.packing: pad (one dialogue per row) or use a supported model")
    context = Shape.of(model_config).max_positions
    if context and cfg.data.seq_len > context:
        raise ConfigError(f"data.seq_len: {cfg.data.seq_len} is above the model's context of {context} tokens")
    if kind not in VERIFIED:
        return (f"{kind} is not among the verified families ({', '.join(VERIFIED)}); its class supports "
                f"{attention!r}, but check packed logits with tools/bench/packed_logits.py before a long run")
    return None
