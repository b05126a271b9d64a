"""The long trajectories make_long_data.py writes: the same file twice, valid, every tool result the checkout's own
folder, file or search, every answer naming only what its results show, and as long as asked by the tokenizer."""

import re
import subprocess
import sys

from loop.data import calls
from loop.data.dialogues import load_dialogues
from loop.data.tokenize import OK, TRUNCATED, Encoder, cut_points
from tests.conftest import ROOT
from tools import make_long_data


def test_the_tool_writes_the_same_valid_sessions_of_real_files_twice(tiny_dir, tokenizer, tmp_path):
    args = ["--count", "3", "--seed", "1", "--tokenizer", str(tiny_dir / "model")]
    proc = subprocess.run([sys.executable, "tools/make_long_data.py", *args, "--out", str(tmp_path / "a.jsonl")],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert re.match(r"wrote 3 sessions to .*a\.jsonl: \d+-\d+ tokens, median \d+", proc.stdout), proc.stdout
    assert make_long_data.main([*args, "--out", str(tmp_path / "b.jsonl")]) == 0
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()  # deterministic
    dialogues, report = load_dialogues([str(tmp_path / "a.jsonl")], "messages", "error")
    assert len(dialogues) == 3 and not report.skipped
    results = 0
    for d in dialogues:
        messages, _ = calls.split(d)
        asked = {c["id"]: c["function"] for m in messages for c in m.get("tool_calls") or []}
        seen = ""  # the question, the calls and the results of the task so far
        for m in messages:
            if m["role"] == "user":
                seen = m["content"]
            elif m.get("tool_calls"):
                seen += str([c["function"]["arguments"] for c in m["tool_calls"]])
            elif m["role"] == "tool":
                results += 1
                seen += m["content"]
                _is_real(asked[m["tool_call_id"]], m["content"])
            elif m["role"] == "assistant" and not m.get("tool_calls"):
                for name in re.findall(r"`([^`]+)`", m["content"]):
                    assert name in seen, (name, m["content"])
    assert results > 3 * 4
    encoded = Encoder(tokenizer, 10**6, "drop").encode(dialogues)
    assert all(0.97 * 8000 <= len(e.ids) <= 1.03 * 40_000 for e in encoded), [len(e.ids) for e in encoded]
    assert all(len(cut_points(d)) >= 2 for d in dialogues)  # a session of several tasks: a short row cuts between
    for e in Encoder(tokenizer, 8192, "truncate").encode(dialogues):
        assert e.status == TRUNCATED or (e.status == OK and len(e.ids) <= 8192) or not e.pieces


def _is_real(call: dict, result: str) -> None:
    """The tool's result is what the checkout holds."""
    args = call["arguments"]
    if call["name"] == "read_file":
        assert result == (ROOT / args["path"]).read_text(), args
    elif call["name"] == "list_dir":
        assert all((ROOT / args["path"] / entry).exists() for entry in result.splitlines()), args
    else:
        for hit in result.splitlines():
            if not hit.startswith("... "):
                path, line, text = hit.split(":", 2)
                assert (ROOT / path).read_text().splitlines()[int(line) - 1].strip() == text.strip()
                assert args["text"] in text


def test_bad_arguments_are_one_line_and_exit_code_2(tmp_path, capsys):
    assert make_long_data.main(["--count", "0", "--out", str(tmp_path / "x.jsonl")]) == 2
    assert make_long_data.main(["--tokenizer", str(tmp_path / "none"), "--out", str(tmp_path / "x.jsonl")]) == 2
    said = capsys.readouterr().err.splitlines()
    assert said[0] == "error: --count must be at least 1, and 0 < --min-tokens <= --max-tokens"
    assert said[1].startswith(f"error: --tokenizer {tmp_path / 'none'}: cannot load it") and len(said) == 2
    assert not (tmp_path / "x.jsonl").exists()


def test_the_32k_recipe_trains_what_the_tool_writes_in_long_rows():
    from loop import config

    cfg = config.from_file(ROOT / "configs" / "long-trajectories-32k.yaml")
    assert [s.path for s in cfg.data.train_files] == [str(make_long_data.DEFAULT_OUT)]
    assert (cfg.data.seq_len, cfg.data.packing, cfg.data.template, cfg.data.on_too_long) == (32768, "bfd", "chatml",
                                                                                             "truncate")
    assert cfg.model.gradient_checkpointing and cfg.training.micro_batch_size == 1
