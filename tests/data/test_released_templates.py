"""data.template: tokenizer with the released chat templates of Qwen2.5-Coder, Qwen3, Qwen3-Coder, Llama 3.1 and
Mistral Nemo (tests/data/templates, sources in SOURCES), none of which marks its trained text: the answers are found
by rendering (loop/data/turns.py), each dialogue trains as one sequence or one per turn, and plain transformers
with the saved tokenizer reproduces the training ids, the trained positions and every generation prompt."""

from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from loop.data import calls, templates
from loop.data.tokenize import OK, Encoder

HERE = Path(__file__).parent / "templates"

# Each template's special tokens (added to the tiny tokenizer as the real ones have them), its end token, its BOS.
RELEASED = {
    "qwen2.5-coder": (("<|im_start|>", "<|im_end|>"), "<|im_end|>", None),
    "qwen3": (("<|im_start|>", "<|im_end|>", "<think>", "</think>"), "<|im_end|>", None),
    "qwen3-coder": (("<|im_start|>", "<|im_end|>"), "<|im_end|>", None),
    "llama-3.1": (("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>"),
                  "<|eot_id|>", "<|begin_of_text|>"),
    "mistral-nemo": (("<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_CALLS]",
                      "[TOOL_RESULTS]", "[/TOOL_RESULTS]"), "</s>", "<s>"),
}

CALC = {"type": "function", "function": {"name": "calculator", "description": "Evaluate arithmetic.", "parameters": {
    "type": "object", "properties": {"expression": {"type": "string", "description": "An expression."}},
    "required": ["expression"]}}}


def _call(expression: str, call_id: str) -> dict:
    made = {"name": "calculator", "arguments": {"expression": expression}}
    return {"role": "assistant", "content": "", "tool_calls": [{"id": call_id, "type": "function", "function": made}]}


def _result(text: str, call_id: str) -> dict:
    return {"role": "tool", "tool_call_id": call_id, "name": "calculator", "content": text}


PLAIN = [{"role": "user", "content": "Reverse a list in Python?"}, {"role": "assistant", "content": "Use `xs[::-1]`."},
         {"role": "user", "content": "In place?"}, {"role": "assistant", "content": "Call `xs.reverse()`."}]
SYSTEM = [{"role": "system", "content": "You are terse."}, *PLAIN]
ONE_TURN = [{"role": "user", "content": "Ünïcödé ✓ 漢字?"}, {"role": "assistant", "content": "ça va — 👍"}]
TOOLS = calls.attach([{"role": "user", "content": "What is 6*7?"}, _call("6*7", "call00001"),
                      _result("42", "call00001"), {"role": "assistant", "content": "6*7 = 42."},
                      {"role": "user", "content": "And 2+2?"}, _call("2+2", "call00002"), _result("4", "call00002"),
                      {"role": "assistant", "content": "It is 4."}], [CALC])
REASONING = [{"role": "user", "content": "Is 7 prime?"},
             {"role": "assistant", "reasoning_content": "Divisors of 7: only 1 and 7.", "content": "Yes."},
             {"role": "user", "content": "And 9?"},
             {"role": "assistant", "reasoning_content": "9 = 3 * 3.", "content": "No, 9 = 3 * 3."}]

# (template, template variables, dialogue, whether it trains one sequence per turn)
CASES = [
    ("qwen2.5-coder", {}, PLAIN, False), ("qwen2.5-coder", {}, SYSTEM, False), ("qwen2.5-coder", {}, TOOLS, False),
    ("qwen3", {}, PLAIN, True),  # the last turn gets an empty <think></think>, earlier ones none: a rewrite
    ("qwen3", {}, ONE_TURN, False), ("qwen3", {}, REASONING, True), ("qwen3", {}, TOOLS, True),
    ("qwen3", {"enable_thinking": False}, ONE_TURN, False), ("qwen3", {"enable_thinking": False}, PLAIN, True),
    ("qwen3-coder", {}, PLAIN, False), ("qwen3-coder", {}, SYSTEM, False), ("qwen3-coder", {}, TOOLS, False),
    ("llama-3.1", {}, PLAIN, False), ("llama-3.1", {}, SYSTEM, False), ("llama-3.1", {}, TOOLS, False),
    ("mistral-nemo", {}, PLAIN, False), ("mistral-nemo", {}, ONE_TURN, False),
    ("mistral-nemo", {}, TOOLS, True),  # the tools go before the last user turn
]


