"""Preference records: the three shapes recognised per record, every bad pair listed or counted, the limits
cutting prompts at their start and completions at their end, and only the last answer as completion."""

import json
import subprocess
import sys

import pytest

from loop.config import DataConfig, DpoSettings
from loop.data import preference, templates
from loop.data.records import DataError
from tests.conftest import ROOT

SYSTEM = {"role": "system", "content": "Be brief."}
Q1, A1 = {"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}
Q2 = {"role": "user", "content": "And 3 + 3?"}
GOOD, BAD = {"role": "assistant", "content": "6"}, {"role": "assistant", "content": "Seven, I think."}
CONTEXT = [SYSTEM, Q1, A1, Q2]
SHAPES = {
    "conversational": {"prompt": CONTEXT, "chosen": [GOOD], "rejected": [BAD]},
    "implicit": {"chosen": [*CONTEXT, GOOD], "rejected": [*CONTEXT, BAD], "prompt": "And 3 + 3?", "score": 8},
}
BAD_PAIRS = [
    ({"prompt": CONTEXT, "chosen": [GOOD], "rejected": [GOOD]}, "chosen_equals_rejected",
     "chosen and rejected are the same answer"),
    ({"prompt": [Q1, A1], "chosen": [GOOD], "rejected": [BAD]}, "prompt_not_ending_with_user",
     "the prompt must end with a user turn, it ends with 'assistant'"),
    ({"chosen": [Q1, A1, Q2, GOOD], "rejected": [Q2, A1, Q2, BAD]}, "differ_before_last_turn",
     "chosen and rejected differ before their last turn (at messages[0])"),
    ({"chosen": [Q1, GOOD], "rejected": [Q1, A1, Q2, BAD]}, "differ_before_last_turn",
     "chosen and rejected differ before their last turn (at messages[1])"),
    ({"prompt": "q", "chosen": " ", "rejected": "no"}, "empty_side", "field 'chosen' is empty"),
    ({"prompt": [Q1], "chosen": [{"role": "assistant", "content": ""}], "rejected": [BAD]}, "empty_side",
     "chosen: messages[1]: content must be a non-empty string"),
    ({"prompt": [], "chosen": [GOOD], "rejected": [BAD]}, "empty_side", "the prompt is empty"),
    ({"prompt": [Q1], "chosen": [GOOD]}, "format", "no 'rejected' field"),
    ({"prompt": [Q1], "chosen": "6", "rejected": [BAD]}, "format", "'chosen' must be a list of messages"),
    ({"prompt": [Q1], "chosen": [Q2], "rejected": [BAD]}, "not_alternating", "chosen: turn 1: expected assistant"),
]


def write(path, records) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_each_shape_becomes_the_same_two_dialogues(shape):
    assert preference.recognise(SHAPES[shape]) == {"chosen": [*CONTEXT, GOOD], "rejected": [*CONTEXT, BAD]}


def test_plain_text_is_one_user_turn_and_the_two_answers():
    pair = preference.recognise({"prompt": "Say hi", "chosen": "Hi!", "rejected": "No."})
    assert pair == {"chosen": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hi!"}],
                    "rejected": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "No."}]}
    assert preference.check(pair) is None


def test_every_bad_pair_is_listed_with_file_line_and_reason_or_skipped_and_counted(tmp_path):
    records = [SHAPES["conversational"], *[r for r, _, _ in BAD_PAIRS], "{broken", SHAPES["implicit"]]
    path = write(tmp_path / "pairs.jsonl", records)
    cfg = DataConfig(train_files=[path], eval_fraction=0.0)
    with pytest.raises(DataError) as err:
        preference.load(cfg)
    lines = str(err.value).splitlines()
    assert lines[0].startswith(f"{len(BAD_PAIRS) + 1} bad record(s)")
    for n, (_, _, reason) in enumerate(BAD_PAIRS, start=2):
        assert lines[n - 1].startswith(f"  {path}:{n}: ") and reason in lines[n - 1], (n, lines[n - 1])
    assert lines[len(BAD_PAIRS) + 1].startswith(f"  {path}:{len(BAD_PAIRS) + 2}: invalid JSON")

    train, held, report = preference.load(DataConfig(train_files=[path], eval_fraction=0.0, on_bad_record="skip"))
    assert len(train) == 2 and held == [] and report.pairs == 2 and report.records == len(records)
    expected = {"invalid_json": 1}
    for _, kind, _ in BAD_PAIRS:
        expected[kind] = expected.get(kind, 0) + 1
    assert dict(report.skipped) == expected
    assert report.as_scalars()["data/skipped/differ_before_last_turn"] == 2


def test_the_completion_is_the_last_answer_and_its_end_token_and_the_prompt_is_the_rest(tokenizer):
    pair = preference.recognise(SHAPES["conversational"])
    (chosen, rejected), (chosen_mask, rejected_mask), status = preference.encode(tokenizer, pair, 512, 128)
    assert status == "ok"
    for ids, mask, answer in ((chosen, chosen_mask, GOOD), (rejected, rejected_mask, BAD)):
        completion = [t for t, m in zip(ids, mask) if m]
        assert tokenizer.decode(completion) == answer["content"] + "<|end|>"
        assert mask == sorted(mask)  # the earlier answer (A1) is context: one run of completion at the end
        prompt = [t for t, m in zip(ids, mask) if not m]
        assert tokenizer.decode(prompt) == templates.render(tokenizer, CONTEXT, generation_prompt=True)
    assert chosen[: chosen_mask.index(1)] == rejected[: rejected_mask.index(1)]  # the same context tokens


