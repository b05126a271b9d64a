"""Answering conversations with the chat template: samples during training and tools/generate.py."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from loop.config import TrainingConfig
from loop.data import templates
from loop.engine import registry
from loop.model import attention
from loop.state.progress import LoopState, due


@dataclass
class SamplingConfig:
    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 0.2
    top_k: int = 50
    top_p: float = 0.95
    repetition_penalty: float = 1.0


def end_token_id(tokenizer: PreTrainedTokenizerBase, model) -> int | list[int]:
    """The stop token(s): the saved generation config's eos, else the tokenizer's eos."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    return eos if eos is not None else tokenizer.eos_token_id


def role_tokens(tokenizer: PreTrainedTokenizerBase, stop_id: int | list[int]) -> list[list[int]]:
    """The template's special tokens other than the stop token: an answer never contains them, so
    generation is not allowed to produce them (a barely trained model would, and show an empty answer)."""
    stops = set(stop_id if isinstance(stop_id, list) else [stop_id])
    ids = tokenizer.convert_tokens_to_ids(tokenizer.all_special_tokens)
    return [[i] for i in ids if i not in stops and i != tokenizer.pad_token_id and i is not None]


@torch.no_grad()
def answer(model, tokenizer: PreTrainedTokenizerBase, conversations: list[list[dict]],
           sampling: SamplingConfig, stop_id: int | list[int], synced_gpus: bool = False,
           streamer=None) -> list[str]:
    """Continue each conversation with one assistant turn; return the decoded answers.

    With ZeRO-3 over several processes every process must call this with the same number of
    conversations and `synced_gpus=True`, so that all of them keep running forward passes until
    the longest answer is done.
    """
    texts = [templates.render(tokenizer, c, generation_prompt=True) for c in conversations]
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    tokenizer.padding_side = side
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    kwargs = {}
    if sampling.do_sample:
        kwargs = {"temperature": sampling.temperature, "top_k": sampling.top_k, "top_p": sampling.top_p}
    with attention.for_generation(model):
        out = model.generate(
            input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device),
            max_new_tokens=sampling.max_new_tokens, do_sample=sampling.do_sample,
            repetition_penalty=sampling.repetition_penalty, eos_token_id=stop_id, min_new_tokens=1,
            bad_words_ids=role_tokens(tokenizer, stop_id) or None, pad_token_id=tokenizer.pad_token_id,
            synced_gpus=synced_gpus, streamer=streamer, **kwargs,
        )
    model.train(was_training)
    new = out[:, enc["input_ids"].shape[1]:]
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in new]


def log_samples(model, accelerator, tokenizer: PreTrainedTokenizerBase, prompts: list[str], max_new_tokens: int,
                stop_id: int, step: int, out_dir: Path) -> None:
    """Greedy answers to the configured prompts, logged and written to OUTPUT_DIR/samples.md.

    Every process runs generate: with ZeRO-3 each forward pass gathers weights from all of them.
    """
    from tqdm import tqdm

    synced = registry.of(accelerator).synced_generation(accelerator)
    answers = [answer(accelerator.unwrap_model(model), tokenizer, [[{"role": "user", "content": p}]],
                      SamplingConfig(max_new_tokens=max_new_tokens), stop_id, synced_gpus=synced)[0]
               for p in tqdm(prompts, desc="samples", leave=False, disable=not accelerator.is_main_process)]
    text = "\n\n".join(f"**{p}**\n\n{a}" for p, a in zip(prompts, answers))
    accelerator.log({"samples": text}, step=step)
    if accelerator.is_main_process:
        (out_dir / "samples.md").write_text(f"# Samples at step {step}\n\n{text}\n")


class Sampler:
    """The loop's sampling component: answers to `training.sample_prompts` every `training.sample_every` steps
    and at the last step (never without prompts)."""

    def __init__(self, model, accelerator, tokenizer: PreTrainedTokenizerBase, training: TrainingConfig, stop_id: int,
                 total_steps: int, out_dir: Path) -> None:
        self.model, self.accelerator, self.tokenizer, self.t = model, accelerator, tokenizer, training
        self.stop_id, self.total_steps, self.out_dir = stop_id, total_steps, out_dir

    def maybe_sample(self, state: LoopState) -> None:
        if self.t.sample_prompts and due(state.step, self.t.sample_every, self.total_steps):
            log_samples(self.model, self.accelerator, self.tokenizer, self.t.sample_prompts, self.t.max_new_tokens,
                        self.stop_id, state.step, self.out_dir)
