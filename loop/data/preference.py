"""Preference pairs, from the records users have to tokenized sequences: reading, recognising each record's
shape, validation, the split, truncation and tokenization through the chat template.

Three shapes are recognised per record, so files of different origins can be mixed:
- conversational (TRL's): `{"prompt": [messages], "chosen": [messages], "rejected": [messages]}`;
- implicit prompt (ultrafeedback_binarized's): `{"chosen": [whole dialogue], "rejected": [whole dialogue]}`,
  two dialogues that share every turn but the last assistant turn (a text `prompt` beside them is ignored);
- plain text: `{"prompt": str, "chosen": str, "rejected": str}`, one user turn and the answers.
Each becomes two whole dialogues, chosen and rejected, rendered by the same chat template as supervised
fine-tuning. Only the last assistant turn and its end token are a sequence's completion (its log-probability
is summed over them); the turns before it are its prompt, context only. A bad pair is reported as
`file:line: reason` (or skipped and counted under `data.on_bad_record: skip`), like a bad dialogue.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from loop.config import DataConfig, DataSource, DpoSettings
from loop.data import pairs as packed_pairs
from loop.data import templates
from loop.data.batches import Columns
from loop.data.dialogues import DataReport, held_out, refuse_bad, split_key, validate
from loop.data.packing import Rows
from loop.data.prepare import Prepared
from loop.data.records import DataError, Messages, read_records, renamed
from loop.data.tokenize import fingerprint, tokenizer_fingerprint

Pair = dict[str, Messages]  # {"chosen": dialogue, "rejected": dialogue}, sharing every turn but the last
Bad = tuple[str, str, str]  # (location, kind, reason)


class BadPair(ValueError):
    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind = kind


@dataclass
class PairReport(DataReport):
    """The data report of a preference run: pairs instead of dialogues, and what truncation cut."""

    records: int = 0
    skipped: Counter = field(default_factory=Counter)
    dropped_too_long: int = 0
    pairs: int = 0
    truncated_prompts: int = 0
    truncated_completions: int = 0

    def describe(self) -> str:
        skipped = ", ".join(f"{n} {kind}" for kind, n in self.skipped.items()) or "none"
        return (f"{self.pairs} preference pairs, skipped {skipped}, prompts cut {self.truncated_prompts}, "
                f"completions cut {self.truncated_completions}, dropped as too long {self.dropped_too_long}")

    def as_scalars(self) -> dict[str, float]:
        return {"data/pairs": self.pairs, "data/truncated_prompts": self.truncated_prompts,
                "data/truncated_completions": self.truncated_completions,
                "data/dropped_too_long": self.dropped_too_long} | {
            f"data/skipped/{k}": v for k, v in self.skipped.items()}


def _messages(value: Any, side: str) -> Messages:
    if not isinstance(value, list):
        raise BadPair("format", f"'{side}' must be a list of messages, got {type(value).__name__}")
    return value


def recognise(record: Any) -> Pair:
    """The record's two dialogues, whichever of the three shapes it has; BadPair says what is wrong."""
    if not isinstance(record, dict):
        raise BadPair("format", "record is not an object")
    missing = [k for k in ("chosen", "rejected") if k not in record]
    if missing:
        raise BadPair("format", f"no {' and '.join(repr(k) for k in missing)} field (a preference pair has "
                                "prompt, chosen and rejected)")
    chosen, rejected, prompt = record["chosen"], record["rejected"], record.get("prompt")
    if isinstance(chosen, str) and isinstance(rejected, str):
        if not isinstance(prompt, str):
            raise BadPair("format", "plain-text chosen and rejected need a text 'prompt'")
        for key, text in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
            if not text.strip():
                raise BadPair("empty_side", f"field {key!r} is empty")
        user = {"role": "user", "content": prompt}
        return {"chosen": [user, {"role": "assistant", "content": chosen}],
                "rejected": [user, {"role": "assistant", "content": rejected}]}
    chosen, rejected = _messages(chosen, "chosen"), _messages(rejected, "rejected")
    if isinstance(prompt, list):  # conversational: the prompt is the shared context
        if not prompt:
            raise BadPair("empty_side", "the prompt is empty")
        last = prompt[-1].get("role") if isinstance(prompt[-1], dict) else None
        if last != "user":
            raise BadPair("prompt_not_ending_with_user", f"the prompt must end with a user turn, it ends with {last!r}")
        return {"chosen": prompt + chosen, "rejected": prompt + rejected}
    return {"chosen": chosen, "rejected": rejected}  # implicit prompt


