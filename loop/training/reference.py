"""The reference of preference tuning without a second model: the starting model's log-probability of every
train and eval sequence, computed once before training and kept on disk.

The pass runs on the prepared engine (ZeRO-3 gathers each layer as in training, for any number of
processes) over the same packed rows and micro-batches as training and evaluation, each process on its
share, in evaluation mode; the sums are added up across processes, so every process holds all of them.
With LoRA it runs with the adapter switched off: the base is the reference. It runs before a checkpoint is
restored, so a resumed run whose cache is gone computes it again from the same starting model. The cache is
keyed by what the numbers depend on: the full content of the model's files, the tokenized data (template and
truncation in it), the rows, the precision and the attention, so a run on the same model and data reuses
it; the file carries its key and its own digest, checked on read (another model's file put under this name,
or a damaged one, is computed again with a warning).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import xxhash
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from loop.config import Config, first_line
from loop.data import cache
from loop.data.batches import Planner, to_device
from loop.data.pairs import pair_keys
from loop.data.tokenize import fingerprint
from loop.processes import any_process
from loop.training.sequences import sequence_log_probs

log = logging.getLogger("loop")


def model_identity(name_or_path: str, revision: str | None) -> dict:
    """The starting model's weights named by their whole content: per weight file (and config.json), its size
    and the XXH3 digest of every byte, so a model rewritten in place, in the same folder and at the same
    size, is another model. A Hub id is named by the files of its snapshot in the local cache. Hashed from
    memory maps on threads (xxhash lets the GIL go): about a second per 10 GB from the page cache."""
    path = Path(name_or_path)
    if not path.is_dir():
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name_or_path, "config.json", revision=revision)
        if not isinstance(cached, str):
            return {"hub": name_or_path, "revision": revision, "snapshot": None}
        path = Path(cached).parent
    weights = (".safetensors", ".bin", ".pt")
    files = [f for f in sorted(path.iterdir()) if f.suffix in weights or f.name == "config.json"]
    with ThreadPoolExecutor(min(8, len(files) or 1)) as pool:
        return {"files": {f.name: [f.stat().st_size, found] for f, found in zip(files, pool.map(cache.digest, files))}}


def cache_key(cfg: Config, planners: dict[str, Planner], added_tokens: list[int], precision: str,
              attention: str, world: int) -> str:
    """Everything a reference log-probability depends on, down to the last bit."""
    data = hashlib.sha256()
    for name, p in sorted(planners.items()):
        data.update(name.encode() + p.columns.tokens.tobytes() + p.columns.trained.tobytes()
                    + np.ascontiguousarray(p.rows.pieces).tobytes() + np.ascontiguousarray(p.rows.starts).tobytes())
    # Rows the template added to the vocabulary start random, from the run's seed.
    seed = cfg.training.seed if added_tokens else None
    return fingerprint(model_identity(cfg.model.name_or_path, cfg.model.revision), data.hexdigest(), seed,
                       cfg.data.template, cfg.lora.enabled, cfg.lora.quantize, cfg.training.micro_batch_size, world,
                       precision, attention, *_split(cfg))


def _split(cfg: Config) -> tuple[int, ...]:
    """Sequence parallelism adds in another order: a key of its own (none without it, so keys stay as they were)."""
    size = cfg.parallelism.sequence_parallel_size
    return (size,) if size > 1 else ()


def _digest(values: dict[str, np.ndarray]) -> str:
    h = xxhash.xxh3_128()
    for name, array in sorted(values.items()):
        h.update(f"{name}:{array.dtype}:{array.shape}".encode())
        h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()


def _read(path: Path, key: str) -> dict[str, np.ndarray]:
    """The cached values when the file is this key's and whole (its own digest checked); else nothing, said in
    one warning when there was a file (another model's, a corrupted or a truncated one)."""
    if not path.is_file():
        return {}
    try:
        with safe_open(path, "np") as f:
            said = f.metadata() or {}
        values = load_file(path)
    except Exception as e:  # noqa: BLE001 - safetensors raises several kinds for a damaged file
        problem = f"unreadable ({first_line(e)})"
    else:
        problem = ("made for another model or data" if said.get("key") != key else
                   "does not match its digest" if said.get("digest") != _digest(values) else None)
    if problem is None:
        return values
    log.warning(f"the reference cache {path} is {problem}; computing it again")
    return {}


@torch.no_grad()
def log_probs(model, accelerator, planner: Planner, lora: bool) -> np.ndarray:
    """Every sequence's log-probability under the model as it is, in sequence order (on every process)."""
    from tqdm import tqdm

    planner = dataclasses.replace(planner, extra=pair_keys())
    values = torch.zeros(len(planner.columns), dtype=torch.float64, device=accelerator.device)
    adapter_off = accelerator.unwrap_model(model).disable_adapter() if lora else contextlib.nullcontext()
    model.eval()
    with adapter_off:
        for batch in tqdm(planner.shard(), total=planner.shard_batches, desc="reference", leave=False,
                          disable=not accelerator.is_main_process):
            batch = to_device(batch, accelerator.device)
            summed = sequence_log_probs(model, batch).double()
            if planner.sequence[1] == 0:  # the processes sharing a row all hold its sums: one of them adds them
                values.index_add_(0, batch["sequence_ids"], summed)
    model.train()
    return accelerator.reduce(values, reduction="sum").cpu().numpy().astype(np.float32)


def attach(accelerator, model, cfg: Config, planners: dict[str, Planner], key: str, folder: Path
           ) -> dict[str, Planner]:
    """The planners (train, and each eval set) with each batch's reference log-probabilities: read from the
    cache, or computed (and the time it took logged) and cached."""
    path = folder / f"reference-{key}.safetensors"
    started = time.perf_counter()
    cached = _read(path, key)
    usable = all(cached.get(name, np.zeros(0)).shape == (len(p.columns),) for name, p in planners.items())
    pairs = {name: len(p.rows.pieces) // 2 for name, p in planners.items()}
    said = f"{pairs.get('train', 0)} train and {sum(n for k, n in pairs.items() if k != 'train')} eval pairs"
    if not any_process(accelerator, not usable):  # every process takes the same way: the pass is collective
        log.info(f"reference log-probs of {said}: read from {path}")
        values = cached
    else:
        values = {name: log_probs(model, accelerator, planner, cfg.lora.enabled) for name, planner in planners.items()}
        if accelerator.is_main_process:
            folder.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}")
            save_file(values, str(tmp), metadata={"key": key, "digest": _digest(values)})
            tmp.replace(path)  # whole or not at all: a crash leaves no half-written cache
        accelerator.wait_for_everyone()
        log.info(f"reference log-probs of {said}: computed in {time.perf_counter() - started:.1f} s "
                 f"(the starting model{' with its adapter off' if cfg.lora.enabled else ''}), cached in {path}")
    return {name: dataclasses.replace(p, extra=pair_keys(values[name])) for name, p in planners.items()}
