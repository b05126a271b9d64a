"""A model to answer with, from wherever a user has one: a model folder or Hub id, or a training checkpoint
(its weights, read without unpickling by its engine's reader; a LoRA checkpoint's adapter merged into its base)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from loop.model import lora
from loop.state import checkpoints


def load_for_generation(path: str | Path, dtype: torch.dtype = torch.float32):
    """A model and tokenizer from a model directory (or Hub id), or from a complete, intact training
    checkpoint of any engine (its weights, a ZeRO-3 run's fp32 masters merged in memory; a LoRA checkpoint's
    adapter merged into its base; a run's checkpoints/ folder: its newest intact one). A broken checkpoint is a
    CheckpointError."""
    path_ = Path(path)
    checkpoint = checkpoints.is_checkpoint(path_)
    if checkpoint:
        path_, _, passed_over = checkpoints.usable(path_)
        for note in passed_over:
            logging.getLogger("loop").warning(note)
        path = path_
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:  # pretrained bases often have none; batches are left-padded and masked
        tokenizer.pad_token = tokenizer.eos_token
    if (path_ / "run_config.yaml").is_file() and (path_ / lora.ADAPTER_CONFIG).is_file():  # a LoRA run's checkpoint
        from loop.state import export

        return export.merged_model(path_).to(dtype).eval(), tokenizer
    if checkpoint:  # written by loop/train.py, by any engine: read without unpickling
        from loop.state import consolidate

        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=torch.float32)
        unexpected = model.load_state_dict(consolidate.state_dict(path_), strict=False).unexpected_keys
        if unexpected:  # strict=False lets the tied output projection be absent, nothing else
            raise ValueError(f"the checkpoint holds weights this model does not have ({', '.join(unexpected[:3])})")
        model.tie_weights()
        model.generation_config = GenerationConfig.from_pretrained(path)
        return model.to(dtype).eval(), tokenizer
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval(), tokenizer
