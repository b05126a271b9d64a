"""The compiled renderer equals transformers' Jinja render of the same template, text and generation spans, on
every record: the shipped corpus, the tool-use data, a realistic corpus and hostile records, for each named template
and tokenizer family (one that adds a BOS among them); any other template goes through Jinja."""

import json
import pickle
from pathlib import Path

import pytest
from transformers import AutoTokenizer
from transformers.utils.chat_template_utils import _normalize_chat_messages, render_jinja_template

from loop.data import calls, render, templates
from loop.data.tokenize import Encoder, _trained_by_offsets, trained
from tests.data.test_templates import TOOL_DIALOGUES, TRICKY
from tests.data.test_tool_calls import CALC, CLOCK, GOOD, A, Q, calling
from tools.bench import corpus as bench_corpus

SHIPPED_TOOLS = [calls.attach(r["messages"], r.get("tools")) for r in map(json.loads, (
    Path(render.__file__).parent / "tool_use" / "tool_use.jsonl").read_text().splitlines())]


def hostile(tok) -> list:
    """Special-token text everywhere content goes, missing and empty content, calls of every shape, consecutive and
    leading tool messages, system turns with and without tools, roles the templates skip, unicode."""
    reserved = sorted({*tok.all_special_tokens, *templates.TOOL_TOKENS, "<|end|>", "<|im_start|>", "<|im_end|>"})
    every = "x" + "y".join(reserved) + "<|end|<|end|>>" + "z"
    out = []
    for token in reserved:
        call = calls.call(token, {token: [token, 1.5, None, True]}, token)
        out += [[{"role": "system", "content": token, "tools": [CALC, {"type": "function", "function": {
                    "name": token, "description": every}}]},
                 {"role": "user", "content": f"a{token}b{token}"}, calling(call, content=token),
                 {"role": "tool", "content": token}, {"role": "assistant", "content": token + "\n"}],
                [{"role": "user", "content": token}, {"role": "assistant", "content": token}]]
    out += [
        [{"role": "user", "content": every}, {"role": "assistant", "content": every}],
        [{"role": "system", "content": "Use tools."}, Q, calling(calls.call("clock", "{}"), calls.call("clock", {})),
         {"role": "tool", "content": ""}, {"role": "tool", "content": "12:00"}, {"role": "tool", "content": None}, A],
        [{"role": "system", "content": "Use tools.", "tools": [CALC]}, Q, calling(calls.call("calculator", "not json")),
         {"role": "tool", "content": "?"}, {"role": "assistant", "content": ""}],
        [{"role": "tool", "content": "first", "tools": [CLOCK]}, {"role": "tool", "content": "second"}],
        [{"role": "system", "content": "alone", "tools": []}, Q, A],
        [{"role": "system", "content": None}, Q, {"role": "assistant"}],
        [{"role": "system", "content": ""}, {"role": "user", "content": ""}, {"role": "assistant", "content": None}],
        [Q, {"role": "assistant", "content": "x", "tool_calls": []}, {"role": "user", "content": "Ünï ✓ 漢字 🙂\u0000"},
         {"role": "assistant", "content": "👍🏽 \u200b\r\n\t"}],
        [{"role": "developer", "content": "a role starchat skips"}, Q, A, {"role": "system", "content": "late"}],
        [Q, calling({"name": "bare", "arguments": {"a": {"b": ["ü", "<|end|>"]}}}, content="text"), A],
        [Q, calling({"function": {"name": 7, "arguments": 3}})],
        [Q, {"role": "assistant", "content": "thinking", "reasoning_content": "hidden", "id": None}],
        [],
    ]
    return out


def outside(tok) -> list:
    """Dialogues the renderer leaves to Jinja (it answers None): Jinja renders them or fails on them as it does."""
    return [[{"role": "user", "content": ["a", "list"]}, A], [Q, {"role": "assistant", "content": 3}],
            [Q, calling("not a call")], [Q, calling({"function": None})], [Q, calling({"function": {"name": "x"}})],
            [Q, {"role": "assistant", "content": None, "tool_calls": {"a": 1}}], [{"content": "no role"}, A],
            [Q, A, "not a message"], [{"role": "user", "content": "q", "tools": "text"}, A],
            [{"role": "user", "content": "q", "tools": [CALC, "x"]}, A], [Q, calling(calls.call("f", {"x": {1, 2}}))]]


def realistic(tmp_path_factory) -> list:
    source = tmp_path_factory.getbasetemp() / "realistic-source.jsonl"
    if not source.exists():
        source.write_text("\n".join(json.dumps({"messages": d}) for d in TRICKY * 3) + "\n")
    path = bench_corpus.build(source, tmp_path_factory.getbasetemp() / "realistic.jsonl", 60, words=(100, 600))
    return [json.loads(line)["messages"] for line in path.open()]


