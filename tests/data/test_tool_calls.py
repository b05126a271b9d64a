"""Tool use in the schema: calls, results and a dialogue's tool list, each violation named by file and line."""

import json

import pytest

from loop.data import calls
from loop.data.dialogues import load_dialogues, validate
from loop.data.records import DataError

CALC = {"type": "function", "function": {"name": "calculator", "description": "Evaluate arithmetic.",
                                         "parameters": {"type": "object", "required": ["expression"],
                                                        "properties": {"expression": {"type": "string"}}}}}
CLOCK = {"type": "function", "function": {"name": "clock", "description": "The time now.",
                                          "parameters": {"type": "object", "properties": {}}}}


def calling(*made: dict, content=None) -> dict:
    return {"role": "assistant", "content": content, "tool_calls": list(made)}


def record(messages: list, tools: list | None = (CALC, CLOCK)) -> dict:
    return {"messages": messages, **({"tools": list(tools)} if tools is not None else {})}


Q = {"role": "user", "content": "What is 6*7?"}
A = {"role": "assistant", "content": "42."}
GOOD = [
    record([Q, calling(calls.call("calculator", {"expression": "6*7"}, "c1")),
            {"role": "tool", "tool_call_id": "c1", "content": "42"}, A]),
    # arguments as a JSON string, text beside the call, a result matched by name, no tool list at all
    record([{"role": "system", "content": "Use tools."}, Q,
            calling(calls.call("calculator", '{"expression": "6*7"}'), content="Let me compute."),
            {"role": "tool", "name": "calculator", "content": "42"}, A], tools=None),
    # two calls answered in order, then a second round
    record([Q, calling(calls.call("clock", {}), calls.call("calculator", {"expression": "1+1"})),
            {"role": "tool", "content": "12:00"}, {"role": "tool", "content": "2"},
            calling(calls.call("clock", {})), {"role": "tool", "content": "12:01"}, A,
            {"role": "user", "content": "thanks"}, {"role": "assistant", "content": "welcome"}]),
    {"messages": [Q, A], "tools": json.dumps([CALC])},  # a tool list kept as JSON text
]
BAD = [
    (record([Q, calling(calls.call("shell", {"cmd": "ls"})), {"role": "tool", "content": "x"}, A]),
     "unknown_tool", "calls the tool 'shell', which is not in the dialogue's tools ['calculator', 'clock']"),
    (record([Q, calling(calls.call("calculator", '{"expression": 6*7}')), {"role": "tool", "content": "42"}, A]),
     "bad_arguments", "arguments are not valid JSON"),
    (record([Q, calling(calls.call("calculator", "[" * 10_000 + "]" * 10_000)), {"role": "tool", "content": "4"}, A]),
     "bad_arguments", "arguments are not valid JSON (nested too deeply to be a record)"),  # not RecursionError
    (record([Q, calling(calls.call("calculator", "[" * 201 + "]" * 201)), {"role": "tool", "content": "4"}, A]),
     "bad_arguments", "arguments are not valid JSON (nested too deeply to be a record)"),  # parses, too deep
    (record([Q, calling(calls.call("calculator", "[1, 2]")), {"role": "tool", "content": "42"}, A]),
     "bad_arguments", "arguments must be a JSON object, got list"),
    (record([Q, {"role": "tool", "content": "42"}, A]), "tool_without_call", "a tool result with no tool call"),
    (record([Q, calling(calls.call("clock", {}, "c1")), {"role": "tool", "tool_call_id": "c9", "content": "x"}, A]),
     "tool_without_call", "a tool result for 'c9', which no pending call made"),
    (record([Q, calling(calls.call("calculator", {"expression": "6*7"})), A]),
     "unanswered_call", "the call(s) to ['calculator'] were never answered"),
    (record([Q, calling(calls.call("calculator", {"expression": "6*7"}))]),
     "unanswered_call", "never answered"),
    (record([Q, calling(calls.call("clock", {}), calls.call("clock", {})), {"role": "tool", "content": "x"}, A]),
     "unanswered_call", "never answered"),
    (record([Q, {"role": "assistant", "content": None}]), "empty_content", "content must be a non-empty string"),
    (record([Q, {"role": "assistant", "tool_calls": []}]), "empty_content", "tool_calls must be a non-empty list"),
    (record([Q, calling({"function": {"arguments": {}}}), {"role": "tool", "content": "x"}, A]),
     "bad_tool_call", "a tool call must be"),
    (record([Q, A], tools=[{"description": "nameless"}]), "bad_tools", "tools[0] must be a function definition"),
    (record([{"role": "user", "content": "q", "tool_calls": [calls.call("clock", {})]}, A]),
     "empty_content", "only assistant messages make tool calls"),
]


