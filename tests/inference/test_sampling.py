"""Answering prompts with the saved chat template: the generate tool and plain transformers."""

import json
import subprocess
import sys

from transformers import pipeline

from tests.conftest import ROOT


def test_generate_tool_batch(trained_run, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("What is Python?\nWrite a loop in C.\n")
    source = trained_run / "final"
    out = tmp_path / "answers.md"  # the default, in the working directory (not in the model folder)
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "generate.py"), str(source), "--prompts-file",
                           str(prompts), "--max-new-tokens", "8", "--temperature", "0.7", "--top-k", "20"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = out.read_text()
    assert not (source / "answers.md").exists()
    assert "## What is Python?" in text and "## Write a loop in C." in text and "<|end|>" not in text


def test_generate_tool_chat_through_a_pipe(trained_run, tmp_path):
    saved = tmp_path / "chat.jsonl"
    proc = subprocess.run([sys.executable, "tools/generate.py", str(trained_run / "final"), "--chat",
                           "--max-new-tokens", "6", "--temperature", "0"],
                          input=f"Hello\n/reset\nDo you know Python?\n/save {saved}\n\n", cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # Five lines, then the empty one is ignored (a prompt again) and the end of input ends the chat.
    assert proc.stdout.count("user> ") == 6 and proc.stdout.count("assistant> ") == 2
    assert "(conversation cleared)" in proc.stdout and "<|end|>" not in proc.stdout
    (line,) = saved.read_text().splitlines()
    messages = json.loads(line)["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"] and messages[0]["content"] == "Do you know Python?"


def test_ctrl_c_cancels_the_answer_being_written_and_ends_the_chat_at_the_prompt(monkeypatch, tmp_path):
    from loop.inference import chat, sampling

    lines = iter(["first", "second"])

    def read(prompt):
        try:
            return next(lines)
        except StopIteration:
            raise KeyboardInterrupt from None  # Ctrl-C at the prompt: the chat ends cleanly

    calls, streamers = [], []

    def answer(model, tokenizer, conversations, cfg, stop, streamer=None):
        calls.append([m["content"] for m in conversations[0]])
        streamers.append(streamer)
        if len(calls) == 1:
            raise KeyboardInterrupt  # Ctrl-C while the first answer is written
        return ["fine"]

    monkeypatch.setattr(sampling, "answer", answer)
    said = []
    chat.chat(None, type("T", (), {"decode": None})(), sampling.SamplingConfig(), 0, read=read,
              write=lambda *a, **k: said.append(" ".join(map(str, a))), history=tmp_path / "history")
    assert "\n(cancelled)" in said
    assert calls == [["first"], ["second"]]  # the cancelled question left no trace in the conversation
    # The cancelled answer's streamer, which still thinks the prompt was printed, is not used again: it would
    # print the whole conversation at the start of the next answer.
    assert streamers[0] is not streamers[1]


def test_what_was_typed_is_kept_for_the_next_chat(tmp_path):
    import readline

    from loop.inference.chat import line_editing

    readline.clear_history()
    with line_editing(tmp_path / "loop" / "history"):
        readline.add_history("how do I reverse a list?")  # what input() does with a line typed on a terminal
    readline.clear_history()
    with line_editing(tmp_path / "loop" / "history"):
        assert readline.get_history_item(readline.get_current_history_length()) == "how do I reverse a list?"


def test_held_out_questions_answered_next_to_the_base_model(trained_run, tiny_dir, tmp_path):
    """From a training checkpoint (its fp32 master weights), against the base model."""
    out = tmp_path / "answers.md"
    checkpoint = trained_run / "checkpoints" / "step_00000016"
    proc = subprocess.run([sys.executable, "tools/generate.py", str(checkpoint), "--held-out",
                           str(trained_run), "--count", "3", "--compare", str(tiny_dir / "model"),
                           "--max-new-tokens", "6", "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = out.read_text()
    assert text.count("## ") == 3 and text.count("- before (") == 3 and text.count("- after (") == 3
    for line in text.splitlines():
        if line.startswith("- "):
            assert line.split("): ", 1)[1].strip(), line  # no answer is empty


def test_transformers_pipeline_chats_and_stops_at_the_end_token(trained_run):
    chat = pipeline("text-generation", model=str(trained_run / "final"))
    messages = [{"role": "user", "content": "Hello"}]
    out = chat(messages, max_new_tokens=40, min_new_tokens=2, do_sample=False)[0]["generated_text"]
    assert out[:-1] == messages and out[-1]["role"] == "assistant"
    answer = out[-1]["content"]
    assert answer.strip() and "<|end|>" not in answer and "<|user|>" not in answer
    ids = chat.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                             return_dict=True)
    new = chat.model.generate(**ids, max_new_tokens=40, min_new_tokens=2, do_sample=False)
    new = new[0, ids["input_ids"].shape[1]:]
    assert new[-1].item() == chat.tokenizer.convert_tokens_to_ids("<|end|>") and len(new) < 40  # it stopped there


def test_generate_tool_on_a_model_without_a_chat_template_is_one_line(tiny_dir, tmp_path, capsys):
    """A pretrained base (the tiny model before training has no template): exit 2 and what to do, no traceback."""
    import pytest

    from tools import generate

    with pytest.raises(SystemExit) as ended:
        generate.main([str(tiny_dir / "model"), "--max-new-tokens", "2", "--out", str(tmp_path / "answers.md")])
    assert ended.value.code == 2
    said = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "".join(said)
    assert said[-1] == (f"error: {tiny_dir / 'model'}: its tokenizer has no chat template, so there is no way to ask "
                        "it a question (a pretrained base?); use a model saved by loop/train.py, or pass a base as "
                        "--compare next to one")
    assert not (tmp_path / "answers.md").exists()


def test_chat_refuses_an_unknown_command_and_an_empty_save(monkeypatch, tmp_path):
    """A mistyped command is said to be one, not sent to the model as a question; /save after /reset says there
    is nothing to save instead of writing {"messages": []}, which the messages schema refuses."""
    from loop.inference import chat, sampling

    typed = iter(["/rest", "/usr/bin/env is a path", "/reset", f"/save {tmp_path / 'chat.jsonl'}"])

    def read(prompt):
        try:
            return next(typed)
        except StopIteration:
            raise EOFError from None  # Ctrl-D
    asked = []
    monkeypatch.setattr(sampling, "answer", lambda m, t, conversations, *a, **k: asked.append(
        [x["content"] for x in conversations[0]]) or ["ok"])
    said = []
    chat.chat(None, type("T", (), {"decode": None})(), sampling.SamplingConfig(), 0, read=read,
              write=lambda *a, **k: said.append(" ".join(map(str, a))), history=tmp_path / "history")
    assert "unknown command /rest; the commands are /reset, /save FILE, /quit, /exit" in said
    assert asked == [["/usr/bin/env is a path"]]  # a line that starts with a path is a question
    assert "nothing to save yet: the conversation is empty" in said and not (tmp_path / "chat.jsonl").exists()


def test_generate_on_a_missing_folder_says_not_found(tmp_path):
    proc = subprocess.run([sys.executable, "tools/generate.py", str(tmp_path / "quickstart" / "fnal")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: not found: {tmp_path / 'quickstart' / 'fnal'}"
