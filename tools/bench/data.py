"""Data benchmark: preprocessing throughput and packing efficiency on the shipped corpus.

Ours (validate + template + tokenize + best-fit-decreasing pack) against naive padding (one dialogue
per row), naive concatenation (the original code: one stream cut into blocks, attention crossing
dialogues) and TRL's `pack_dataset` (strategies bfd and wrapped), all on the same tokenizer and the
same tokenized dialogues. Efficiency = real tokens / (rows x seq_len). TRL is installed only for
this benchmark: `pip install trl`.

  python -m tools.bench.data [--model artifacts/tiny-starcoder] [--data artifacts/data/chatterbot.jsonl]
"""

from __future__ import annotations

import argparse
import time

from transformers import AutoTokenizer

from loop.data import packing, templates
from loop.data.dialogues import load_dialogues
from loop.data.tokenize import tokenize


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="artifacts/tiny-starcoder")
    p.add_argument("--data", default="artifacts/data/chatterbot.jsonl")
    a = p.parse_args()
    from trl.data_utils import pack_dataset

    tokenizer = AutoTokenizer.from_pretrained(a.model)
    templates.install(tokenizer, "starchat")
    print(f"corpus: {a.data}; template starchat; tokenizer {a.model}")
    print(f"{'seq':>5s} {'method':34s} {'rows':>6s} {'tokens kept':>12s} {'efficiency':>11s} "
          f"{'pack s':>8s} {'dialogues/s':>12s} {'isolated':>9s}")
    for seq in (512, 2048):
        (dialogues, _), t_load = timed(lambda: load_dialogues([a.data], "messages", "error"))
        ds, t_tok = timed(lambda: tokenize(dialogues, tokenizer, seq, "truncate"))  # noqa: B023
        lengths = [len(x) for x in ds["input_ids"]]
        total = sum(lengths)
        n = len(dialogues)
        rows, t_pack = timed(lambda: packing.plan_rows(lengths, seq, "bfd"))  # noqa: B023
        ours_rate = n / (t_load + t_tok + t_pack)
        results = [("ours: validate+template+tokenize+bfd", len(rows), total, packing.efficiency(rows, seq), t_pack,
                    ours_rate, "yes")]
        pad = packing.plan_rows(lengths, seq, "pad")
        results.append(("naive padding (1 dialogue/row)", len(pad), total, packing.efficiency(pad, seq), 0.0,
                        ours_rate, "yes"))
        concat, t_cat = timed(lambda: packing.plan_rows(lengths, seq, "concat"))  # noqa: B023
        results.append(("naive concatenation (original)", len(concat), total, packing.efficiency(concat, seq), t_cat,
                        ours_rate, "no"))
        trl_in = ds.remove_columns([c for c in ds.column_names if c != "input_ids"])
        for strategy in ("bfd", "wrapped"):
            packed, t_trl = timed(lambda: pack_dataset(trl_in, seq, strategy=strategy))  # noqa: B023
            kept = sum(len(x) for x in packed["input_ids"])
            rate = n / (t_load + t_tok + t_trl)
            results.append((f"TRL pack_dataset {strategy}", len(packed), kept, kept / (len(packed) * seq), t_trl,
                            rate, "yes*" if strategy == "bfd" else "no"))
        for name, r, kept, eff, t, rate, iso in results:
            print(f"{seq:5d} {name:34s} {r:6d} {kept:12,d} {eff:11.2%} {t:8.3f} {rate:12,.0f} {iso:>9s}")
        print(f"      (validate {t_load:.2f}s, template+tokenize {t_tok:.2f}s for {n} dialogues, {total:,} tokens; "
              f"corpus lower bound {-(-total // seq)} rows)")
    print("isolated: whether dialogues in a row are kept apart. yes* = TRL keeps whole sequences and records "
          "their lengths; whether attention then stays inside each depends on the attention path it is trained with.")


if __name__ == "__main__":
    main()