def check(pair: Pair) -> tuple[str, str] | None:
    """(kind, reason) of what makes a pair unusable, or None."""
    for side in ("chosen", "rejected"):
        if problem := validate(pair[side]):
            kind, reason = problem
            return ("empty_side" if kind in ("empty", "empty_content") else kind), f"{side}: {reason}"
    chosen, rejected = pair["chosen"], pair["rejected"]
    if chosen[:-1] != rejected[:-1]:
        context = list(zip(chosen[:-1], rejected[:-1]))
        at = next((i for i, (a, b) in enumerate(context) if a != b), len(context))
        return "differ_before_last_turn", f"chosen and rejected differ before their last turn (at messages[{at}])"
    if chosen[-1]["content"] == rejected[-1]["content"]:
        return "chosen_equals_rejected", "chosen and rejected are the same answer"
    return None


def collect(files: list[DataSource], report: PairReport) -> tuple[list[Pair], list[Bad]]:
    """Every pair of `files` that passes, and every one that does not, in file and record order."""
    pairs, bad = [], []
    for source in files:
        for where, record in renamed(read_records(source.path, source.config, source.split), source.columns):
            report.records += 1
            if isinstance(record, Exception):
                bad.append((where, "invalid_json", str(record)))
                continue
            try:
                pair = recognise(record)
            except BadPair as e:
                bad.append((where, e.kind, str(e)))
                continue
            if problem := check(pair):
                bad.append((where, *problem))
            else:
                pairs.append(pair)
    return pairs, bad


def load(cfg: DataConfig) -> tuple[list[Pair], list[Pair], PairReport]:
    """Train and held-out pairs of a DataConfig (eval_files, or a stable eval_fraction split), validated:
    every bad pair of both is listed in one DataError unless on_bad_record is "skip" (then counted)."""
    report = PairReport()
    train, bad = collect(cfg.train_files, report)
    if cfg.eval_files:
        held, bad_eval = collect(cfg.eval_files, report)
        bad += bad_eval
    else:  # a pair's side of the split depends on its content alone
        sides = [held_out(split_key(p["chosen"]), cfg.eval_fraction) for p in train]  # by first question
        train, held = [p for p, h in zip(train, sides) if not h], [p for p, h in zip(train, sides) if h]
    if cfg.on_bad_record == "error":
        refuse_bad(bad)
    report.skipped.update(Counter(kind for _, kind, _ in bad))
    if not train:
        raise DataError(f"no training pairs in {', '.join(s.path for s in cfg.train_files)}: {report.records} "
                        f"records read, {report.describe()}")
    report.pairs = len(train) + len(held)
    report.fingerprint = fingerprint(train, held)
    return train, held, report


def completion_start(mask: list[int]) -> tuple[int, int]:
    """(start, end) of the last trained run of a dialogue's mask: the last assistant turn and its end token."""
    end = len(mask)
    while end and not mask[end - 1]:
        end -= 1
    start = end
    while start and mask[start - 1]:
        start -= 1
    return start, end


def fit(prompts: list[list[int]], completions: list[list[int]], seq_len: int, max_prompt: int
        ) -> tuple[list[list[int]], list[list[int]], bool, bool]:
    """Cut a pair to its limits: each prompt to its last `max_prompt` tokens, then the completions at their
    end, the longer first, until both sequences fit one row of seq_len. Returns the cut parts and whether
    a prompt, a completion was cut."""
    cut_prompt = any(len(p) > max_prompt for p in prompts)
    prompts = [p[-max_prompt:] if len(p) > max_prompt else p for p in prompts]
    room = seq_len - sum(len(p) for p in prompts)
    short, long = sorted(len(c) for c in completions)
    if short + long <= room:
        return prompts, completions, cut_prompt, False
    cap = room - short if short <= room // 2 else room // 2
    return prompts, [c[:cap] for c in completions], cut_prompt, True


def encode(tokenizer, pair: Pair, seq_len: int, max_prompt: int) -> tuple[list[list[int]], list[list[int]], str]:
    """Both sequences of a pair as (ids, 0/1 completion mask), chosen first, and what truncation did:
    "ok", "prompt", "completion" or "both"."""
    prompts, completions = [], []
    for side in ("chosen", "rejected"):
        ids, mask = templates.encode(tokenizer, pair[side])
        start, end = completion_start(mask)
        prompts.append(ids[:start])
        completions.append(ids[start:end])
    prompts, completions, cut_prompt, cut_completion = fit(prompts, completions, seq_len, max_prompt)
    status = {(False, False): "ok", (True, False): "prompt", (False, True): "completion"}.get(
        (cut_prompt, cut_completion), "both")
    return ([p + c for p, c in zip(prompts, completions)], [[0] * len(p) + [1] * len(c) for p, c in
                                                            zip(prompts, completions)], status)


