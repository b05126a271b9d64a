"""Tokenizing dialogues through the chat template, once: a dialogue longer than the row is cut at a turn
boundary or dropped (and counted), and with a cache folder the result is kept for the next run, under a
key of the data, template, tokenizer and length."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Any

import datasets
from transformers import PreTrainedTokenizerBase

from loop.data import templates
from loop.data.dialogues import DataReport
from loop.data.formats import Messages


def _encode_fitting(tokenizer, dialogue: Messages, seq_len: int, on_too_long: str):
    """Encode a dialogue; if too long, keep the longest prefix ending on an assistant turn."""
    ids, mask = templates.encode(tokenizer, dialogue)
    if len(ids) <= seq_len:
        return ids, mask, "ok"
    if on_too_long == "truncate":
        ends = [i + 1 for i, m in enumerate(dialogue) if m["role"] == "assistant"][:-1]
        for end in reversed(ends):
            ids, mask = templates.encode(tokenizer, dialogue[:end])
            if len(ids) <= seq_len:
                return ids, mask, "truncated"
    return [], [], "dropped"


def fingerprint(*parts: Any) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(json.dumps(part, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    return fingerprint(tokenizer.backend_tokenizer.to_str(), tokenizer.chat_template)


def tokenize(
    dialogues: list[Messages],
    tokenizer: PreTrainedTokenizerBase,
    seq_len: int,
    on_too_long: str,
    num_proc: int = 1,
    cache_dir: str | None = None,
    report: DataReport | None = None,
) -> datasets.Dataset:
    """Tokenize through the chat template into a Dataset of input_ids and assistant_mask.

    Runs through `datasets.map` with num_proc; with a cache_dir the result is stored under a key
    of the data, template, tokenizer and length, so a second run with the same inputs reuses it.
    """
    if not dialogues:  # e.g. eval_fraction: 0
        return datasets.Dataset.from_dict({"input_ids": [], "assistant_mask": []})
    texts = [json.dumps(d, sort_keys=True) for d in dialogues]
    ds = datasets.Dataset.from_dict({"messages": texts})

    def encode(batch: dict) -> dict:
        out: dict[str, list] = {"input_ids": [], "assistant_mask": [], "status": []}
        for text in batch["messages"]:
            ids, mask, status = _encode_fitting(tokenizer, json.loads(text), seq_len, on_too_long)
            out["input_ids"].append(ids)
            out["assistant_mask"].append(mask)
            out["status"].append(status)
        return out

    key = fingerprint(hashlib.sha256("\n".join(texts).encode()).hexdigest(), tokenizer_fingerprint(tokenizer),
                      seq_len, on_too_long)
    kwargs: dict[str, Any] = {"new_fingerprint": key}
    if cache_dir:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        kwargs["cache_file_name"] = str(Path(cache_dir) / f"tokenized-{key}.arrow")
    ds = ds.map(encode, batched=True, batch_size=256, num_proc=num_proc if len(ds) > 1000 else None,
                remove_columns=["messages"], desc="tokenize", **kwargs)
    statuses = list(ds["status"])
    if report is not None:
        counts = Counter(statuses)
        report.truncated += counts.get("truncated", 0)
        report.dropped_too_long += counts.get("dropped", 0)
    keep = [i for i, s in enumerate(statuses) if s != "dropped"]
    return ds.select(keep).remove_columns("status") if len(keep) < len(ds) else ds.remove_columns("status")