def released(tiny_dir, name: str):
    """The project's tiny tokenizer with a released template installed as data.template: tokenizer takes it."""
    tokens, end, bos = RELEASED[name]
    tok = AutoTokenizer.from_pretrained(tiny_dir / "model")
    tok.add_special_tokens({"additional_special_tokens": list(tokens)}, replace_extra_special_tokens=False)
    tok.eos_token = end
    if bos:
        tok.bos_token = bos
    tok.chat_template = (HERE / f"{name}.jinja").read_text()
    assert not templates.marks_generation(tok.chat_template)
    assert templates.install(tok, "tokenizer") == ([], end)
    return tok


def expected(served, messages: list, tools, kwargs: dict, end: str) -> list[tuple[list[int], list[int]]]:
    """Each assistant turn's prompt and answer ids, from plain transformers alone: the prompt is the conversation
    before the turn with the generation prompt, the answer what the turn adds to it, up to its end token."""
    out = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = served.apply_chat_template(messages[:k], tools=tools, add_generation_prompt=True, return_dict=True,
                                            **kwargs)["input_ids"]
        prompt_text = served.apply_chat_template(messages[:k], tools=tools, add_generation_prompt=True,
                                                 tokenize=False, **kwargs)
        through = served.apply_chat_template(messages[: k + 1], tools=tools, tokenize=False, **kwargs)
        assert through.startswith(prompt_text)
        answer = through[len(prompt_text):]
        answer = answer[: answer.rindex(end) + len(end)]
        out.append((list(prompt), served(answer, add_special_tokens=False)["input_ids"]))
    return out


@pytest.mark.parametrize(("name", "kwargs", "dialogue", "per_turn"), CASES)
def test_plain_transformers_reproduces_ids_trained_positions_and_prompts(tiny_dir, tmp_path, name, kwargs, dialogue,
                                                                         per_turn):
    tok = released(tiny_dir, name)
    (encoded,) = Encoder(tok, 100_000, "drop", kwargs).encode([dialogue])
    assert encoded.status == OK and not encoded.refused and encoded.per_turn == per_turn
    templates.save_tokenizer(tok, tmp_path)
    served = AutoTokenizer.from_pretrained(tmp_path)
    assert served.chat_template == tok.chat_template
    messages, tools = calls.split(dialogue)
    turns = expected(served, messages, tools, kwargs, RELEASED[name][1])
    if per_turn:  # one sequence per assistant turn: exactly the served prompt, then the answer
        assert len(encoded.pieces) == len(turns)
        assert encoded.extra_tokens == sum(len(ids) for ids, _ in encoded.pieces[:-1]) > 0
        for (ids, mask), (prompt, answer) in zip(encoded.pieces, turns):
            assert ids.tolist() == prompt + answer
            assert mask.tolist() == [0] * len(prompt) + [1] * len(answer)
        return
    ((ids, mask),) = encoded.pieces
    whole = served.apply_chat_template(messages, tools=tools, return_dict=True, **kwargs)["input_ids"]
    assert ids.tolist() == list(whole)
    trained = np.zeros(len(ids), np.uint8)
    for prompt, answer in turns:
        assert ids[: len(prompt)].tolist() == prompt  # every generation prompt starts the sequence
        assert ids[len(prompt) : len(prompt) + len(answer)].tolist() == answer
        trained[len(prompt) : len(prompt) + len(answer)] = 1
    assert mask.tolist() == trained.tolist()  # and nothing else trains


