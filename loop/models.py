"""The model: loading it ready for training, and what the loop needs to know about its architecture."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase

from loop import config, export, loss


def load(cfg: config.Config, attention: str, tokenizer: PreTrainedTokenizerBase, vocab_grew: bool, end_token: str,
         zero3: bool) -> torch.nn.Module:
    """The model from `model.name_or_path`, with the attention that keeps packed dialogues apart, room for
    the template's tokens, a generation config that stops at the end token, and the loss head."""
    model = AutoModelForCausalLM.from_pretrained(
        cfg.model.name_or_path, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code,
        attn_implementation=attention)
    if vocab_grew:
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64)
    model.generation_config = export.chat_generation_config(tokenizer, end_token)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    loss.install_chunked_head(model, cfg.training.loss_chunk_tokens)
    if zero3:
        gather_by_block(model)
    return model


def gather_by_block(model: torch.nn.Module) -> None:
    """ZeRO-3 gathers each transformer block's weights at once (as FSDP wraps per block) instead of each
    linear layer's: one set of hooks, one fetch and one prefetch per block instead of eight, which is
    most of ZeRO-3's host time. The block classes are the ones transformers never splits across devices."""
    from deepspeed.utils import set_z3_leaf_modules

    names = set(getattr(model, "_no_split_modules", None) or [])
    classes = list({type(m) for m in model.modules() if type(m).__name__ in names})
    if classes:
        set_z3_leaf_modules(model, classes)


def parameter_count(model: torch.nn.Module) -> int:
    """Every parameter once, also when ZeRO-3 has partitioned it."""
    return sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters())
