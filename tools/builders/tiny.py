"""The embedded default: real dialogues from chatterbot-corpus, a tokenizer trained on them and a tiny
random model of a supported architecture, saved with `save_pretrained` so the run loads them through
the same `from_pretrained` path as a Hub model. Everything is deterministic.

Each family comes with the kind of tokenizer it meets in the wild, so that what packing and the
template must get right is exercised: StarCoder's (the StarChat tokens built in, no BOS added),
Llama's (adds a BOS, has no pad token and none of the StarChat tokens, so the run adds them and
resizes the embedding) and a plain one (no BOS, no pad, no StarChat tokens), as Qwen2's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import chatterbot_corpus
import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GPTBigCodeConfig,
    LlamaConfig,
    MixtralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2MoeConfig,
    Qwen3Config,
    Qwen3MoeConfig,
    Starcoder2Config,
)

from loop.data import templates
from loop.data.dialogues import collect

CORPUS_DIR = Path(chatterbot_corpus.__file__).parent / "data" / "english"
Family = Literal["gpt_bigcode", "starcoder2", "llama", "qwen2", "qwen3", "qwen3_moe", "qwen2_moe", "mixtral"]
TokenizerStyle = Literal["starcoder", "llama", "plain"]
TOKENIZER = {"gpt_bigcode": "starcoder", "starcoder2": "starcoder", "llama": "llama", "qwen2": "plain",
             "qwen3": "plain", "qwen3_moe": "plain", "qwen2_moe": "plain", "mixtral": "llama"}


def convert_corpus(out_file: Path) -> int:
    """Write every English chatterbot conversation as a messages-schema JSONL line. The corpus has one
    malformed conversation (trivia.yml: a string where a list belongs); it is skipped, and said so."""
    files = sorted(str(p) for p in CORPUS_DIR.glob("*.yml"))
    dialogues, report, bad = collect(files, "chatterbot")
    for where, _, reason in bad:
        print(f"skipped {Path(where).name}: {reason}")
    out_file.parent.mkdir(parents=True, exist_ok=True)
    with out_file.open("w") as f:
        for d in dialogues:
            f.write(json.dumps({"messages": d}, ensure_ascii=False) + "\n")
    return len(dialogues)


def train_tokenizer(texts: list[str], style: TokenizerStyle = "starcoder", vocab_size: int = 4096):
    """A byte-level BPE trained on `texts`, with the special tokens and BOS behaviour of `style`."""
    specials = {"starcoder": ["<|endoftext|>", *templates.STARCHAT.special_tokens],
                "llama": ["<unk>", "<s>", "</s>"], "plain": ["<|endoftext|>"]}[style]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    if style == "llama":
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", tok.token_to_id("<s>"))])
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                       model_max_length=4096)
    if style == "plain":
        return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", model_max_length=4096)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>", model_max_length=4096)
    fast.add_special_tokens({"additional_special_tokens": list(templates.STARCHAT.special_tokens)})
    # The tool-call tags as ordinary vocabulary tokens, as Qwen2.5's tokenizers have them: the StarChat template
    # then adds nothing to a tiny StarCoder-style model (so LoRA needs no trainable token rows there)
    fast.add_tokens([AddedToken(t, special=False, normalized=False) for t in templates.TOOL_TOKENS])
    return fast


def model_config(family: Family, vocab: int, hidden: int, layers: int, heads: int, positions: int, tokenizer,
                 dropout: float = 0.0):
    """A small config of `family` with what makes it differ: multi-query attention and learned positions
    (GPTBigCode); rotary positions with grouped-query attention (the others); an untied output projection
    and a sliding window on every layer (Starcoder2, as its 15B); a window on some layers only (Qwen2); query and
    key norms (Qwen3). The mixtures of experts route each token to 2 of 8 experts (4 for Mixtral), packed as
    transformers 5 keeps them, with the router logits on as the released configs ship: Qwen3-MoE as
    Qwen3-Coder-30B-A3B (normalised top-k, untied), Qwen2-MoE with its shared expert, Mixtral."""
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    if family == "gpt_bigcode":
        return GPTBigCodeConfig(vocab_size=vocab, n_positions=positions, n_embd=hidden, n_layer=layers, n_head=heads,
                                multi_query=True, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout, **ids)
    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), max_position_embeddings=positions,
                  **ids)
    if family == "starcoder2":
        return Starcoder2Config(**common, sliding_window=64, tie_word_embeddings=False, rope_theta=100_000.0,
                                residual_dropout=0.0, embedding_dropout=0.0, attention_dropout=0.0)
    if family == "llama":
        return LlamaConfig(**common, tie_word_embeddings=False)
    head_dim, moe = hidden // heads, dict(output_router_logits=True, num_experts_per_tok=2)
    if family == "qwen3":
        return Qwen3Config(**common, head_dim=head_dim, tie_word_embeddings=True)
    if family == "qwen3_moe":
        return Qwen3MoeConfig(**common, **moe, head_dim=head_dim, num_experts=8, moe_intermediate_size=hidden,
                              norm_topk_prob=True, router_aux_loss_coef=0.001, tie_word_embeddings=False)
    if family == "qwen2_moe":
        return Qwen2MoeConfig(**common, **moe, num_experts=8, moe_intermediate_size=hidden,
                              shared_expert_intermediate_size=2 * hidden, router_aux_loss_coef=0.001)
    if family == "mixtral":
        return MixtralConfig(**common, **moe, num_local_experts=4, router_aux_loss_coef=0.02,
                             tie_word_embeddings=False)
    return Qwen2Config(**common, tie_word_embeddings=True, use_sliding_window=True, sliding_window=64,
                       max_window_layers=layers // 2)


def like_config(published: dict, tokenizer, vocab_size: int | None, dropout: float, hidden: int | None = None,
                layers: int | None = None, heads: int | None = None, positions: int | None = None):
    """A config in a published model's shape (configs/models/*.json: StarCoder2-3B, say) with this tokenizer's
    special tokens and the given dropout on every rate; hidden, layers and heads, when given, scale it down for
    a CPU, keeping what makes the architecture (MLP width to hidden size, query heads per key/value head,
    window, tying, rotary base). vocab_size replaces the published vocabulary (never below the tokenizer's)."""
    raw = {k: v for k, v in published.items() if k != "architectures"}
    raw |= {k: dropout for k, v in raw.items() if ("dropout" in k or "pdrop" in k) and isinstance(v, float)}
    raw |= {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "vocab_size": max(vocab_size or raw.get("vocab_size", 0), len(tokenizer))}
    if hidden:  # every MLP width (a mixture of experts' per expert and shared ones too) keeps its ratio
        for width in ("intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size"):
            if width in raw:
                raw[width] = max(1, raw[width] * hidden // raw["hidden_size"])
        raw["hidden_size"] = hidden
    if heads:
        per_kv = raw["num_attention_heads"] // raw.get("num_key_value_heads", raw["num_attention_heads"])
        raw |= {"num_attention_heads": heads, "num_key_value_heads": max(1, heads // per_kv)}
    if layers:
        raw["num_hidden_layers"] = layers
    if positions:
        raw["max_position_embeddings"] = positions
    return AutoConfig.for_model(raw.pop("model_type"), **raw)


def build(out_dir: Path, data_file: Path, family: Family = "gpt_bigcode", hidden: int = 128, layers: int = 4,
          heads: int = 4, positions: int = 1024, seed: int = 0, vocab_size: int | None = None, device: str = "cpu",
          dtype: torch.dtype = torch.float32, dropout: float = 0.0, tokenizer_vocab: int = 4096,
          like: dict | None = None) -> None:
    """vocab_size pads the model's embedding beyond the tokenizer (StarCoder's is 49152), for benchmarks;
    device "cuda" initializes a large benchmark model in seconds instead of minutes; "meta" writes no weights.
    `like`: a published config.json's contents, whose shape the model takes instead (see like_config; hidden,
    layers, heads and positions then shrink it only when given)."""
    n = convert_corpus(data_file)
    texts = [m["content"] for line in data_file.open() for m in json.loads(line)["messages"]]
    style = TOKENIZER.get(like["model_type"], "plain") if like else TOKENIZER[family]
    tokenizer = train_tokenizer(texts, style, tokenizer_vocab)
    torch.manual_seed(seed)
    if like:
        config = like_config(like, tokenizer, vocab_size, dropout, hidden, layers, heads, positions)
        family = config.model_type
    else:
        config = model_config(family, max(vocab_size or 0, len(tokenizer)), hidden, layers, heads, positions,
                              tokenizer, dropout)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config).to(dtype)
    if device == "meta":  # the shape only (the GPU scripts' --dry-run): config and tokenizer, no weights to save
        model.config.save_pretrained(out_dir)
    else:
        model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    print(f"wrote {n} dialogues to {data_file}; {family} model ({model.num_parameters():,} parameters, "
          f"vocab {len(tokenizer)}) and tokenizer to {out_dir}")
