"""The benchmarks' shared workload: a model folder's tokenizer with the StarChat template, a JSONL of
dialogues tokenized and packed (best-fit decreasing) exactly as loop/train.py does, and the rows in
the order of its first epoch, so that every baseline trains on the same rows as the loop."""

from __future__ import annotations

import argparse
from pathlib import Path

from transformers import AutoTokenizer

from loop.data import batches, packing, templates
from loop.data.dialogues import load_dialogues
from loop.data.packing import Row
from loop.data.tokenize import tokenize


def load(model_dir: str | Path, data_file: str | Path, seq_len: int, seed: int = 42):
    """(tokenizer, columns, rows in the loop's first-epoch order)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    templates.install(tokenizer, "starchat")
    dialogues, _ = load_dialogues([str(data_file)], "messages", "error")
    columns = batches.Columns.from_dataset(tokenize(dialogues, tokenizer, seq_len, "truncate"))
    rows = packing.plan_rows(columns.lengths(), seq_len, "bfd")
    order = packing.epoch_order(len(rows), seed, 0)
    return tokenizer, columns, [rows[j] for j in order]


def real_tokens(rows: list[Row]) -> int:
    return sum(e - s for row in rows for _, s, e in row)


def arguments(doc: str, steps: int, warmup: int) -> argparse.ArgumentParser:
    """The command line every baseline takes: the model folder and data, the row length, the
    micro-batch, how many steps to run and how many of them to leave out of the measurement."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a model folder (tools/make_tiny_model.py writes one)")
    p.add_argument("data", help="a JSONL of dialogues in the messages schema")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--warmup", type=int, default=warmup, help="steps left out of the measurement")
    p.add_argument("--profile", metavar="DIR", help="after the measured steps, record 3 more with the PyTorch "
                   "profiler (and one warm-up) into DIR, as loop/report/profiling.py does for the loop")
    return p


def checkpointing(on: bool) -> dict:
    """TrainingArguments' gradient checkpointing, non-reentrant as the loop's, under the name this transformers
    uses (5.2 renamed it activation_checkpointing and warns at the old name)."""
    from transformers import TrainingArguments

    name = "activation" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__ else "gradient"
    return {f"{name}_checkpointing": on, f"{name}_checkpointing_kwargs": {"use_reentrant": False}}
