import hashlib
import json
import subprocess
import sys

import datasets
import pytest

from loop.data import dialogues as dlg
from loop.data import templates
from loop.data.dialogues import SourceReport, load_dialogues
from loop.data.records import DataError
from loop.data.tokenize import tokenize
from tests.conftest import ROOT
from tools.builders.tiny import CORPUS_DIR

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
BAD_LINES = [
    (b'{"messages": [', "invalid JSON"),
    (b'{"messages": "\xff\xfe"}', "invalid UTF-8"),
    (json.dumps({"messages": [{"role": "bot", "content": "x"}]}).encode(), "role must be one of"),
    (json.dumps({"messages": [{"role": "user", "content": " "}, {"role": "assistant", "content": "a"}]}).encode(),
     "content must be a non-empty string"),
    (json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "system", "content": "s"},
                              {"role": "assistant", "content": "a"}]}).encode(), "system message may only come first"),
    (json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "q"},
                              {"role": "assistant", "content": "a"}]}).encode(), "expected assistant, got user"),
    (json.dumps({"messages": [{"role": "user", "content": "q"}]}).encode(), "must end with an assistant turn"),
    (json.dumps({"text": "no messages"}).encode(), "no 'messages' field"),
]


@pytest.fixture
def messy(tmp_path):
    path = tmp_path / "messy.jsonl"
    lines = [json.dumps(GOOD).encode()] + [raw for raw, _ in BAD_LINES] + [json.dumps(GOOD).encode()]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_every_bad_record_is_listed_with_file_line_and_reason(messy):
    with pytest.raises(DataError) as err:
        load_dialogues([str(messy)], "messages", "error")
    text = str(err.value)
    assert text.startswith(f"{len(BAD_LINES)} bad record(s)")
    for n, (_, reason) in enumerate(BAD_LINES, start=2):
        assert f"{messy}:{n}: " in text and reason in text.split(f"{messy}:{n}: ")[1].split("\n")[0], (n, reason)


def test_skip_mode_counts_by_reason(messy):
    dialogues, report = load_dialogues([str(messy)], "messages", "skip")
    assert len(dialogues) == 2 and report.records == len(BAD_LINES) + 2
    assert sum(report.skipped.values()) == len(BAD_LINES)
    assert report.skipped["invalid_json"] == 2 and report.skipped["not_alternating"] == 1
    assert report.skipped["bad_role"] == 1


def test_too_long_dialogues_are_cut_at_a_turn_or_dropped_and_counted(tokenizer):
    long = [{"role": "user", "content": "short question"}, {"role": "assistant", "content": "short answer"},
            {"role": "user", "content": "again " * 200}, {"role": "assistant", "content": "answer " * 200}]
    fits = templates.encode(tokenizer, long[:2])[0]
    report = SourceReport()
    ds = tokenize([long], tokenizer, seq_len=len(fits) + 5, on_too_long="truncate", report=report)
    assert ds["input_ids"] == [fits] and report.truncated == 1
    report = SourceReport()
    ds = tokenize([long], tokenizer, seq_len=len(fits) + 5, on_too_long="drop", report=report)
    assert len(ds) == 0 and report.dropped_too_long == 1
    report = SourceReport()
    ds = tokenize([long], tokenizer, seq_len=len(fits) - 1, on_too_long="truncate", report=report)
    assert len(ds) == 0 and report.dropped_too_long == 1  # not even the first exchange fits


def test_chatterbot_yaml_parquet_and_json_inputs(tmp_path):
    dialogues, report = load_dialogues([str(CORPUS_DIR / "coding.yml")], "chatterbot", "error")
    assert len(dialogues) > 100 and not report.skipped
    assert all(d[-1]["role"] == "assistant" for d in dialogues)
    datasets.Dataset.from_list([{"prompt": "p", "completion": "c"}] * 3).to_parquet(tmp_path / "x.parquet")
    assert len(load_dialogues([str(tmp_path / "x.parquet")], "prompt_completion", "error")[0]) == 3
    (tmp_path / "x.json").write_text(json.dumps([GOOD, GOOD]))
    assert len(load_dialogues([str(tmp_path / "x.json")], "messages", "error")[0]) == 2
    folder = tmp_path / "hub_like"  # a dataset folder goes through load_dataset, as a Hub id does
    folder.mkdir()
    (folder / "train.jsonl").write_text(json.dumps(GOOD) + "\n")
    (folder / "test.jsonl").write_text(json.dumps(GOOD) + "\n" + json.dumps(GOOD) + "\n")
    assert len(load_dialogues([str(folder)], "messages", "error")[0]) == 1