def tokenize(pairs: list[Pair], tokenizer, seq_len: int, dpo: DpoSettings, on_too_long: str, num_proc: int = 1,
             cache_dir: str | None = None, report: PairReport | None = None) -> datasets.Dataset:
    """A Dataset of sequences (input_ids, assistant_mask = the completion), two a pair: pair k's chosen is
    row 2k, its rejected row 2k + 1, the layout loop/data/batches.py reads. Cached like dialogues."""
    max_prompt = dpo.max_prompt_length or seq_len // 4
    texts = [json.dumps(p, sort_keys=True) for p in pairs]
    key = fingerprint("pairs", hashlib.sha256("\n".join(texts).encode()).hexdigest(),
                      tokenizer_fingerprint(tokenizer), seq_len, max_prompt)

    def encode_batch(batch: dict) -> dict:
        out: dict[str, list] = {"input_ids": [], "assistant_mask": [], "status": []}
        for text in batch["pair"]:
            ids, masks, status = encode(tokenizer, json.loads(text), seq_len, max_prompt)
            out["input_ids"] += ids
            out["assistant_mask"] += masks
            out["status"] += [status, status]
        return out

    if not pairs:  # e.g. eval_fraction: 0
        return datasets.Dataset.from_dict({"input_ids": [], "assistant_mask": []})
    kwargs: dict[str, Any] = {"new_fingerprint": key}
    if cache_dir:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        kwargs["cache_file_name"] = str(Path(cache_dir) / f"pairs-{key}.arrow")
    ds = datasets.Dataset.from_dict({"pair": texts}).map(
        encode_batch, batched=True, batch_size=256, remove_columns=["pair"], desc="tokenize pairs",
        num_proc=num_proc if len(texts) > 1000 else None, **kwargs)
    status = list(ds["status"])
    statuses = Counter(status[::2])
    dropping = on_too_long == "drop" and statuses["ok"] < len(pairs)
    if report is not None and dropping:
        report.dropped_too_long += len(pairs) - statuses["ok"]
    elif report is not None:
        report.truncated_prompts += statuses["prompt"] + statuses["both"]
        report.truncated_completions += statuses["completion"] + statuses["both"]
    if dropping:
        ds = ds.select([i for i, s in enumerate(status) if s == "ok"])  # both rows of a pair share it
    return ds.remove_columns("status")


def prepare(cfg: DataConfig, dpo: DpoSettings, tokenizer) -> Prepared:
    """Train and eval sequences of a preference run, with its report: load, validate, split, tokenize; the
    sequences of both in one set of columns (pair k of train: 2k chosen, 2k + 1 rejected; eval's after them),
    whole pairs packed into rows."""
    train, held, report = load(cfg)
    common = dict(tokenizer=tokenizer, seq_len=cfg.seq_len, dpo=dpo, on_too_long=cfg.on_too_long,
                  num_proc=cfg.num_proc, cache_dir=cfg.cache_dir, report=report)
    train_ds, eval_ds = tokenize(train, **common), tokenize(held, **common)
    report.pairs -= report.dropped_too_long
    if len(train_ds) == 0:
        raise DataError(f"no training pairs in {', '.join(s.path for s in cfg.train_files)} fit data.seq_len "
                        f"{cfg.seq_len}: {report.describe()}")
    columns = Columns.from_lists([*train_ds["input_ids"], *eval_ds["input_ids"]],
                                 [*train_ds["assistant_mask"], *eval_ds["assistant_mask"]])
    lengths, n = columns.lengths().tolist(), len(train_ds)
    train_rows = Rows.of(packed_pairs.plan_rows(lengths[:n], cfg.seq_len, cfg.packing))
    eval_rows = Rows.of(packed_pairs.plan_rows(lengths[n:], cfg.seq_len, cfg.packing))
    if len(eval_rows.pieces):
        eval_rows.pieces[:, 0] += n
    return Prepared(columns, np.arange(n), train_rows, {"eval": eval_rows} if len(eval_rows) else {}, report, None)


def from_dialogues(by_topic: dict[str, list[Messages]], rejected: str = "reversed", seed: int = 0) -> list[dict]:
    """Preference pairs made from dialogues, for showing preference tuning where no preference data is at
    hand: the prompt is every turn before a dialogue's last answer, chosen is that answer, and rejected is
    either the same words in reverse order ("reversed": a preference any model can learn, carried over to
    unseen prompts) or the last answer of a dialogue on another topic ("other_topic": an answer, not to this
    question; of the same topic when there is one), picked with `seed` among those whose text differs. A
    dialogue that occurs several times gives one pair, one whose rejected answer would equal its answer none.
    Returns TRL's conversational records."""
    rng = random.Random(seed)
    distinct = {topic: list({json.dumps(d, sort_keys=True): d for d in ds}.values()) for topic, ds in by_topic.items()}
    made = []
    for topic, dialogues in distinct.items():
        others = [d[-1]["content"] for t, ds in distinct.items() if t != topic or len(distinct) == 1 for d in ds]
        for d in dialogues:
            answer = d[-1]["content"]
            if rejected == "reversed":
                other = " ".join(reversed(answer.split()))
            else:
                other = next((o for o in (rng.choice(others) for _ in range(100)) if o != answer), answer)
            if other != answer:
                made.append({"prompt": d[:-1], "chosen": [d[-1]],
                             "rejected": [{"role": "assistant", "content": other}]})
    return made
