"""The project's own templates (templates.py) rendered by plain Python instead of Jinja: the same text and the
same `{% generation %}` spans, at a fraction of the cost.

Why by hand: transformers' Jinja render (sandboxed, a context per dialogue, a `replace` filter call per reserved
token per piece of content, the spans found by joining every block rendered so far) cost more than the Rust
tokenizer on short dialogues. Jinja stays the one source of truth: a renderer is chosen only for a chat template
whose text is exactly what `templates.build_jinja` writes for one of the named templates (its reserved tokens read
back from the template's own `replace` chain, the text rebuilt from them and compared whole), so a user's own
template, or one edited after `install`, always goes through Jinja. Where a dialogue holds something these
functions do not model (content that is not text, a call that is not an object, ...) they answer None and that
dialogue goes through Jinja too. tests/data/test_render.py proves text and spans equal to the Jinja render on
every record of the shipped, tool-use, realistic and hostile corpora, for every tokenizer family.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from loop.data.templates import TEMPLATES, TOOLS_INTRO, TOOLS_OUTRO, build_jinja, defuse

Spans = list[tuple[int, int]]
# Each named template's turn markers, as its Jinja in templates.py writes them (the parity tests hold them equal):
# (system turn opening, user turn opening, assistant turn opening, end of a turn, what opens a turn of any other
# role before the role's name: "" where such turns are not rendered, and the system turn is then always written)
MARKERS = {"starchat": ("<|system|>\n", "<|user|>\n", "<|assistant|>\n", "<|end|>", ""),
           "chatml": ("<|im_start|>system\n", "<|im_start|>user\n", "<|im_start|>assistant\n", "<|im_end|>",
                      "<|im_start|>")}
assert MARKERS.keys() == TEMPLATES.keys()
_QUOTED = r"'((?:[^'\\]|\\.)*)'"
_CHAIN = re.compile(r"\{\{ content((?: \| replace\(" + _QUOTED[:-1] + r"', '(?:[^'\\]|\\.)*'\))*) \}\}")
_REPLACE = re.compile(r" \| replace\(" + _QUOTED + ", ")


class Fallback(Exception):
    """The dialogue holds something the renderer does not model: Jinja renders it."""


@dataclass(frozen=True)
class Renderer:
    """One named template with its reserved tokens and BOS, compiled: call it as the Jinja template is rendered."""

    name: str
    reserved: tuple[str, ...]  # longest first, then alphabetically: the order the Jinja `replace` chain applies them
    bos: str  # what `{{ bos_token }}` renders up front ("" where the template has none)

    def __post_init__(self) -> None:
        found = re.compile("|".join(map(re.escape, self.reserved))) if self.reserved else None
        object.__setattr__(self, "_found", found)

    def defuse(self, text: object) -> str:
        """`content | replace(token, defused) | ...` for every reserved token: "" for a missing content (Jinja's
        undefined), Fallback for anything but text."""
        if text is None:
            return ""
        if type(text) is not str:
            raise Fallback
        if self._found is None or not self._found.search(text):  # no token in it: every replace leaves it as is
            return text
        for token in self.reserved:
            text = text.replace(token, defuse(token))
        return text

    def __call__(self, messages: list, tools: list | None, generation_prompt: bool = False) -> tuple[str, Spans] | None:
        """(the text, the assistant spans) as `render_jinja_template` gives them; None where Jinja must render."""
        try:
            return self._render(messages, tools, generation_prompt)
        except (Fallback, TypeError, ValueError):  # (json.dumps refusing a value: Jinja says so where it renders)
            return None

    def _render(self, messages: list, tools: list | None, generation_prompt: bool) -> tuple[str, Spans]:
        opening, user, assistant, end, generic = MARKERS[self.name]
        if tools is not None and (type(tools) is not list or any(type(t) is not dict for t in tools)):
            raise Fallback
        if type(messages) is not list or any(type(m) is not dict or type(m.get("role")) is not str for m in messages):
            raise Fallback
        parts, spans, at = [self.bos], [], len(self.bos)

        def put(text: str) -> None:
            nonlocal at
            parts.append(text)
            at += len(text)

        first = messages[0] if messages else {}
        system = self.defuse(first.get("content")) if first.get("role") == "system" else ""
        if tools or not generic:
            put(opening + system)
            if tools:
                put(("\n\n" if system else "") + TOOLS_INTRO + "".join(
                    "\n" + self.defuse(json.dumps(t, ensure_ascii=False)) for t in tools) + TOOLS_OUTRO)
            put(end + "\n")
        last = len(messages) - 1
        for i, m in enumerate(messages):
            role = m["role"]
            if role == "assistant":
                put(assistant)
                start = at
                put(self._answer(m) + end)
                spans.append((start, at))
                put("\n")
            elif role == "tool":
                opened = i == 0 or messages[i - 1]["role"] != "tool"
                closed = i == last or messages[i + 1]["role"] != "tool"
                put((user[:-1] if opened else "") + "\n<tool_response>\n" + self.defuse(m.get("content"))
                    + "\n</tool_response>" + (end + "\n" if closed else ""))
            elif role == "user" or (generic and not (tools and role == "system" and i == 0)):
                put((generic + role + "\n" if generic else user) + self.defuse(m.get("content")) + end + "\n")
        if generation_prompt:
            put(assistant)
        return "".join(parts), spans

    def _answer(self, m: dict) -> str:
        """An assistant turn's text and tool calls, as templates.ANSWER writes them."""
        content = m.get("content")
        out = [self.defuse(content or "")]
        found = m.get("tool_calls")
        if found and type(found) is not list:
            raise Fallback
        for k, call in enumerate(found or []):
            if type(call) is not dict:
                raise Fallback
            f = call["function"] if "function" in call else call
            if type(f) is not dict or "name" not in f or "arguments" not in f:
                raise Fallback
            args = f["arguments"]
            name, args = json.dumps(f["name"], ensure_ascii=False), (
                args if isinstance(args, str) else json.dumps(args, ensure_ascii=False))
            out.append(("\n" if content or k else "") + '<tool_call>\n{"name": ' + self.defuse(name)
                       + ', "arguments": ' + self.defuse(args) + "}\n</tool_call>")
        return "".join(out)


# What render_jinja_template is called with besides the user's template_kwargs: a user's kwarg of one of these names
# makes that call fail, so Jinja keeps it (and says so)
CALLED_WITH = {"messages", "tools", "documents", "add_generation_prompt", "conversations", "chat_template",
               "return_assistant_tokens_mask", "continue_final_message"}


def compiled(jinja: object, template_kwargs: dict, given: dict) -> Renderer | None:
    """The renderer of this chat template, when it is exactly what `templates.build_jinja` writes for a named
    template (reserved tokens and BOS as it has them); None for any other template. `template_kwargs`: what the
    template is rendered with (the tokenizer's special tokens, then `given`, the user's data.template_kwargs)."""
    if not isinstance(jinja, str) or CALLED_WITH & set(given):
        return None
    chain = _CHAIN.search(jinja)
    reserved = [re.sub(r"\\(.)", r"\1", m[1]) for m in _REPLACE.finditer(chain[1])] if chain else []
    for template in TEMPLATES.values():
        for bos in (False, True):
            if build_jinja(template, reserved, bos) == jinja:
                token = template_kwargs.get("bos_token")
                if bos and not isinstance(token, str):
                    return None
                return Renderer(template.name, tuple(sorted(set(reserved), key=lambda t: (-len(t), t))),
                                token if bos else "")
    return None
