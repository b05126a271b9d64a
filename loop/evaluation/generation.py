"""The model's answers to problems, in batches, through its chat template (loop/inference/sampling.py)."""

from __future__ import annotations

import time

import torch
from tqdm import tqdm

from loop.config import EvaluationSettings
from loop.evaluation import tasks
from loop.inference import sampling


def sampling_config(settings: EvaluationSettings) -> sampling.SamplingConfig:
    """Greedy at temperature 0; above it, nucleus sampling (top-p 0.95, no top-k), as pass@k is usually measured."""
    sample = settings.temperature > 0
    return sampling.SamplingConfig(max_new_tokens=settings.max_answer_tokens, do_sample=sample,
                                   temperature=settings.temperature if sample else 1.0, top_k=0, top_p=0.95)


def answers(model, tokenizer, problems: list[dict], settings: EvaluationSettings, stop_id: int | list[int],
            synced_gpus: bool = False, seed: int = 0, show: bool = True,
            desc: str = "answers") -> tuple[list[str], float]:
    """samples_per_task answers to each problem, in order (a problem's answers next to each other), and the
    seconds it took. Sampling draws from its own generator seeded with `seed`, so it neither changes nor
    depends on the training's random state. With ZeRO-3 over several processes every process must pass as
    many problems (see sampling.answer)."""
    conversations = [tasks.question(p) for p in problems for _ in range(settings.samples_per_task)]
    cfg = sampling_config(settings)
    device = next(model.parameters()).device
    start, out = time.perf_counter(), []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        size = settings.batch_size
        for i in tqdm(range(0, len(conversations), size), desc=desc, leave=False, disable=not show):
            out += sampling.answer(model, tokenizer, conversations[i:i + size], cfg, stop_id, synced_gpus=synced_gpus)
    return out, time.perf_counter() - start
