"""Build the quickstart's local model, tokenizer and data (no network).

Converts the English chatterbot-corpus dialogues to the messages schema, trains a byte-level BPE
tokenizer on them, and saves a tiny GPTBigCode (StarCoder architecture, multi-query attention) with
random weights, all deterministically. The run then loads them with `from_pretrained` like any model.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from loop import export, tiny


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="artifacts/tiny-starcoder", help="model + tokenizer directory")
    p.add_argument("--data", default="artifacts/data/chatterbot.jsonl", help="converted dialogues (JSONL)")
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-positions", type=int, default=1024)
    p.add_argument("--vocab-size", type=int, help="pad the model's vocabulary (StarCoder: 49152)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="where to initialize the weights (cuda: fast for big ones)")
    p.add_argument("--dtype", choices=sorted(export.DTYPES), default="fp32", help="dtype of the saved weights")
    a = p.parse_args()
    tiny.build(Path(a.out), Path(a.data), n_embd=a.n_embd, n_layer=a.n_layer, n_head=a.n_head,
               n_positions=a.n_positions, seed=a.seed, vocab_size=a.vocab_size, device=a.device,
               dtype=export.DTYPES[a.dtype])


if __name__ == "__main__":
    main()
