"""Build a local model, tokenizer and data for the quickstart, the tests and the benchmarks (no network).

Converts the English chatterbot-corpus dialogues to the messages schema, trains a byte-level BPE
tokenizer on them, and saves a small model of the chosen architecture with random weights, all
deterministically. The run then loads them with `from_pretrained` like any model.

  python tools/make_tiny_model.py                                   # the quickstart's tiny GPTBigCode
  python tools/make_tiny_model.py --family starcoder2 --out artifacts/tiny-starcoder2
  python tools/make_tiny_model.py --hidden 2048 --layers 24 --heads 16 --positions 2048 --vocab-size 49152 \\
      --device cuda --dtype bf16 --dropout 0 --out /tmp/model-1b   # the GPU benchmark's 1.1B model
  python tools/make_tiny_model.py --like configs/models/starcoder2-3b.json --device cuda --dtype bf16 \
      --dropout 0 --out /tmp/sc2-3b                                 # random weights in StarCoder2-3B's shape
  python tools/make_tiny_model.py --like configs/models/starcoder2-3b.json --hidden 64 --layers 2 --heads 4 \
      --vocab-size 4096 --out /tmp/sc2-tiny                         # the same architecture at toy size
"""

from __future__ import annotations

import argparse
import json
import sys
import typing
from pathlib import Path

if __package__ in (None, ""):  # run as `python tools/NAME.py`: tools.builders is imported from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loop.state.export import DTYPES  # noqa: E402
from tools.builders import tiny  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="artifacts/tiny-starcoder", help="model + tokenizer directory")
    p.add_argument("--data", default="artifacts/data/chatterbot.jsonl", help="converted dialogues (JSONL)")
    p.add_argument("--family", choices=typing.get_args(tiny.Family), default="gpt_bigcode",
                   help="architecture (and the kind of tokenizer it comes with; see tools/builders/tiny.py)")
    # The quickstart's model (~9M parameters): wide enough to learn the corpus's style in 3 epochs, with
    # enough dropout that its held-out loss keeps falling to the end instead of memorizing.
    # With --like these four only shrink the published shape when given.
    p.add_argument("--hidden", type=int, help="hidden size (default 384)")
    p.add_argument("--layers", type=int, help="layers (default 4)")
    p.add_argument("--heads", type=int, help="query heads (default 6; key/value heads: 1 for GPTBigCode, else half)")
    p.add_argument("--positions", type=int, help="the model's context length (default 1024)")
    p.add_argument("--like", type=Path, metavar="CONFIG.json", help="take the shape of this published config "
                   "(configs/models/*.json) instead of --family's small one, with random weights")
    p.add_argument("--vocab-size", type=int, help="pad the model's vocabulary (StarCoder: 49152)")
    p.add_argument("--tokenizer-vocab", type=int, default=4096, help="size of the BPE vocabulary trained on the corpus")
    p.add_argument("--dropout", type=float, default=0.3,
                   help="GPTBigCode's residual, embedding and attention dropout (with --like: every rate)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="where to initialize the weights (cuda: fast for big ones; meta: "
                   "the shape only, config and tokenizer written, no weights)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="dtype of the saved weights")
    a = p.parse_args()
    shape = {"hidden": a.hidden, "layers": a.layers, "heads": a.heads, "positions": a.positions}
    if not a.like:
        shape = {k: v or default for (k, v), default in zip(shape.items(), (384, 4, 6, 1024), strict=True)}
    try:
        like = json.loads(a.like.read_text()) if a.like else None
        if like is not None and "model_type" not in like:
            raise ValueError("no model_type")
    except (OSError, ValueError) as e:
        p.error(f"--like {a.like}: not a model's config.json ({e})")
    tiny.build(Path(a.out), Path(a.data), family=a.family, seed=a.seed, vocab_size=a.vocab_size, device=a.device,
               dtype=DTYPES[a.dtype], dropout=a.dropout, tokenizer_vocab=a.tokenizer_vocab,
               like=like, **shape)


if __name__ == "__main__":
    main()