def test_qwen3_trains_each_turns_reasoning_in_the_context_it_was_served(tiny_dir):
    """Qwen3 drops an earlier turn's reasoning once a later question follows: the first answer trains with its
    <think> block after the first question, the second after a context holding the first answer without it."""
    tok = released(tiny_dir, "qwen3")
    (encoded,) = Encoder(tok, 100_000, "drop").encode([REASONING])
    trained = [tok.decode(ids[mask == 1]) for ids, mask in encoded.pieces]
    assert trained == ["<think>\nDivisors of 7: only 1 and 7.\n</think>\n\nYes.<|im_end|>",
                       "<think>\n9 = 3 * 3.\n</think>\n\nNo, 9 = 3 * 3.<|im_end|>"]
    context = tok.decode(encoded.pieces[1][0][encoded.pieces[1][1] == 0])
    assert "Divisors" not in context and context.endswith("<|im_start|>assistant\nYes.<|im_end|>\n"
                                                          "<|im_start|>user\nAnd 9?<|im_end|>\n<|im_start|>assistant\n")
    (quiet,) = Encoder(tok, 100_000, "drop", {"enable_thinking": False}).encode([ONE_TURN])
    ((ids, mask),) = quiet.pieces
    assert tok.decode(ids[mask == 1]) == "ça va — 👍<|im_end|>"  # the empty <think> block is the prompt's
    assert tok.decode(ids[: mask.argmax()]).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_a_rewriting_template_is_refused_per_record_when_the_config_says_so(tiny_dir):
    tok = released(tiny_dir, "mistral-nemo")
    kept, refused = Encoder(tok, 100_000, "drop", on_template_change="refuse").encode([PLAIN, TOOLS])
    assert len(kept.pieces) == 1 and not kept.refused and not refused.pieces
    assert refused.refused.startswith("messages[1]: the template renders this turn's context differently once later "
                                      "turns follow") and "per_turn" in refused.refused


def test_a_record_the_template_cannot_render_is_refused_with_the_templates_reason(tiny_dir):
    """Mistral Nemo raises on a call id that is not 9 characters, and renders a system prompt only inside a last
    user turn, so a served prompt (ending on that turn) and the answered conversation differ before the answer:
    no answer can be found after the prompt, and the record is refused, never trained on a guess."""
    tok = released(tiny_dir, "mistral-nemo")
    (system,) = Encoder(tok, 100_000, "drop").encode([SYSTEM])
    assert not system.pieces and system.refused.startswith(
        "messages[2]: the template renders the answered turn without its generation prompt before it")
    bad = calls.attach([TOOLS[0], _call("6*7", "short"), _result("42", "short"), TOOLS[3]], [CALC])
    (encoded,) = Encoder(tok, 100_000, "drop").encode([bad])
    assert not encoded.pieces and "Tool call IDs should be alphanumeric strings with length 9" in encoded.refused


@pytest.mark.parametrize("name", ["qwen2.5-coder", "qwen3"])
def test_a_dialogue_longer_than_a_row_is_cut_at_an_answer_or_dropped(tiny_dir, name):
    tok = released(tiny_dir, name)
    (whole,) = Encoder(tok, 100_000, "drop").encode([PLAIN])
    short = len(whole.ids) if whole.per_turn else len(whole.ids) - 3  # the second answer cannot fit
    (cut,) = Encoder(tok, short, "truncate").encode([PLAIN])
    (dropped,) = Encoder(tok, short, "drop").encode([PLAIN])
    assert not dropped.pieces and cut.pieces and all(len(ids) <= short for ids, _ in cut.pieces)
    assert tok.decode(cut.pieces[-1][0][cut.pieces[-1][1] == 1]).endswith("Use `xs[::-1]`.<|im_end|>")