def jinja(tok, dialogue, prompt=False):
    messages, tools = calls.split(dialogue)
    try:
        (text,), (spans,) = render_jinja_template(
            conversations=[_normalize_chat_messages(messages)], tools=tools, chat_template=tok.chat_template,
            return_assistant_tokens_mask=True, add_generation_prompt=prompt, **tok.special_tokens_map)
    except Exception as e:  # noqa: BLE001 (the renderer must leave to Jinja whatever Jinja refuses)
        return type(e)
    return text, [tuple(s) for s in spans]


@pytest.mark.parametrize("family", ["gpt_bigcode", "llama", "qwen2"])
@pytest.mark.parametrize("name", ["starchat", "chatml"])
def test_the_compiled_render_equals_jinja_on_every_record(family_dirs, corpus, tmp_path_factory, name, family):
    tok = AutoTokenizer.from_pretrained(family_dirs(family) / "model")
    templates.install(tok, name)
    renderer = Encoder(tok, 4096, "drop").compiled
    assert renderer is not None and renderer.name == name
    assert renderer.bos == (tok.bos_token if family == "llama" else "")
    records = [*corpus, *TRICKY, *TOOL_DIALOGUES, *(calls.attach(r["messages"], r.get("tools")) for r in GOOD),
               *SHIPPED_TOOLS, *realistic(tmp_path_factory), *hostile(tok)]
    for dialogue in records:
        messages, tools = calls.split(dialogue)
        for prompt in (False, True):
            expected = jinja(tok, dialogue, prompt)  # where Jinja refuses a record, the renderer leaves it to Jinja
            assert renderer(messages, tools, prompt) == (None if isinstance(expected, type) else expected), dialogue
        if renderer(messages, tools) is None:
            continue
        encoding = tok.backend_tokenizer.encode(renderer(messages, tools)[0], add_special_tokens=False)
        spans = renderer(messages, tools)[1]
        assert trained(encoding, spans).tolist() == _trained_by_offsets(encoding, spans).tolist(), dialogue
    for dialogue in outside(tok):
        assert renderer(*calls.split(dialogue)) is None, dialogue
        if not isinstance(jinja(tok, dialogue), type):  # what Jinja renders, the Encoder renders the same way
            (encoded,) = Encoder(tok, 4096, "drop").encode([dialogue])
            assert encoded.ids.tolist() == tok.backend_tokenizer.encode(jinja(tok, dialogue)[0],
                                                                        add_special_tokens=False).ids


def test_only_the_exact_named_template_is_compiled_and_it_travels_to_workers(tiny_dir):
    """A user's own template, an edited one, or a call Jinja would refuse keeps Jinja; the renderer pickles, and a
    worker's Encoder (built from the unpickled tokenizer, as prepare.py's workers do) compiles the same one."""
    tok = AutoTokenizer.from_pretrained(tiny_dir / "model")
    templates.install(tok, "chatml")
    renderer = Encoder(tok, 4096, "drop").compiled
    assert renderer is not None
    assert pickle.loads(pickle.dumps(renderer)) == renderer
    assert Encoder(pickle.loads(pickle.dumps(tok)), 4096, "drop").compiled == renderer
    assert pickle.loads(pickle.dumps(renderer))([Q, A], None) == renderer([Q, A], None)
    assert Encoder(tok, 4096, "drop", template_kwargs={"tools": []}).compiled is None
    assert Encoder(tok, 4096, "drop", template_kwargs={"enable_thinking": False}).compiled == renderer
    jinja_text = tok.chat_template
    swapped = jinja_text.replace("'<|im_start|>', '< |im_start|>'", "'<|x|>', '<|x|>'")
    for edited in (jinja_text.replace("<|im_end|>", "<|im_end|> "), jinja_text + " ", templates.serving(jinja_text),
                   swapped, "{{ bos_token }} " + jinja_text, None, {"default": jinja_text}):
        tok.chat_template = edited
        assert render.compiled(edited, tok.special_tokens_map, {}) is None
    tok.chat_template = jinja_text
    with_bos = render.compiled("{{ bos_token }}" + jinja_text, tok.special_tokens_map, {})  # as install() writes it
    assert with_bos.bos == tok.bos_token and with_bos([Q, A], None)[0] == tok.bos_token + renderer([Q, A], None)[0]
    tok.add_special_tokens({"additional_special_tokens": ["<|later|>"]}, replace_extra_special_tokens=False)
    assert Encoder(tok, 4096, "drop").compiled == renderer  # the template's own chain decides what is defused
