"""Tool calls read back in the format each template teaches: what a model trained with a released template writes
for a call (its trained answer, decoded as generation decodes it) parses back to the call in the data."""

import pytest

from loop.data import templates
from loop.data.tokenize import Encoder
from loop.inference import toolcalls
from tests.data.test_released_templates import CALC, HERE, TOOLS, released

PARSERS = {"qwen2.5-coder": "hermes", "qwen3": "hermes", "qwen3-coder": "qwen3_coder", "llama-3.1": "llama3_json",
           "mistral-nemo": "mistral"}


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_each_template_names_the_vllm_parser_of_its_calls(name):
    assert templates.tool_parser((HERE / f"{name}.jinja").read_text()) == PARSERS[name]


def test_the_projects_templates_write_hermes_calls(tokenizer):
    assert templates.tool_parser(tokenizer.chat_template) == "hermes"
    assert templates.tool_parser({"default": tokenizer.chat_template, "training": "x"}) == "hermes"


@pytest.mark.parametrize("name", ["qwen2.5-coder", "qwen3-coder", "llama-3.1"])
def test_a_trained_call_parses_back_to_the_call_in_the_data(tiny_dir, name):
    tok = released(tiny_dir, name)
    (encoded,) = Encoder(tok, 100_000, "drop").encode([TOOLS])
    ((ids, mask),) = encoded.pieces
    starts = [i for i in range(1, len(mask)) if mask[i] and not mask[i - 1]]
    first = ids[starts[0] : next(i for i in range(starts[0], len(mask)) if not mask[i])]
    written = tok.decode(first, skip_special_tokens=True)  # as sampling.answer decodes a reply
    text, found = toolcalls.parse(written, templates.tool_parser(tok.chat_template), [CALC])
    assert found == [{"name": "calculator", "arguments": {"expression": "6*7"}}] and text == ""


def test_qwen3_coder_values_are_typed_by_the_tools_schema_and_bad_blocks_are_named():
    tool = {"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {
        "a": {"type": "integer"}, "b": {"type": "number"}, "note": {"type": "string"}, "flags": {"type": "array"}}}}}
    written = ("Adding.\n<tool_call>\n<function=add>\n<parameter=a>\n2\n</parameter>\n<parameter=b>\n0.5\n"
               "</parameter>\n<parameter=note>\n42\n</parameter>\n<parameter=flags>\n[1, 2]\n</parameter>\n"
               "</function>\n</tool_call>"
               "<tool_call>\nadd(2)\n</tool_call>")
    text, found = toolcalls.parse(written, "qwen3_coder", [tool])
    assert text == "Adding."
    assert found == [{"name": "add", "arguments": {"a": 2, "b": 0.5, "note": "42", "flags": [1, 2]}},
                     {"error": "no <function=NAME> inside <tool_call>", "text": "add(2)"}]


def test_llama3_reads_a_whole_answer_call_and_leaves_text_alone():
    assert toolcalls.parse('<|python_tag|>{"name": "calculator", "parameters": {"expression": "1+1"}}',
                           "llama3_json") == ("", [{"name": "calculator", "arguments": {"expression": "1+1"}}])
    assert toolcalls.parse("It is {probably} 2.", "llama3_json") == ("It is {probably} 2.", [])
    assert toolcalls.parse('{"name": "calculator", "parameters": 3}', "llama3_json")[1][0]["error"].startswith(
        "arguments must be a JSON object")


def test_chat_with_tools_reads_calls_in_the_models_own_format(tmp_path, monkeypatch):
    """--chat --tools on a model whose template is Qwen3-Coder's (the model stubbed): its XML call is shown parsed,
    its result asked for, and the call goes into the conversation in the schema."""
    from loop.data import calls
    from loop.inference import chat, sampling

    typed = iter(["What is 6*7?", "42"])
    replies = iter(["<tool_call>\n<function=calculator>\n<parameter=expression>\n6*7\n</parameter>\n</function>\n"
                    "</tool_call>", "42."])
    seen, said = [], []
    monkeypatch.setattr(sampling, "answer", lambda model, tok, conversations, cfg, stop, streamer=None: (
        seen.append(conversations[0]), [next(replies)])[1])

    def read(prompt: str) -> str:
        line = next(typed, None)
        if line is None:
            raise EOFError
        return line

    stub = type("T", (), {"decode": None, "chat_template": (HERE / "qwen3-coder.jinja").read_text()})()
    chat.chat(None, stub, sampling.SamplingConfig(), 0, read=read, write=lambda *a, **k: said.append(" ".join(map(
        str, a))), history=tmp_path / "h", tools=[CALC])
    assert 'tool call: calculator {"expression": "6*7"}' in said
    assert calls.split(seen[1])[0][1]["tool_calls"] == [calls.call("calculator", {"expression": "6*7"})]
