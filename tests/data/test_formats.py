"""Converters from the record shapes users hold to the messages schema: no converter raises on what a
record holds, every bad record is named file:line: reason, and whatever is left out is counted."""

import json
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from loop.data import formats, oasst
from loop.data.dialogues import collect
from tests.conftest import ROOT

MALFORMED = Path(__file__).parents[1] / "fixtures" / "malformed"
FILES = {"messages": "messages.jsonl", "prompt_completion": "prompt_completion.jsonl", "sharegpt": "sharegpt.jsonl",
         "alpaca": "alpaca.jsonl", "oasst": "oasst.jsonl", "chatterbot": "chatterbot.yml"}
SHAREGPT_ROLES = ("['assistant', 'bard', 'bing', 'chatgpt', 'function_call', 'gpt', 'human', 'observation', 'system', "
                  "'user']")
REPORTED = {  # format -> (every line the tool reports, the dialogues it keeps, what it leaves out by design)
    "messages": ([
        ":2: invalid JSON (Expecting value, column 15)",  # where the line ends, not a line after it
        ":3: invalid UTF-8 (invalid start byte at byte 14)",
        ":4: messages must be a list of {role, content} objects, got str",
        ":5: the dialogue is empty (it needs a list of messages)",
        ":6: messages[0] must be an object with role and content, got list",
        ":7: messages[0]: role must be one of ['assistant', 'system', 'tool', 'user'], got ['user']",
        ":8: messages[0]: role must be one of ['assistant', 'system', 'tool', 'user'], got 'bot'",
        ":9: messages[0]: content must be a non-empty string",
        ":10: messages[1]: content must be a non-empty string",
        ":11: messages[1]: a system message may only come first",
        ":12: turn 1: expected assistant, got user",
        ":13: the dialogue must end with an assistant turn",
        ":14: no 'messages' field",
        ":15: record is not an object"], 2, {}),
    "sharegpt": ([
        f":2: conversations[0]: 'from' must be one of {SHAREGPT_ROLES}, got ['human']",
        f":3: conversations[0]: 'from' must be one of {SHAREGPT_ROLES}, got 'alien'",
        ":4: conversations[0]: field 'value' is not a string (got int)",
        f":5: conversations[0]: 'from' must be one of {SHAREGPT_ROLES}, got None",
        ":6: the dialogue is empty (it needs a list of messages)",
        ":7: no 'conversations' list"], 1, {}),
    "alpaca": ([
        ":2: field 'input' is not a string (got int)",
        ":3: field 'input' is not a string (got list)",
        ":5: field 'instruction' is missing",
        ":6: field 'output' is missing",
        ":7: record is not an object"], 2, {}),
    "prompt_completion": ([
        ":2: field 'prompt' is not a string (got int)",
        ":3: field 'completion' is missing",
        ":4: messages[1]: content must be a non-empty string"], 1, {}),
    "oasst": ([
        ":9: invalid JSON (Expecting property name enclosed in double quotes, column 26)",
        ":10: field 'text' is missing",
        ":11: parent 'nowhere' is not in this file",
        ":13: role must be one of ['assistant', 'prompter'], got 'user'",
        ":15: a tree must start with a prompter message",
        ":17: role 'prompter' follows a message of the same role",
        ":18: message_id 'a1' appears twice"], 1,
        {"oasst_deleted": 1, "oasst_review_failed": 1, "oasst_below_left_out": 1, "oasst_unanswered": 4}),
    "chatterbot": ([
        "#2: messages[1]: content must be a non-empty string",
        "#3: a conversation must be a list of text turns",
        "#4: a conversation needs a question and an answer, got 1 turn(s)",
        "#7: a conversation must be a list of text turns"], 3, {"unanswered_last_turn": 1}),
}