def test_long_prompts_keep_their_end_and_long_completions_their_start_and_both_are_counted(tokenizer, tmp_path):
    long_question = {"role": "user", "content": "Tell me everything. " * 40 + "In short?"}
    records = [{"prompt": [long_question], "chosen": [{"role": "assistant", "content": "Yes. " * 100}],
                "rejected": [{"role": "assistant", "content": "No."}]},
               {"prompt": [Q1], "chosen": [{"role": "assistant", "content": "Four. " * 200}],
                "rejected": [{"role": "assistant", "content": "Five. " * 200}]},
               SHAPES["conversational"]]
    path = write(tmp_path / "long.jsonl", records)
    pairs, _, report = preference.load(DataConfig(train_files=[path], eval_fraction=0.0))
    ds = preference.tokenize(pairs, tokenizer, 256, DpoSettings(max_prompt_length=40), "truncate", report=report)
    assert report.truncated_prompts == 1 and report.truncated_completions == 2 and report.dropped_too_long == 0
    ids, masks = ds["input_ids"], ds["assistant_mask"]
    assert len(ids) == 6 and all(len(ids[2 * k]) + len(ids[2 * k + 1]) <= 256 for k in range(3))
    first_prompt = tokenizer.decode(ids[0][: masks[0].index(1)])
    assert len(ids[0][: masks[0].index(1)]) == 40 and first_prompt.endswith("In short?<|end|>\n<|assistant|>\n")
    assert tokenizer.decode(ids[1][masks[1].index(1):]) == "No.<|end|>"  # the short side is kept whole
    assert tokenizer.decode(ids[0][masks[0].index(1):]).startswith("Yes. Yes.")  # the long side keeps its start
    assert sum(masks[2]) == sum(masks[3])  # both long completions get the same share of the row
    full = preference.encode(tokenizer, pairs[2], 256, 40)[0]
    assert [ids[4], ids[5]] == full  # a pair within the limits is untouched

    report = preference.PairReport()
    dropped = preference.tokenize(pairs, tokenizer, 256, DpoSettings(max_prompt_length=40), "drop", report=report)
    assert report.dropped_too_long == 2 and dropped["input_ids"] == [ids[4], ids[5]]


def test_prepare_splits_stably_and_refuses_an_empty_training_set(tokenizer, tmp_path):
    records = [{"prompt": f"Question {i}?", "chosen": f"Answer {i}.", "rejected": "No idea."} for i in range(60)]
    path = write(tmp_path / "plain.jsonl", records)
    cfg = DataConfig(train_files=[path], eval_fraction=0.2, seq_len=128)
    data = preference.prepare(cfg, DpoSettings(), tokenizer)
    train, held = data.train_rows.pieces[:, 0], data.eval_rows["eval"].pieces[:, 0]
    assert len(train) + len(held) == 120 and 0 < len(held) < len(train)  # two sequences a pair
    assert data.report.pairs == 60 and "60 preference pairs" in data.report.describe()
    again = preference.prepare(DataConfig(train_files=[write(tmp_path / "reversed.jsonl", records[::-1])],
                                          eval_fraction=0.2, seq_len=128), DpoSettings(), tokenizer)

    def sequences(prepared, rows):
        c = prepared.columns
        return sorted(c.tokens[c.offsets[i] : c.offsets[i + 1]].tobytes() for i in rows.pieces[:, 0])

    assert sequences(again, again.eval_rows["eval"]) == sequences(data, data.eval_rows["eval"])  # by content
    with pytest.raises(DataError, match="no training pairs in"):
        preference.prepare(DataConfig(train_files=[write(tmp_path / "none.jsonl", [BAD_PAIRS[0][0]])],
                                      on_bad_record="skip"), DpoSettings(), tokenizer)


@pytest.mark.slow
@pytest.mark.parametrize("rejected", ["reversed", "other_topic"])
def test_pairs_made_from_the_corpus_on_the_quickstarts_split(tmp_path, rejected):
    """tools/make_preference_pairs.py: one pair per distinct dialogue, the quickstart's held-out split. The tool
    end to end over the whole corpus, twice (about 18 s on 2 shared cores): in the slow tier."""
    proc = subprocess.run([sys.executable, "tools/make_preference_pairs.py", "--out", str(tmp_path / "pairs"),
                           "--rejected", rejected], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    train, held = ([json.loads(line) for line in (tmp_path / f"pairs-{n}.jsonl").open()] for n in ("train", "eval"))
    assert len(train) > 10 * len(held) > 100
    dialogues = lambda pairs: {json.dumps(p["prompt"] + p["chosen"]) for p in pairs}  # noqa: E731
    assert not dialogues(train) & dialogues(held) and len(dialogues(train)) == len(train)  # each once
    assert all(p["rejected"][0]["content"] != p["chosen"][0]["content"] for p in train + held)
    answers = lambda pairs, side: {p[side][0]["content"] for p in pairs}  # noqa: E731
    if rejected == "reversed":
        assert all(p["rejected"][0]["content"].split() == p["chosen"][0]["content"].split()[::-1] for p in held)
    else:
        assert answers(held, "rejected") <= answers(held, "chosen")  # rejected answers are held out too
    for record in train[:50]:
        assert preference.check(preference.recognise(record)) is None
