"""tools/bench/render_cost.py runs on both corpora and prints each part's cost beside the tokenizer's."""

import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.parametrize("corpus, dialogues, tokens", [("short", 300, (30, 120)), ("realistic", 40, (500, 3000))])
def test_the_cost_on_top_of_the_tokenizer_is_printed_per_dialogue(tiny_dir, tmp_path, corpus, dialogues, tokens):
    """In a fresh interpreter: the benchmark sets one thread for the tokenizer before it loads. The tiny model and
    corpus of the suite's fixture, as a fresh clone has no artifacts/ before the quickstart runs."""
    proc = subprocess.run([sys.executable, "-m", "tools.bench.render_cost", "--corpus", corpus, "--dialogues",
                           str(dialogues), "--repeats", "1", "--work", str(tmp_path), "--model",
                           str(tiny_dir / "model"), "--source", str(tiny_dir / "data" / "chatterbot.jsonl")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    head = re.search(r"(\d+) dialogues, (\d+) tokens each", proc.stdout)
    assert head and int(head[1]) == dialogues and tokens[0] <= int(head[2]) <= tokens[1], proc.stdout
    for part in ("whole", "read+JSON+validate", "render", "tokenizer", "hash", "encoder", "bookkeeping"):
        assert re.search(rf"^    {re.escape(part)} +-?\d+\.\d", proc.stdout, re.M), (part, proc.stdout)
    assert re.search(r"whole / tokenizer \d+\.\d\dx", proc.stdout) and "GiB a million dialogues" in proc.stdout
