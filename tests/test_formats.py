"""Converters from the record shapes users hold to the messages schema."""

import pytest

from loop import formats


def test_converters_for_common_shapes():
    assert formats.prompt_completion({"prompt": "p", "completion": "c"}) == \
        [[{"role": "user", "content": "p"}, {"role": "assistant", "content": "c"}]]
    assert formats.sharegpt({"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "h"},
                                               {"from": "gpt", "value": "g"}]})[0][1:] == \
        [{"role": "user", "content": "h"}, {"role": "assistant", "content": "g"}]
    assert formats.alpaca({"instruction": "Sum", "input": "1 2", "output": "3"})[0][0]["content"] == "Sum\n\n1 2"
    rows = [{"message_id": "a", "parent_id": None, "role": "prompter", "text": "q", "rank": None},
            {"message_id": "b", "parent_id": "a", "role": "assistant", "text": "a1", "rank": 1},
            {"message_id": "c", "parent_id": "a", "role": "assistant", "text": "a0", "rank": 0},
            {"message_id": "d", "parent_id": "c", "role": "prompter", "text": "q2", "rank": 0},
            {"message_id": "e", "parent_id": "d", "role": "assistant", "text": "a2", "rank": 0}]
    longest = formats.oasst_dialogues(rows, "longest")
    assert [m["content"] for m in longest[0]] == ["q", "a0", "q2", "a2"]
    assert sorted(len(d) for d in formats.oasst_dialogues(rows, "all")) == [2, 4]
    with pytest.raises(formats.FormatError, match="'from' must be one of"):
        formats.sharegpt({"conversations": [{"from": "alien", "value": "x"}]})


def test_every_format_is_registered_once_and_errors_carry_their_location():
    import typing

    assert set(formats.CONVERTERS) == set(typing.get_args(formats.Format))
    records = [("f.jsonl:1", {"prompt": "p", "completion": "c"}), ("f.jsonl:2", ValueError("invalid JSON")),
               ("f.jsonl:3", {"prompt": 3})]
    out = list(formats.convert("prompt_completion", "f.jsonl", records))
    assert [where for where, _ in out] == ["f.jsonl:1", "f.jsonl:2", "f.jsonl:3"]
    assert isinstance(out[1][1], ValueError) and isinstance(out[2][1], formats.FormatError)
    trees = list(formats.convert("oasst", "t.jsonl", [("t.jsonl:1", "not an object")]))
    assert trees and isinstance(trees[0][1], formats.FormatError)  # counted, not dropped
