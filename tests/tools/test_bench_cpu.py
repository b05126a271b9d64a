"""The CPU benchmarks' shared parts: the realistic corpus, where a figure comes from, and the command that runs
them all (tools/bench/corpus.py, provenance.py, all.py, train_step.py's report)."""

import json

from tools.bench import all as bench_all
from tools.bench import corpus, provenance, train_step


def source(tmp_path):
    path = tmp_path / "source.jsonl"
    lines = [{"messages": [{"role": "user", "content": f"question {i} about lists?"},
                           {"role": "assistant", "content": f"answer {i}: use reversed."}]} for i in range(30)]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_the_corpus_is_the_same_for_a_seed_and_shaped_like_sft_data(tmp_path):
    a = corpus.build(source(tmp_path), tmp_path / "a.jsonl", 200)
    b = corpus.build(source(tmp_path), tmp_path / "b.jsonl", 200)
    assert a.read_text() == b.read_text()
    assert corpus.build(source(tmp_path), tmp_path / "c.jsonl", 200, seed=1).read_text() != a.read_text()
    dialogues = [json.loads(line)["messages"] for line in a.read_text().splitlines()]
    assert {len(m) for m in dialogues} == {2, 4, 6}
    answers = [m["content"] for d in dialogues for m in d if m["role"] == "assistant"]
    words = sorted(len(t.split()) for t in answers)
    assert words[0] >= 50 and words[len(words) // 2] > 120  # long answers, unlike chatterbot's
    with_code = sum("```python" in t for t in answers) / len(answers)
    assert 0.4 < with_code < 0.6


def test_a_figure_says_its_command_commit_load_and_date():
    line = provenance.Said.start(["python", "-m", "tools.bench.x", "--steps", "3"]).line()
    assert "`python -m tools.bench.x --steps 3`" in line
    assert f"commit {provenance.commit()}" in line and "load average" in line and " UTC" in line
    assert provenance.commit()[:7].isalnum()


def test_a_part_whose_baseline_is_missing_is_named_and_skipped(tmp_path, monkeypatch, capsys):
    part = bench_all.PARTS["code_eval"]
    monkeypatch.setitem(bench_all.PARTS, "code_eval", bench_all.Part(part.section, (), (), ("no-such-program-x",)))
    out = tmp_path / "bench.md"
    assert bench_all.main(["--parts", "code_eval", "--out", str(out)]) == 0
    text = out.read_text()
    assert "skipped: no-such-program-x not installed" in text and "commit" in text and "load average" in text


def test_the_step_report_prints_the_ratio_the_spread_and_the_split(capsys):
    def side(tokens, cpu, **split):
        return {"tokens_per_s": tokens, "trained_tokens_per_s": tokens * 0.8, "s_per_step": 1.0,
                "cpu_s_per_step": cpu} | split

    ours = [side(t, 1.5, data=0.001, forward_backward=0.9, optimizer=0.05, rest=0.049) for t in (1200, 1300, 1100)]
    train_step.report(None, {"ours": ours, "trainer": [side(1000, 1.8)] * 3})
    out = capsys.readouterr().out
    assert "1.20 (1.10-1.30)" in out  # median of the ratios and their spread
    assert "repeats, x Trainer (tokens/s, in run order): 1.20, 1.30, 1.10" in out
    assert "fwd+bwd 900.0" in out and "rest 49.0" in out
