"""The model: what the loop needs to know about its architecture, checking that it can train it before
any weight is loaded, and loading it ready for training.

Verified end to end (packing, loss, resume, export, generation; tests/test_families.py): GPTBigCode
(StarCoder), Starcoder2, Llama (CodeLlama, DeepSeek-Coder) and Qwen2 (Qwen2.5-Coder). Another decoder-only
model whose class supports the attention the packing needs is trained too, with a warning.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase

from loop import config, export, lora, loss

VERIFIED = ("gpt_bigcode", "starcoder2", "llama", "qwen2")


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


def check_trainable(model_config, cfg: config.Config, attention: str) -> str | None:
    """Refuse, before any weight is loaded, a model the loop cannot train (or a run it cannot do with
    it); return a warning for one that is trainable but not among the verified families."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    kind, packing = model_config.model_type, cfg.data.packing
    if getattr(model_config, "is_encoder_decoder", False) or type(model_config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise config.ConfigError(
            f"model.name_or_path: {kind!r} is not a decoder-only causal language model; loop/train.py fine-tunes "
            f"those (verified: {', '.join(VERIFIED)})")
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(model_config)]
    needs = {"sdpa": "_supports_sdpa", "flash_attention_2": "_supports_flash_attn",
             "flash_attention_3": "_supports_flash_attn"}.get(attention, "_supports_attention_backend")
    if packing != "pad" and not getattr(model_class, needs, False):
        raise config.ConfigError(
            f"model.attn_implementation: {model_class.__name__} does not support {attention!r}, so packed dialogues "
            "would see each other; set data.packing: pad (one dialogue per row) or use a supported model")
    context = Shape.of(model_config).max_positions
    if context and cfg.data.seq_len > context:
        raise config.ConfigError(f"data.seq_len: {cfg.data.seq_len} is above the model's context of {context} tokens")
    if kind not in VERIFIED:
        return (f"{kind} is not among the verified families ({', '.join(VERIFIED)}); its class supports "
                f"{attention!r}, but check packed logits with tools/bench/packed_logits.py before a long run")
    return None


