"""Tool use after training: the tiny model learns to call a listed tool with JSON arguments; generate --tools and
--chat show its calls parsed; the model card shows apply_chat_template(..., tools=...)."""

import json
import subprocess
import sys

from loop.data import calls
from loop.data.dialogues import collect
from tests.conftest import ROOT
from tools.builders import toolset
from tools.builders.tiny import CORPUS_DIR


def held_out_questions(count: int) -> list[str]:
    """Tool questions of another seed, none of them in the shipped set."""
    corpus, _, _ = collect(sorted(str(f) for f in CORPUS_DIR.glob("*.yml")), "chatterbot")
    shipped = {json.loads(line)["messages"][0]["content"] for line in (toolset.SHIPPED / "tool_use.jsonl").open()}
    found = [d[0]["content"] for d in toolset.dialogues(corpus, 4 * count, seed=1) if len(d) > 2]
    return [q for q in found if q not in shipped][:count]


def well_formed(answers: list[str]) -> int:
    names = [calls.tool_name(t) for t in toolset.TOOLS]
    return sum(any("error" not in c and c["name"] in names for c in calls.parse_calls(a)[1]) for a in answers)


def test_the_tiny_model_learns_to_call_a_listed_tool_with_json_arguments(tool_run):
    """Held-out questions, greedy: most answers hold a <tool_call> whose JSON names one of the tools and whose
    arguments parse as an object (what they compute is beyond a model this small); the same model with fresh
    weights writes none, so it is the training that taught it. (The run: tool_run in tests/conftest.py.)"""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loop.inference import sampling

    questions = held_out_questions(6)
    conversations = [calls.attach([{"role": "user", "content": q}], toolset.TOOLS) for q in questions]
    cfg = sampling.SamplingConfig(max_new_tokens=64)
    final = tool_run / "final"
    model, tok = AutoModelForCausalLM.from_pretrained(final), AutoTokenizer.from_pretrained(final)
    answers = sampling.answer(model, tok, conversations, cfg, sampling.end_token_id(tok, model))
    assert well_formed(answers) >= len(questions) // 2 + 1, answers
    torch.manual_seed(0)
    fresh = AutoModelForCausalLM.from_config(model.config)
    assert well_formed(sampling.answer(fresh, tok, conversations, cfg, sampling.end_token_id(tok, model))) == 0


def test_generate_with_tools_prints_each_call_by_name_with_its_arguments(tool_run, tmp_path):
    prompts = tmp_path / "q.txt"
    prompts.write_text("\n".join(held_out_questions(2)) + "\n")
    out = tmp_path / "answers.md"
    command = [sys.executable, "tools/generate.py", str(tool_run / "final"), "--prompts-file", str(prompts),
               "--max-new-tokens", "64", "--temperature", "0", "--repetition-penalty", "1", "--out", str(out)]
    proc = subprocess.run([*command, "--tools", str(toolset.SHIPPED / "tools.json")], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    shown = [line for line in out.read_text().splitlines() if line.startswith("- tool call: ")]
    assert shown and "<tool_call>" not in out.read_text()
    name, _, arguments = shown[0].removeprefix("- tool call: ").partition(" ")
    assert name in ("calculator", "word_count") and isinstance(json.loads(arguments), dict)
    (tmp_path / "bad.json").write_text('[{"description": "nameless"}]')
    bad = subprocess.run([*command, "--tools", str(tmp_path / "bad.json")], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().startswith(f"error: --tools {tmp_path / 'bad.json'}: tools[0] must be a function")


def test_the_cards_snippet_passes_tools_and_runs(tool_run):
    from tests.conftest import run_card_snippets

    card = (tool_run / "final" / "README.md").read_text()
    assert "apply_chat_template(messages, tools=tools, add_generation_prompt=True" in card
    assert int(run_card_snippets(tool_run / "final").split("new tokens:")[1]) >= 1  # the tools snippet ran last


def test_chat_with_tools_shows_the_call_asks_for_its_result_and_goes_on(tmp_path, monkeypatch):
    """--chat with --tools, the model stubbed: a call is shown parsed, its result typed, and the model answers
    with the call and the result in the conversation; /save keeps the tools."""
    from loop.inference import chat, sampling

    typed = iter(["What is 6*7?", "42", f"/save {tmp_path / 'chat.jsonl'}"])
    replies = iter(['<tool_call>\n{"name": "calculator", "arguments": {"expression": "6*7"}}\n</tool_call>', "42."])
    seen = []

    def answer(model, tokenizer, conversations, cfg, stop, streamer=None):
        seen.append(conversations[0])
        return [next(replies)]

    said = []

    def read(prompt: str) -> str:
        said.append(prompt)
        line = next(typed, None)
        if line is None:
            raise EOFError  # Ctrl-D: the chat ends
        return line

    monkeypatch.setattr(sampling, "answer", answer)
    chat.chat(None, type("T", (), {"decode": None})(), sampling.SamplingConfig(), 0, read=read,
              write=lambda *a, **k: said.append(" ".join(map(str, a))), history=tmp_path / "h", tools=toolset.TOOLS)
    assert 'tool call: calculator {"expression": "6*7"}' in said and "result of calculator> " in said
    messages, tools = calls.split(seen[1])
    assert tools == toolset.TOOLS and [m["role"] for m in messages] == ["user", "assistant", "tool"]
    assert messages[1]["tool_calls"] == [calls.call("calculator", {"expression": "6*7"})]
    assert messages[2] == {"role": "tool", "name": "calculator", "content": "42"}
    saved = json.loads((tmp_path / "chat.jsonl").read_text())
    assert saved["tools"] == toolset.TOOLS and saved["messages"][-1] == {"role": "assistant", "content": "42."}
