"""A run's data, end to end: the train and eval dialogues of a DataConfig, validated, split and tokenized,
with the report the run logs; and the questions a run held out, for showing what a model learned."""

from __future__ import annotations

import datasets
from transformers import PreTrainedTokenizerBase

from loop.data.dialogues import DataReport, collect, load_dialogues, refuse_bad, split
from loop.data.records import DataError
from loop.data.tokenize import fingerprint, tokenize


def prepare(cfg, tokenizer: PreTrainedTokenizerBase) -> tuple[datasets.Dataset, datasets.Dataset, DataReport]:
    """Train and eval datasets for a DataConfig: load, validate, split, tokenize. Bad records of the
    train and eval files are listed together; an empty training set is an error here, before any model
    work."""
    train, report, bad = collect(cfg.train_files, cfg.format, cfg.oasst_paths)
    if cfg.eval_files:
        held, _, bad_eval = collect(cfg.eval_files, cfg.format, cfg.oasst_paths, report)
        bad += bad_eval
    else:
        train, held = split(train, cfg.eval_fraction)
    if cfg.on_bad_record == "error":
        refuse_bad(bad)
    report.fingerprint = fingerprint(train, held)
    common = dict(tokenizer=tokenizer, seq_len=cfg.seq_len, on_too_long=cfg.on_too_long,
                  num_proc=cfg.num_proc, cache_dir=cfg.cache_dir, report=report)
    train_ds, eval_ds = tokenize(train, **common), tokenize(held, **common)
    if len(train_ds) == 0:
        raise DataError(f"no training dialogues in {', '.join(cfg.train_files)}: {report.records} records read, "
                        f"{report.describe()}")
    return train_ds, eval_ds, report


def held_out_prompts(cfg, count: int) -> list[str]:
    """The first question of `count` dialogues a run held out for evaluation (its eval files, or the
    split of its train files), for showing what a model learned on questions it never saw."""
    if cfg.eval_files:
        held, _ = load_dialogues(cfg.eval_files, cfg.format, "skip", cfg.oasst_paths)
    else:
        train, _ = load_dialogues(cfg.train_files, cfg.format, "skip", cfg.oasst_paths)
        held = split(train, cfg.eval_fraction)[1]
    firsts = [next(m["content"] for m in d if m["role"] == "user") for d in held]
    return sorted(set(firsts), key=firsts.index)[:count]