def read_config(cfg: config.Config):
    """The model's config alone (no weights), or one line saying what is missing."""
    from transformers import AutoConfig

    from loop.data import DataError, check_exists

    name = cfg.model.name_or_path
    try:
        check_exists(name)
    except DataError as e:
        raise config.ConfigError(f"model.name_or_path: {e}") from None
    if Path(name).is_dir() and not (Path(name) / "config.json").is_file():
        raise config.ConfigError(f"model.name_or_path: {name} holds no config.json (is it a model folder?)")
    try:
        return AutoConfig.from_pretrained(name, revision=cfg.model.revision,
                                          trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        where = "" if Path(name).exists() else " (not found locally, so it was read as a Hub model id)"
        raise config.ConfigError(f"model.name_or_path: cannot read {name}'s config{where}: {reason[:300]}") from None


def preflight(cfg: config.Config) -> tuple[object, str, list[str]]:
    """Everything a run checks before loading any weight: (the model's config, the attention that will be
    used, warnings). The run, tools/launch.py and tools/inspect_data.py all call this."""
    from loop import attention, metrics

    metrics.check_trackers(cfg.output.report_to)

    model_config = read_config(cfg)
    attn, fallback = attention.resolve(cfg.model.attn_implementation, attention.attention_dropout(model_config))
    unverified = check_trainable(model_config, cfg, attn)
    lora.check(cfg)
    return model_config, attn, [w for w in (fallback, unverified) if w]


def load_tokenizer(cfg: config.Config) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(cfg.model.name_or_path, revision=cfg.model.revision,
                                             trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise config.ConfigError(f"model.name_or_path: cannot load {cfg.model.name_or_path}'s tokenizer "
                                 f"({reason[:300]})") from None


def load(cfg: config.Config, attention: str, tokenizer: PreTrainedTokenizerBase, added_tokens: list[int],
         end_token: str, zero_stage: int | None, device: torch.device) -> torch.nn.Module:
    """The model from `model.name_or_path`, with the attention that keeps packed dialogues apart, room for
    the template's tokens, a generation config that stops at the end token, LoRA adapters when asked
    (loop/lora.py), and the loss head. `zero_stage` is DeepSpeed's, None without DeepSpeed."""
    quantization = lora.quantization(cfg)
    zero3 = zero_stage == 3
    model = AutoModelForCausalLM.from_pretrained(
        cfg.model.name_or_path, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code,
        attn_implementation=attention, quantization_config=quantization, dtype=weights_dtype(cfg, zero_stage),
        device_map={"": device} if quantization and not zero3 else None)  # ZeRO-3 places weights itself
    if added_tokens:
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64)
    model.generation_config = export.chat_generation_config(tokenizer, end_token)
    if cfg.model.gradient_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.2's name for it
        if enable:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora.enabled:
        if cfg.model.gradient_checkpointing:
            model.enable_input_require_grads()  # the frozen embedding must still pass gradients back
        model = lora.wrap(model, cfg.lora, added_tokens)
    loss.install_chunked_head(model, cfg.training.loss_chunk_tokens)
    if zero3 and not cfg.lora.enabled:  # with a frozen base, DeepSpeed's leaf-module backward loses the adapters
        gather_by_block(model)
    return model


def weights_dtype(cfg: config.Config, zero_stage: int | None) -> torch.dtype | str:
    """float32 for weights the optimizer updates itself; the checkpoint's own dtype ("auto") otherwise.

    transformers loads a checkpoint in the dtype it was saved in, and code models are saved in bf16.
    DeepSpeed keeps float32 master weights beside bf16 ones, but without it the loaded weights are the
    optimizer's: bf16 there would silently drop every update under ~1/256 of a weight (and autocast,
    which mixed precision means without DeepSpeed, needs float32 weights to cast from). A frozen LoRA
    base keeps its dtype: it is never updated, and halving it is the point of adapters.
    """
    return torch.float32 if zero_stage is None and not cfg.lora.enabled else "auto"


def gather_by_block(model: torch.nn.Module) -> None:
    """ZeRO-3 gathers each transformer block's weights at once (as FSDP wraps per block) instead of each
    linear layer's: one set of hooks, one fetch and one prefetch per block instead of eight, which is
    most of ZeRO-3's host time. The block classes are the ones transformers never splits across devices."""
    from deepspeed.utils import set_z3_leaf_modules

    names = set(getattr(model, "_no_split_modules", None) or [])
    classes = list({type(m) for m in model.modules() if type(m).__name__ in names})
    if classes:
        set_z3_leaf_modules(model, classes)


def _numel(p: torch.Tensor) -> int:
    """Logical elements: 4-bit packed weights keep theirs in their quant state, ZeRO-3 partitions in ds_numel."""
    state = getattr(p, "quant_state", None)
    if state is not None:
        return int(torch.Size(state.shape).numel())
    return p.ds_numel if hasattr(p, "ds_numel") else p.numel()


def parameter_count(model: torch.nn.Module) -> int:
    """Every parameter once, also when ZeRO-3 has partitioned it."""
    return sum(_numel(p) for p in model.parameters())


def counts(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters, also under ZeRO-3 and with a 4-bit base."""
    params = list(model.parameters())
    return sum(_numel(p) for p in params if p.requires_grad), sum(_numel(p) for p in params)


def matmul_parameters(model: torch.nn.Module, trainable: bool = False) -> int:
    """The parameters that take part in matrix multiplies (only the trainable ones, if asked): all but
    embedding lookups (token and learned position embeddings), except a token embedding that is also
    the output projection (tied)."""
    output = model.get_output_embeddings()
    tied = getattr(output, "weight", None)
    lookups = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding) and m.weight is not tied}
    return sum(_numel(p) for p in model.parameters()
               if id(p) not in lookups and (p.requires_grad or not trainable))
