"""Look at the training data the way the loop will see it, before spending GPU hours.

Reads a run config, then validates, converts, tokenizes and packs exactly as loop/train.py does, and
shows: the first records rendered with the trained tokens marked (green in a terminal, [[...]] when
piped: the assistant's text and tool calls with their end token; never the system prompt, the tools list
or a tool's results) and what became of each (one sequence; one per assistant turn, where a template
without generation markers renders earlier turns differently later; refused, and why), token-length
statistics, skip / truncation / drop / per-turn counts, and packing efficiency.

  python tools/inspect_data.py configs/quickstart.yaml
  python tools/inspect_data.py configs/quickstart.yaml --examples 5 --histogram lengths.png --seq_len 2048
"""

from __future__ import annotations

import argparse
import sys
from itertools import islice
from pathlib import Path

from loop import config
from loop.data import templates
from loop.data.dialogues import SourceReport, dialogues_of, length_stats
from loop.data.records import DataError
from loop.data.sources import plan, read, resolve
from loop.data.tokenize import Encoder, decision
from loop.model.load import load_tokenizer, preflight
from loop.training import registry


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="a run config (configs/*.yaml); --key value overrides may follow")
    p.add_argument("--examples", type=int, default=3, help="how many rendered dialogues to show")
    p.add_argument("--histogram", type=Path, help="save a PNG histogram of dialogue lengths (needs matplotlib)")
    p.add_argument("--color", choices=["auto", "always", "never"], default="auto")
    a, overrides = p.parse_known_args(argv)
    try:
        cfg = config.from_file(a.config, overrides)
        objective = registry.pick(cfg)
        preflight(cfg, objective.dropout)  # what the run would refuse about the model (seq_len over its context)
        tokenizer = load_tokenizer(cfg)
        templates.install(tokenizer, cfg.data.template)
        data = objective.prepare(cfg, tokenizer)  # the data it trains on (for DPO: two sequences a pair)
    except (config.ConfigError, DataError, templates.TemplateError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    color = a.color == "always" or (a.color == "auto" and sys.stdout.isatty())
    columns, order = data.columns, data.order
    if objective.dialogues:  # each record's decision under the template, and its sequences marked
        show_records(cfg, tokenizer, a.examples, color)
    for n, i in enumerate([] if objective.dialogues else order[: a.examples]):
        span = slice(columns.offsets[i], columns.offsets[i + 1])
        ids, mask = columns.tokens[span].tolist(), columns.trained[span].tolist()
        print(f"--- example {n} ({objective.sequence_label(i)}{len(ids)} tokens, {sum(mask)} trained) ---")
        print(templates.mark_trained(tokenizer, ids, mask, color))
    lengths = columns.lengths()[order]
    stats = length_stats(lengths.tolist())
    total = data.report.total
    print("--- summary ---")
    print(data.report.describe())
    print(f"records read: {total.records}; dialogues: {total.dialogues} ({total.duplicates} duplicates); "
          f"{len(order)} in the training order, {sum(len(r.starts) - 1 for r in data.eval_rows.values())} eval rows")
    print(f"skipped: {dict(total.skipped) or 0}; truncated at a turn: {total.truncated}; "
          f"dropped as too long: {total.dropped_too_long}; one sequence per turn: {total.per_turn} "
          f"(+{total.per_turn_tokens:,} tokens)")
    for line in data.report.describe_sources():
        print(line)
    print("train lengths: " + ", ".join(f"{k} {v:,.0f}" for k, v in stats.items()))
    print(f"trained tokens: {int(columns.trained_counts[order].sum()):,} of {stats.get('total', 0):,}")
    print(f"packing ({cfg.data.packing}, {cfg.data.seq_len}): {len(data.train_rows)} rows, "
          f"efficiency {data.train_rows.efficiency(cfg.data.seq_len):.2%}")
    if a.histogram:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("error: --histogram needs matplotlib (pip install matplotlib)", file=sys.stderr)
            return 2
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.hist(lengths, bins=50)
        ax.axvline(cfg.data.seq_len, color="red", linestyle="--", label=f"seq_len {cfg.data.seq_len}")
        ax.set_xlabel("tokens per dialogue")
        ax.set_ylabel("dialogues")
        ax.legend()
        fig.tight_layout()
        fig.savefig(a.histogram)
        print(f"histogram saved to {a.histogram}")
    return 0


def show_records(cfg: config.Config, tokenizer, count: int, color: bool) -> None:
    """The first `count` valid records of the train sources, each with what became of it and its sequences marked."""
    encoder = Encoder(tokenizer, cfg.data.seq_len, cfg.data.on_too_long, cfg.data.template_kwargs,
                      cfg.data.on_template_change)

    def records():
        for planned in map(plan, resolve(cfg.data)):
            if planned.source.role == "train":
                found = (r for unit in planned.units for r in read(planned.source, unit))
                yield from dialogues_of(planned.fmt, planned.source.path, found, cfg.data.oasst_paths, SourceReport(),
                                        [])

    for where, dialogue in islice(records(), count):
        (encoded,) = encoder.encode([dialogue])
        print(f"--- {where}: {decision(encoded)} ---")
        pieces = encoded.pieces
        for n, (ids, mask) in enumerate(pieces):
            if len(pieces) > 1:
                print(f"--- sequence {n + 1} of {len(pieces)}: {len(ids)} tokens, {int(mask.sum())} trained ---")
            print(templates.mark_trained(tokenizer, ids.tolist(), mask.tolist(), color))


if __name__ == "__main__":
    sys.exit(main())
