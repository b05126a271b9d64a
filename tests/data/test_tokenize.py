"""Tokenizing costs what the input's size does: a 5,000-turn dialogue and a 50 MB line cost about what a row
can hold, not the square of their turns or many times their size. (That the ids and trained positions
equal apply_chat_template's, over the whole corpus and every family: tests/data/test_templates.py.)"""

import json
import subprocess
import sys
import time

from loop.data import templates
from loop.data.tokenize import DROPPED, TRUNCATED, Encoder
from tests.conftest import ROOT


def test_a_5000_turn_dialogue_is_cut_to_its_longest_fitting_prefix_in_well_under_2_seconds(tokenizer):
    turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i}: " + "words " * (i % 7)}
             for i in range(5000)]
    start = time.perf_counter()
    (encoded,) = Encoder(tokenizer, 1024, "truncate").encode([turns])
    ids, mask, status = encoded.ids, encoded.mask, encoded.status
    assert time.perf_counter() - start < 2.0
    assert status == TRUNCATED and len(ids) <= 1024
    # It is a prefix ending on an answer, exactly as apply_chat_template encodes it, and the next one is too long.
    end = next(k for k in range(2, len(turns) + 1, 2) if templates.encode(tokenizer, turns[:k])[0] == ids.tolist())
    assert mask.tolist() == templates.encode(tokenizer, turns[:end])[1]
    assert len(templates.encode(tokenizer, turns[: end + 2])[0]) > 1024


MEASURE = """
import resource, sys, json
from transformers import AutoTokenizer
from loop import config
from loop.data import templates
from loop.data.prepare import prepare
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1]); templates.install(tokenizer, "starchat")
cfg = config.from_dict({"data": {"train_files": [sys.argv[2]], "cache_dir": sys.argv[3], "eval_fraction": 0}}).data
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
prepare(cfg, tokenizer, progress=False)
print(json.dumps({"peak_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024}))
"""


def test_a_50_mb_line_costs_a_few_times_its_size(tiny_dir, corpus, tmp_path):
    """In a fresh interpreter, so that its peak memory is its own."""
    path = tmp_path / "big.jsonl"
    huge = [{"role": "user", "content": "Tell me everything."}, {"role": "assistant", "content": "x" * 50_000_000}]
    path.write_text(json.dumps({"messages": huge}) + "\n" + json.dumps({"messages": corpus[0]}) + "\n")
    proc = subprocess.run([sys.executable, "-c", MEASURE, str(tiny_dir / "model"), str(path), str(tmp_path / "c")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    peak = json.loads(proc.stdout.strip().splitlines()[-1])["peak_mb"]
    assert peak < 3.5 * 50, peak  # 143 MB here: read, parsed, hashed once; text that cannot fit is never rendered
    (encoded,) = Encoder(tokenizer_of(tiny_dir), 1024, "truncate").encode([huge])
    assert encoded.status == DROPPED and not encoded.pieces  # not even its first answer fits in a row


def tokenizer_of(tiny_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir / "model")
    templates.install(tok, "starchat")
    return tok