def test_tool_calls_results_and_tool_lists_are_valid_dialogues(tmp_path):
    path = tmp_path / "tools.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in GOOD))
    dialogues, report = load_dialogues([str(path)], "messages", "error")
    assert len(dialogues) == len(GOOD) and not report.skipped
    messages, tools = calls.split(dialogues[0])
    assert tools == [CALC, CLOCK] and "tools" not in messages[0] and messages == GOOD[0]["messages"]
    assert calls.split(dialogues[1])[1] is None and calls.split(dialogues[3])[1] == [CALC]


@pytest.mark.parametrize("bad, kind, reason", BAD, ids=[f"{k}-{i}" for i, (_, k, _) in enumerate(BAD)])
def test_each_violation_has_its_kind_and_reason(bad, kind, reason):
    found = validate(calls.attach(bad["messages"], bad.get("tools")))
    assert found is not None and found[0] == kind and reason in found[1], found


def test_every_bad_tool_record_is_named_by_file_and_line_and_counted_when_skipped(tmp_path):
    path = tmp_path / "mixed.jsonl"
    lines = [json.dumps(GOOD[0])] + [json.dumps(b) for b, _, _ in BAD] + [json.dumps({"messages": [Q, A],
                                                                                         "tools": "[{"})]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as err:
        load_dialogues([str(path)], "messages", "error")
    text = str(err.value)
    assert text.startswith(f"{len(BAD) + 1} bad record(s)")
    for n, (_, _, reason) in enumerate(BAD, start=2):
        assert reason in text.split(f"{path}:{n}: ")[1].split("\n")[0], (n, reason)
    assert f"{path}:{len(BAD) + 2}: field 'tools': invalid JSON" in text
    dialogues, report = load_dialogues([str(path)], "messages", "skip")
    assert len(dialogues) == 1
    assert report.skipped["unanswered_call"] == 3 and report.skipped["tool_without_call"] == 2
    assert report.skipped["bad_arguments"] == 4 and report.skipped["unknown_tool"] == 1


