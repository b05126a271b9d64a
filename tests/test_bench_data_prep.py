"""The data-preparation benchmark's parts that take seconds: its corpus (deterministic, shaped as documented,
valid for the loop with its tool calls) and its measuring (CPU-seconds and proportional memory of a process
tree). The benchmark itself runs in tools/bench/all.py (--quick: a minute)."""

import json
import sys

from loop.data import calls
from loop.data.dialogues import validate
from tools.bench import corpus
from tools.bench.measure import measure


def test_the_corpus_is_deterministic_multi_turn_and_a_share_uses_a_tool(tiny_dir, tmp_path, tokenizer):
    source = tiny_dir / "data" / "chatterbot.jsonl"
    first = corpus.build(source, tmp_path / "a.jsonl", 300, words=(100, 600), tools=0.2)
    again = corpus.build(source, tmp_path / "b.jsonl", 300, words=(100, 600), tools=0.2)
    assert first.read_bytes() == again.read_bytes()
    records = [json.loads(line) for line in first.open()]
    with_tools = [r for r in records if "tools" in r]
    assert 30 < len(with_tools) < 90  # about a fifth
    for r in records:
        plain = [m for m in r["messages"] if not m.get("tool_calls") and m["role"] != "tool"]
        assert 2 <= len(plain) <= 6 and [m["role"] for m in plain] == ["user", "assistant"] * (len(plain) // 2)
        assert validate(calls.attach(r["messages"], r.get("tools"))) is None  # the loop takes it as it is
    answers = [m["content"] for r in records for m in r["messages"] if m["role"] == "assistant" and m["content"]]
    assert all(len(a.split()) >= 100 for a in answers)
    assert 0.35 < sum("```python" in a for a in answers) / len(answers) < 0.65  # half carry code
    call = next(m for m in with_tools[0]["messages"] if m.get("tool_calls"))
    assert calls.check_call(call["tool_calls"][0], ["run_python"]) is None
    text = tokenizer.apply_chat_template(with_tools[0]["messages"], tools=with_tools[0]["tools"], tokenize=False)
    assert "<tool_call>" in text and "<tool_response>" in text and '"run_python"' in text
    # No tool share: the corpus the CPU-step benchmark has always trained on (no random draw added).
    plain = corpus.build(source, tmp_path / "c.jsonl", 50)
    assert all(set(json.loads(line)) == {"messages"} for line in plain.open())


def test_measure_counts_the_cpu_and_proportional_memory_of_the_workers(tmp_path):
    """A parent and a forked child each touch 150 MB of their own and burn CPU: both count."""
    code = ("import os, time\nblock = bytearray(150 * 2**20)\nfor i in range(0, len(block), 4096): block[i] = 1\n"
            "pid = os.fork()\nif pid == 0:\n    mine = bytearray(150 * 2**20)\n"
            "    for i in range(0, len(mine), 4096): mine[i] = 1\n"
            "    end = time.process_time() + 0.6\n    while time.process_time() < end: pass\n    os._exit(0)\n"
            "end = time.process_time() + 0.6\nwhile time.process_time() < end: pass\nos.waitpid(pid, 0)\n")
    m = measure([sys.executable, "-c", code], tree=True)
    assert m.cpu_s >= 1.1  # the parent's and the child's
    assert 0.25 < m.peak_pss_gb < m.peak_rss_gb  # the child's copy of the parent's block is shared: PSS < RSS
    assert m.started > 0 and m.wall_s >= 0.6


def test_the_report_prints_the_ratios_their_spread_the_equal_work_and_the_goals(capsys):
    from tools.bench import data_prep, provenance
    from tools.bench.measure import Measurement

    def run(wall, cpu, pss, tokens=1_000_000, trained=800_000):
        return data_prep.Run(Measurement(wall, pss * 2, 0.1, cpu, pss), wall - 0.5, 250, tokens, trained, 0.004,
                             {"tokens.bin": 0.002, "trained.bin": 0.001})

    runs = {("ours", "first"): [run(10, 12, 0.5), run(11, 13, 0.5), run(12, 14, 0.5)],
            ("ours", "cached"): [run(3, 3, 0.2)] * 3,
            ("trl", "first"): [run(20, 24, 1.0), run(33, 26, 1.5), run(18, 14, 1.0, trained=799_000)],
            ("trl", "cached"): [run(9, 7, 0.4)] * 3}
    lim = {"dialogues": 1000, "tokens": 1_000_000, "cpu_s": 10.0}
    data_prep.report(1000, runs, ["ours", "trl"], lim, provenance.Said.start(["python", "x"]))
    out = capsys.readouterr().out
    assert "TRL / ours, first: to the first step 2.05 (1.52-3.10), wall 2.00 (1.50-3.00)" in out
    assert "tokens with a training label 0.99875 (799,000 / 800,000)" in out  # the last repeat's, each side
    assert "0.10M tokens a CPU-second" in out
    assert "ours first-run CPU-s / tokenizer CPU-s <= 1.25x: 1.30 (1.20-1.40)x" in out
    assert "peak memory ours / TRL <= 0.33x (PSS, first run): 0.50 (0.33-0.50)x" in out
    assert "4.00 GB per million dialogues" in out and "tokens.bin 2.00, trained.bin 1.00 GB (75% of it)" in out


def test_cached_only_refuses_in_one_line_without_a_kept_cache(tmp_path):
    """--cached-only times the start from a cache an earlier --keep-caches left (1M: 20 minutes to make): with
    none there it would time a first run instead."""
    import pytest

    from tools.bench import data_prep

    with pytest.raises(SystemExit, match=f"^--cached-only: no cache in {tmp_path} for ours; make it with"):
        data_prep.main(["--cached-only", "--sides", "ours", "--work", str(tmp_path)])