@pytest.mark.parametrize("on_bad_record", ["error", "skip"])
def test_a_run_counts_per_turn_dialogues_and_lists_refused_ones_by_file_and_line(tiny_dir, tmp_path, on_bad_record):
    """Through the run's data preparation: split dialogues are counted with what they cost, their sequences kept
    together on one side of the eval split; with on_template_change: refuse they are bad records, by line."""
    import json

    from loop import config
    from loop.data.prepare import open_prepared, prepare
    from loop.data.records import DataError

    tok = released(tiny_dir, "qwen3")
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"messages": d}) + "\n" for d in (ONE_TURN, REASONING, PLAIN)))
    data = {"train_files": [str(path)], "cache_dir": str(tmp_path / "c"), "eval_fraction": 0, "num_proc": 1,
            "on_bad_record": on_bad_record}
    cfg = config.from_dict({"data": data}).data
    prepared = open_prepared(prepare(cfg, tok, progress=False), cfg, seed=0)
    total = prepared.report.total
    assert (total.dialogues, total.per_turn, len(prepared.order)) == (3, 2, 5)  # 1 + 2 + 2 sequences
    assert total.per_turn_tokens > 0 and "2 trained one sequence per turn" in prepared.report.describe()
    cfg = config.from_dict({"data": data | {"on_template_change": "refuse"}}).data
    if on_bad_record == "error":
        with pytest.raises(DataError, match=rf"2 bad record\(s\).*\n  {path}:2: messages\[1\]: the template renders"):
            prepare(cfg, tok, progress=False)
        return
    prepared = open_prepared(prepare(cfg, tok, progress=False), cfg, seed=0)
    assert prepared.report.total.skipped == {"template": 2} and len(prepared.order) == 1


def test_a_field_the_template_would_drop_names_the_record(tiny_dir, tokenizer):
    """Found by rendering with and without it: the project's StarChat template and Llama 3.1's have no reasoning;
    Qwen3's renders it, given as reasoning_content or as `thinking` (transformers passes it under both names)."""
    (starchat,) = Encoder(tokenizer, 100_000, "drop").encode([REASONING])
    assert not starchat.pieces and starchat.refused.startswith("messages[1]: the chat template drops its "
                                                                "reasoning_content")
    qwen3 = Encoder(released(tiny_dir, "qwen3"), 100_000, "drop")
    thinking = [{"role": m["role"], "content": m["content"], "thinking": m["reasoning_content"]}
                if "reasoning_content" in m else m for m in REASONING]
    (renamed,), (kept,) = qwen3.encode([thinking]), qwen3.encode([REASONING])
    assert not renamed.refused and not kept.refused
    assert [ids.tolist() for ids, _ in renamed.pieces] == [ids.tolist() for ids, _ in kept.pieces]
    llama = Encoder(released(tiny_dir, "llama-3.1"), 100_000, "drop")
    (reasoned,) = llama.encode([REASONING])
    assert "drops its reasoning_content" in reasoned.refused


def test_reasoning_is_accepted_on_assistant_messages_only():
    from loop.data.dialogues import validate

    assert validate(REASONING) is None
    assert validate([{**REASONING[0], "thinking": "hmm"}, REASONING[1]]) == (
        "empty_content", "messages[0]: thinking must be a string, on an assistant message")


def test_inspect_data_shows_each_records_decision_and_trained_spans_for_a_released_template(tiny_dir, tmp_path):
    """A user's model whose tokenizer carries Qwen3's template: each record is shown with what became of it, each
    sequence with its answers marked; the summary counts the per-turn dialogues."""
    import json
    import shutil
    import subprocess
    import sys

    from tests.conftest import ROOT

    model = tmp_path / "model"
    shutil.copytree(tiny_dir / "model", model)
    templates.save_tokenizer(released(tiny_dir, "qwen3"), model)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"messages": d}) + "\n" for d in (ONE_TURN, REASONING)))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"model": {"name_or_path": str(model)}, "data": {
        "train_files": [str(data)], "template": "tokenizer", "eval_fraction": 0, "cache_dir": str(tmp_path / "c")}}))
    out = subprocess.run([sys.executable, "tools/inspect_data.py", str(cfg), "--examples", "2"], capture_output=True,
                         text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"--- {data}:1: one sequence ---\n" in out.stdout
    assert f"--- {data}:2: one sequence per assistant turn (2 sequences, +" in out.stdout
    assert "--- sequence 2 of 2: " in out.stdout
    assert "[[<think>\n9 = 3 * 3.\n</think>\n\nNo, 9 = 3 * 3.<|im_end|>]]" in out.stdout
    assert "one sequence per turn: 1 (+" in out.stdout.split("--- summary ---")[1]