@pytest.mark.slow
def test_convert_and_inspect_tools(tmp_path, tiny_dir):
    """Four tool processes end to end (each imports the stack: about 20 s on 2 shared cores), so in the slow tier;
    the converters behind convert_data.py are tested in process in tests/data/test_formats.py."""
    src = tmp_path / "sharegpt.jsonl"
    src.write_text(json.dumps({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]})
                   + "\n" + json.dumps({"conversations": []}) + "\n")
    run = lambda *a: subprocess.run([sys.executable, *a], capture_output=True, text=True, cwd=ROOT)  # noqa: E731
    bad = run("tools/convert_data.py", "sharegpt", str(src), "--out", str(tmp_path / "o.jsonl"))
    assert bad.returncode == 2 and f"{src}:2: the dialogue is empty" in bad.stderr
    ok = run("tools/convert_data.py", "sharegpt", str(src), "--out", str(tmp_path / "o.jsonl"), "--skip-bad")
    assert ok.returncode == 0 and ok.stdout.strip().endswith("o.jsonl; skipped 1 empty (bad records)")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"model": {"name_or_path": str(tiny_dir / "model")},
                               "data": {"train_files": [str(tiny_dir / "data" / "chatterbot.jsonl")], "seq_len": 512}}))
    out = run("tools/inspect_data.py", str(cfg), "--examples", "1", "--histogram", str(tmp_path / "h.png"),
              "--seq_len", "1024")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "[[" in out.stdout and "<|end|>]]" in out.stdout  # trained span marked, ends with the end token
    assert "packing (bfd, 1024)" in out.stdout and "efficiency" in out.stdout
    assert (tmp_path / "h.png").read_bytes()[:4] == b"\x89PNG"
    refused = run("tools/inspect_data.py", str(cfg), "--seq_len", "4096")  # what the run would refuse too
    assert refused.returncode == 2 and refused.stderr.strip() == \
        "error: data.seq_len: 4096 is above the model's context of 1024 tokens"


# The questions `tools/generate.py --held-out outputs/quickstart` asks (the first six held out), as the
# README lists them; "What is AI?" is not one: other dialogues ask it too, so all of them train.
QUICKSTART_HELD_OUT = ["You are not immortal", "When do you die", "What type of computer",
                       "can you write a Fibonacci function?", "can you write a cron job?",
                       "can you write a tuple in TypeScript?"]


def test_the_held_out_split_is_made_by_first_question(tiny_dir, tokenizer, tmp_path):
    """The quickstart's split, as prepare() makes it: no first question of a held-out dialogue is asked in the
    training set (by the old split by whole dialogue, 15 of the 48 were, "What is AI?" among them), and the
    questions the README shows as held out are on the eval side."""
    import numpy as np

    from loop.config import from_dict
    from loop.data.prepare import EVAL, TRAIN, held_out_prompts, prepare

    corpus = str(tiny_dir / "data" / "chatterbot.jsonl")
    data = from_dict({"data": {"train_files": [corpus], "eval_fraction": 0.05, "dedup": True, "seq_len": 512,
                               "cache_dir": str(tmp_path / "cache")}}).data
    use = np.load(prepare(data, tokenizer, progress=False) / "use.npy")
    dialogues = [json.loads(line)["messages"] for line in open(corpus)]
    assert len(use) == len(dialogues)
    first = {side: {next(m["content"] for m in d if m["role"] == "user") for d, u in zip(dialogues, use) if u == side}
             for side in (TRAIN, EVAL)}
    asked_in_training = {m["content"] for d, u in zip(dialogues, use) if u == TRAIN for m in d if m["role"] == "user"}
    assert len(first[EVAL]) > 20 and not first[EVAL] & asked_in_training
    assert held_out_prompts(data, 6) == QUICKSTART_HELD_OUT and set(QUICKSTART_HELD_OUT) <= first[EVAL]
    assert "What is AI?" in first[TRAIN]


def _digest_as_written_before(dialogue) -> int:
    """The digest as the first cache versions computed it (json.dumps of every message's other fields)."""
    h = hashlib.blake2b(digest_size=8)
    for message in dialogue:
        content = message.get("content")
        h.update(json.dumps({k: v for k, v in message.items() if k != "content"}, sort_keys=True,
                            ensure_ascii=False).encode() + b"\x00")
        h.update((content if isinstance(content, str) else json.dumps(content, sort_keys=True)).encode(
            "utf-8", "surrogatepass") + b"\x01")
    return int.from_bytes(h.digest(), "little")


@pytest.mark.parametrize("dialogue", [
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
    [{"role": "system", "content": "s\ud800"}, {"content": "q", "role": "user"},
     {"role": "assistant", "content": None}],
    [{"role": "assistant", "content": "x", "tool_calls": [{"function": {"name": "f", "arguments": {}}}]},
     {"role": "us\"er", "content": "ü"}, {"role": "user", "content": ["a"]}, {"role": 3, "content": "n"}],
    [{"role": "assistant", "content": "no question"}],
])
def test_digest_and_split_key_are_the_values_of_before_and_keys_gives_both_at_once(dialogue):
    """The duplicates found and the eval split of a cached corpus do not change with the faster hashing."""
    first = next((m for m in dialogue if m["role"] == "user"), None)
    assert dlg.digest(dialogue) == _digest_as_written_before(dialogue)
    assert dlg.split_key(dialogue) == _digest_as_written_before([first] if first else dialogue)
    assert dlg.keys(dialogue) == (dlg.digest(dialogue), dlg.split_key(dialogue))
