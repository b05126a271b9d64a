"""Answering prompts with the saved chat template: the generate tool and plain transformers."""

import subprocess
import sys

from transformers import pipeline

from tests.conftest import ROOT


def test_generate_tool_batch_and_checkpoint(trained_run, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("What is Python?\nWrite a loop in C.\n")
    for source in (trained_run / "final", trained_run / "checkpoints" / "step_00000016"):
        out = tmp_path / f"{source.name}.md"
        proc = subprocess.run([sys.executable, "tools/generate.py", str(source), "--prompts-file", str(prompts),
                               "--out", str(out), "--max-new-tokens", "8", "--temperature", "0.7", "--top-k", "20"],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        text = out.read_text()
        assert "## What is Python?" in text and "## Write a loop in C." in text and "<|end|>" not in text


def test_generate_tool_chat_through_a_pipe(trained_run):
    proc = subprocess.run([sys.executable, "tools/generate.py", str(trained_run / "final"), "--chat",
                           "--max-new-tokens", "6", "--temperature", "0"],
                          input="Hello\n/reset\nDo you know Python?\n\n", cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("user> ") == 4 and proc.stdout.count("assistant> ") == 2
    assert "<|end|>" not in proc.stdout


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