def test_inspect_data_marks_the_calls_trained_and_never_the_tools_list_or_results(tmp_path, tiny_dir):
    """What is trained, as a user checks it: each call and answer inside [[...]] with its end token; the tools
    list in the system turn and every <tool_response> outside."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    data = tmp_path / "tools.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in GOOD[:3]))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"model": {"name_or_path": str(tiny_dir / "model")},
                               "data": {"train_files": [str(data)], "seq_len": 1024, "eval_fraction": 0,
                                        "cache_dir": str(tmp_path / "cache")}}))
    out = subprocess.run([sys.executable, "tools/inspect_data.py", str(cfg), "--examples", "3"], capture_output=True,
                         text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    shown = out.stdout.split("--- summary ---")[0]
    trained = "".join(part.split("]]")[0] for part in shown.split("[[")[1:])
    untrained = "".join(part.split("]]")[-1] for part in shown.split("[["))
    assert trained.count("<tool_call>") == 5 and trained.count("</tool_call><|end|>") == 4
    assert '{"name": "calculator", "arguments": {"expression": "6*7"}}' in trained and "42.<|end|>" in trained
    assert "<tool_response>" not in trained and "<tools>" not in trained and "Use tools." not in trained
    assert untrained.count("<tool_response>") == 5 and untrained.count("\n<tools>\n") == 2  # GOOD[1] has none


SHAREGPT_CALLS = {"system": "You can compute.", "tools": json.dumps([CALC["function"]]), "conversations": [
    {"from": "human", "value": "What is 6*7?"},
    {"from": "function_call", "value": json.dumps({"name": "calculator", "arguments": {"expression": "6*7"}})},
    {"from": "observation", "value": "42"}, {"from": "gpt", "value": "42."}]}
OPENAI_CALL = {"name": "calculator", "arguments": '{"expression": "6*7"}'}
OPENAI_FUNCTIONS = {"functions": [CALC["function"]], "messages": [
    Q, {"role": "assistant", "content": None, "function_call": OPENAI_CALL},
    {"role": "function", "name": "calculator", "content": "42"},
    {"role": "assistant", "content": "42.", "function_call": None}]}
CONVERTED = {
    "sharegpt": (SHAREGPT_CALLS, [
        ({**SHAREGPT_CALLS, "conversations": [SHAREGPT_CALLS["conversations"][0],
                                              {"from": "function_call", "value": "calculator(6*7)"}]},
         "conversations[1]: a function_call value must be a JSON {name, arguments} object: invalid JSON"),
        ({**SHAREGPT_CALLS, "conversations": SHAREGPT_CALLS["conversations"][:2] + [{"from": "gpt", "value": "?"}]},
         "the call(s) to ['calculator'] were never answered"),
        ({**SHAREGPT_CALLS, "tools": json.dumps([CLOCK["function"]])}, "calls the tool 'calculator', which is not")]),
    "messages": (OPENAI_FUNCTIONS, [
        ({**OPENAI_FUNCTIONS, "messages": [Q, {"role": "assistant", "function_call": "calculator"}]},
         "messages[1]: function_call must be an object with a name and arguments"),
        ({**OPENAI_FUNCTIONS, "messages": [Q, {"role": "function", "name": "calculator", "content": "1"}, A]},
         "a tool result with no tool call before it"),
        ({**OPENAI_FUNCTIONS, "tools": [CALC]}, "a record gives both 'tools' and the older 'functions'")]),
}


@pytest.mark.parametrize("fmt", sorted(CONVERTED))
def test_function_calling_sharegpt_and_openai_functions_convert_to_the_schema(tmp_path, fmt):
    """ShareGPT's function_call / observation turns and OpenAI's older functions / function_call shape become
    tool_calls, tool results and a tools list; bad records are named and counted as every converter's are."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    good, bad = CONVERTED[fmt]
    src, out = tmp_path / f"{fmt}.jsonl", tmp_path / f"{fmt}-out.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in [good, *(b for b, _ in bad), good]))
    command = [sys.executable, "tools/convert_data.py", fmt, str(src), "--out", str(out)]
    refused = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    said = refused.stderr.splitlines()
    assert refused.returncode == 2 and said[0] == f"error: {len(bad)} bad record(s); fix them or pass --skip-bad"
    for line, (n, (_, reason)) in zip(said[1:], enumerate(bad, start=2)):
        assert line.startswith(f"  {src}:{n}: ") and reason in line, (line, reason)
    skipped = subprocess.run([*command, "--skip-bad"], cwd=ROOT, capture_output=True, text=True)
    assert skipped.returncode == 0 and f"wrote 2 dialogues from {len(bad) + 2} records" in skipped.stdout
    written = json.loads(out.read_text().splitlines()[0])
    assert written["tools"] == [CALC]  # bare definitions in the {"type": "function", "function"} form
    made = [c["function"] for m in written["messages"] for c in m.get("tool_calls") or []]
    assert [c["name"] for c in made] == ["calculator"]
    assert calls.arguments(made[0]["arguments"]) == {"expression": "6*7"}
    assert [m["role"] for m in written["messages"]][-3:] == ["assistant", "tool", "assistant"]
    assert validate(calls.attach(written["messages"], written["tools"])) is None  # read back, still valid