@pytest.mark.parametrize("fmt", sorted(FILES))
def test_every_malformed_record_is_named_and_nothing_raises(fmt, tmp_path):
    path = MALFORMED / FILES[fmt]
    lines, kept, left_out = REPORTED[fmt]
    run = lambda *extra: subprocess.run([sys.executable, "tools/convert_data.py", fmt, str(path), "--out",  # noqa: E731
                                         str(tmp_path / "out.jsonl"), *extra], cwd=ROOT, capture_output=True, text=True)
    refused = run()
    assert refused.returncode == 2 and "Traceback" not in refused.stderr + refused.stdout
    said = refused.stderr.splitlines()
    assert said[0] == f"error: {len(lines)} bad record(s); fix them or pass --skip-bad"  # the tool's own option
    assert said[1:] == [f"  {path}{line}" for line in lines]
    skipped = run("--skip-bad")
    assert skipped.returncode == 0 and f"wrote {kept} dialogues" in skipped.stdout, skipped.stderr
    _, report, bad = collect([str(path)], fmt)
    assert len(bad) == len(lines) and dict(report.left_out) == left_out


def test_oasst_keeps_text_roles_and_the_best_ranked_complete_path():
    rows = [("f:1", {"message_id": "q", "parent_id": None, "role": "prompter", "text": "q"}),
            ("f:2", {"message_id": "b", "parent_id": "q", "role": "assistant", "text": "second best", "rank": 1}),
            ("f:3", {"message_id": "g", "parent_id": "q", "role": "assistant", "text": "best", "rank": 0}),
            ("f:4", {"message_id": "u", "parent_id": "b", "role": "prompter", "text": "unanswered follow-up"})]
    longest = [d for _, d in oasst.dialogues(rows, "longest") if isinstance(d, list)]
    # The unanswered follow-up is trimmed first, so both branches are 2 turns long and rank decides.
    assert longest == [[{"role": "user", "content": "q"}, {"role": "assistant", "content": "best"}]]
    every = [d for _, d in oasst.dialogues(rows, "all") if isinstance(d, list)]
    assert sorted(d[1]["content"] for d in every) == ["best", "second best"]
    where = [w for w, d in oasst.dialogues(rows, "all") if isinstance(d, list)]
    assert all(w.startswith("f:1 (tree path") for w in where)  # located at the tree's first line


def test_converters_for_common_shapes():
    assert formats.prompt_completion({"prompt": "p", "completion": "c"}) == \
        [[{"role": "user", "content": "p"}, {"role": "assistant", "content": "c"}]]
    assert formats.sharegpt({"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "h"},
                                               {"from": "gpt", "value": "g"}]})[0][1:] == \
        [{"role": "user", "content": "h"}, {"role": "assistant", "content": "g"}]
    assert formats.alpaca({"instruction": "Sum", "input": "1 2", "output": "3"})[0][0]["content"] == "Sum\n\n1 2"
    assert formats.alpaca({"instruction": "Sum", "input": None, "output": "3"})[0][0]["content"] == "Sum"


def test_every_format_is_registered_once_and_errors_carry_their_location():
    assert set(formats.CONVERTERS) | {"auto"} == set(typing.get_args(formats.Format))
    records = [("f.jsonl:1", {"prompt": "p", "completion": "c"}), ("f.jsonl:2", ValueError("invalid JSON")),
               ("f.jsonl:3", {"prompt": 3})]
    out = list(formats.convert("prompt_completion", "f.jsonl", records))
    assert [where for where, _ in out] == ["f.jsonl:1", "f.jsonl:2", "f.jsonl:3"]
    assert isinstance(out[1][1], ValueError) and isinstance(out[2][1], formats.FormatError)


def test_the_chatterbot_corpus_converts_with_its_one_malformed_conversation_named():
    from tools.builders.tiny import CORPUS_DIR

    files = sorted(str(p) for p in CORPUS_DIR.glob("*.yml"))
    dialogues, report, bad = collect(files, "chatterbot")
    assert [(Path(w).name, r) for w, _, r in bad] == [("trivia.yml#13", "a conversation must be a list of text turns")]
    assert len(dialogues) > 2000 and all(isinstance(m["content"], str) for d in dialogues for m in d)
    assert json.dumps(dialogues).count('"content": "True"') == 0  # YAML's `yes` stays text as written
