"""Dialogue templates, written once as Jinja and used for training, saving and serving.

The Jinja `chat_template` is the one source of truth: training ids and trained positions come from
`tokenizer.apply_chat_template(..., return_assistant_tokens_mask=True)` on the very template that is
saved with the model, so transformers, vLLM and TGI render exactly what the model was trained on.
Assistant text and its closing end token sit inside `{% generation %}` markers; nothing else is trained.
Those markers are transformers' own Jinja extension, which TGI's minijinja, llama.cpp's bindings and
other servers refuse, so a saved model's default template has them turned into plain `if true` blocks
(the same text) and the marked one is saved beside it under the name "training" (see `save_tokenizer`).

Tool use (see data/calls.py for the schema) renders the Hermes / Qwen2.5 way, explained at TOOLS_INTRO; a
dialogue's tool list goes in as `tools=`, as a user passes it to `apply_chat_template(messages, tools=...)`.
The assistant's tool calls are trained like its text; the tool list, the system prompt and results are not.

Special-token text inside message content (a user typing "<|end|>") would otherwise tokenize to the
special token and forge a turn. The template defuses it: `<|end|>` in content renders as `< |end|>`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, get_args

from loop.config import TemplateName, UserError
from loop.data import calls

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

@dataclass(frozen=True)
class Template:
    name: str
    special_tokens: tuple[str, ...]  # tokens the template adds to the vocabulary
    end_token: str  # closes every turn; the stop token for generation
    jinja: str  # with a @CONTENT@ placeholder where defused content goes


def _jinja_string(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


# Tool use follows the Hermes / Qwen2.5 convention: the tool list as JSON lines inside `<tools>...</tools>` in
# the system turn, each call as a `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` block in the
# assistant's turn, each result as a `<tool_response>...</tool_response>` block in a user turn (consecutive
# results in one turn). Why this one: it is what Qwen2.5-Coder and the Hermes-style function-calling models are
# trained on (so fine-tuning them keeps the layout they know), what vLLM's `hermes` tool parser reads back out
# of generated text, and plain JSON inside tags is something a small model learns to write quickly. The
# instruction text is Qwen2.5's, word for word; the turn markers are each template's own.
TOOLS_INTRO = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
               "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
TOOLS_OUTRO = ("\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
               "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
               "<args-json-object>}\n</tool_call>")


def _lit(text: str) -> str:
    """A Jinja expression printing `text` as is."""
    return "{{ " + _jinja_string(text) + " }}"


# The tool list (one JSON object a line), after the system text if any.
TOOLS_BLOCK = (
    "{%- if tools -%}{%- if system -%}{{ '\\n\\n' }}{%- endif -%}" + _lit(TOOLS_INTRO)
    + "{%- for tool in tools -%}{%- set content = tool | tojson -%}{{ '\\n' }}{{ @CONTENT@ }}{%- endfor -%}"
    + _lit(TOOLS_OUTRO) + "{%- endif -%}"
)
# An assistant turn's text, then its calls (arguments given as a JSON string are rendered as written).
ANSWER = (
    "{%- set content = message['content'] or '' -%}{{ @CONTENT@ }}"
    "{%- for call in message['tool_calls'] or [] -%}"
    "{%- set f = call['function'] if call['function'] is defined else call -%}"
    "{%- if message['content'] or not loop.first -%}{{ '\\n' }}{%- endif -%}"
    "{%- set content = f['name'] | tojson -%}{{ '<tool_call>\\n{\"name\": ' }}{{ @CONTENT@ }}"
    "{%- set content = f['arguments'] if f['arguments'] is string else f['arguments'] | tojson -%}"
    "{{ ', \"arguments\": ' }}{{ @CONTENT@ }}{{ '}\\n</tool_call>' }}"
    "{%- endfor -%}"
)


def _results(opening: str, closing: str) -> str:
    """A run of tool messages as one user turn of `<tool_response>` blocks, opened and closed as the template's
    user turns are."""
    return ("{%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' -%}" + _lit(opening) + "{%- endif -%}"
            "{%- set content = message['content'] -%}{{ '\\n<tool_response>\\n' }}{{ @CONTENT@ }}"
            "{{ '\\n</tool_response>' }}"
            "{%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' -%}" + _lit(closing) + "{%- endif -%}")


# `{{ '...' }}` literals keep Jinja whitespace control out of the rendered text.
STARCHAT = Template(
    name="starchat",
    special_tokens=("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
    end_token="<|end|>",
    jinja=(
        "{%- set system = messages[0]['content'] if messages and messages[0]['role'] == 'system' else '' -%}"
        "{%- set content = system -%}"
        "{{ '<|system|>\\n' }}{{ @CONTENT@ }}" + TOOLS_BLOCK + "{{ '<|end|>\\n' }}"
        "{%- for message in messages -%}"
        "{%- set content = message['content'] -%}"
        "{%- if message['role'] == 'user' -%}"
        "{{ '<|user|>\\n' }}{{ @CONTENT@ }}{{ '<|end|>\\n' }}"
        "{%- elif message['role'] == 'assistant' -%}"
        "{{ '<|assistant|>\\n' }}{% generation %}" + ANSWER + "{{ '<|end|>' }}{% endgeneration %}{{ '\\n' }}"
        "{%- elif message['role'] == 'tool' -%}" + _results("<|user|>", "<|end|>\n") +
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|assistant|>\\n' }}{%- endif -%}"
    ),
)

CHATML = Template(
    name="chatml",
    special_tokens=("<|im_start|>", "<|im_end|>"),
    end_token="<|im_end|>",
    jinja=(
        "{%- set system = messages[0]['content'] if messages and messages[0]['role'] == 'system' else '' -%}"
        "{%- if tools -%}"  # the system turn holds the tool list (Qwen2.5 writes one even with no system message)
        "{%- set content = system -%}{{ '<|im_start|>system\\n' }}{{ @CONTENT@ }}" + TOOLS_BLOCK +
        "{{ '<|im_end|>\\n' }}"
        "{%- endif -%}"
        "{%- for message in messages -%}"
        "{%- set content = message['content'] -%}"
        "{%- if message['role'] == 'assistant' -%}"
        "{{ '<|im_start|>assistant\\n' }}{% generation %}" + ANSWER + "{{ '<|im_end|>' }}"
        "{% endgeneration %}{{ '\\n' }}"
        "{%- elif message['role'] == 'tool' -%}" + _results("<|im_start|>user", "<|im_end|>\n") +
        "{%- elif not (tools and message['role'] == 'system' and loop.first) -%}"
        "{{ '<|im_start|>' + message['role'] + '\\n' }}{{ @CONTENT@ }}{{ '<|im_end|>\\n' }}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
    ),
)

TEMPLATES = {t.name: t for t in (STARCHAT, CHATML)}
# The tags both templates write tool calls and results in, each one vocabulary token (as Qwen2.5's tokenizers have
# them): vLLM's hermes parser looks `<tool_call>` up as a token. Added as ordinary (not special) tokens, so a decoded
# answer keeps them where special tokens are skipped.
TOOL_TOKENS = ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>")
assert {*TEMPLATES, "tokenizer"} == set(get_args(TemplateName))


class TemplateError(UserError, ValueError):
    """The chosen template cannot be used with this tokenizer; the message says what to do."""


def defuse(text: str) -> str:
    """What the template does to special-token text inside content (`<|end|>` -> `< |end|>`)."""
    return text[0] + " " + text[1:]


def build_jinja(template: Template, reserved: list[str], bos: bool = False) -> str:
    """The template's Jinja with every reserved (special-token) string defused inside content, longest
    first (then alphabetically, so the text is the same in every run), and the BOS token up front for
    a tokenizer that starts every text with one."""
    expr = "content"
    for token in sorted(set(reserved), key=lambda t: (-len(t), t)):
        expr += f" | replace({_jinja_string(token)}, {_jinja_string(defuse(token))})"
    return ("{{ bos_token }}" if bos else "") + template.jinja.replace("@CONTENT@", expr)


_GENERATION_TAG = re.compile(r"\{%(-?)\s*(end)?generation\s*(-?)%\}")


def serving(jinja: str) -> str:
    """The template with its `{% generation %}` blocks as `{% if true %}` blocks: the same rendered text
    (whitespace control kept), in Jinja that every engine parses."""
    return _GENERATION_TAG.sub(lambda m: "{%" + m[1] + (" endif " if m[2] else " if true ") + m[3] + "%}", jinja)


def save_tokenizer(tokenizer: PreTrainedTokenizerBase, folder: str | Path) -> None:
    """Save the tokenizer with a template any server can use: "default" without generation markers,
    "training" with them (`apply_chat_template(..., chat_template="training",
    return_assistant_tokens_mask=True)` gives the trained positions), both in tokenizer_config.json,
    the only place TGI looks (transformers 5 would write chat_template.jinja instead)."""
    trained = tokenizer.chat_template
    if isinstance(trained, str) and _GENERATION_TAG.search(trained):
        tokenizer.chat_template = {"default": serving(trained), "training": trained}
    try:
        tokenizer.save_pretrained(folder, save_jinja_files=False)
    finally:
        tokenizer.chat_template = trained


def adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer puts a BOS token before plain text (Llama's do, StarCoder's do not)."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("x")["input_ids"][:1] == [bos]


def marks_generation(jinja: str | None) -> bool:
    """Whether a template marks its trained text with `{% generation %}` (else turns.py finds it by rendering)."""
    return isinstance(jinja, str) and bool(_GENERATION_TAG.search(jinja))


def install(tokenizer: PreTrainedTokenizerBase, name: TemplateName) -> tuple[list[int], str]:
    """Give `tokenizer` the named template; return (ids of the tokens it had to add, end token).

    With name "tokenizer" the tokenizer's own chat_template is kept: where it marks assistant text with
    `{% generation %}` the marks say what trains, else the answers are found by rendering (turns.py).
    """
    if name == "tokenizer":
        own = tokenizer.chat_template
        if isinstance(own, dict):  # saved by save_tokenizer (a model this loop trained), or named templates
            own = own.get("training") or own.get("default")
            tokenizer.chat_template = own
        if not isinstance(own, str) or not own.strip():
            raise TemplateError("data.template is 'tokenizer' but the tokenizer has no chat_template; "
                                "use data.template: starchat or chatml")
        if tokenizer.eos_token is None:
            raise TemplateError("data.template is 'tokenizer' but the tokenizer has no eos_token, the token that "
                                "ends an answer; set one, or use data.template: starchat or chatml")
        return [], tokenizer.eos_token
    from tokenizers import AddedToken

    template = TEMPLATES[name]
    missing = [t for t in template.special_tokens if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    tags = [t for t in TOOL_TOKENS if t not in tokenizer.get_vocab()]
    if tags:
        tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in tags])
    missing += tags
    reserved = list(tokenizer.all_special_tokens) + list(template.special_tokens) + list(TOOL_TOKENS)
    # apply_chat_template tokenizes the rendered text without adding special tokens (as vLLM and TGI
    # do), so a tokenizer that adds a BOS gets it from the template: exactly one per dialogue.
    tokenizer.chat_template = build_jinja(template, reserved, bos=adds_bos(tokenizer))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = template.end_token
    return tokenizer.convert_tokens_to_ids(missing), template.end_token


def renders_tools(jinja: str | dict | None) -> bool:
    """Whether a chat template (the default one of named templates) renders tool calls at all (one that never
    reads `tool_calls` drops them)."""
    if isinstance(jinja, dict):
        jinja = jinja.get("default")
    return isinstance(jinja, str) and "tool_calls" in jinja


# How a template has the model write tool calls, named as vLLM's tool parsers are (`--tool-call-parser`), each
# with what in the template's text tells it (first match wins): Qwen3-Coder's XML, Mistral's [TOOL_CALLS] JSON,
# Llama 3.x's bare JSON with "parameters", else Hermes / Qwen2.5 JSON in <tool_call> tags (the templates here).
TOOL_PARSERS = (("qwen3_coder", "<function="), ("mistral", "[TOOL_CALLS]"), ("llama3_json", '"parameters": '),
                ("hermes", ""))


def tool_parser(jinja: str | dict | None) -> str:
    """The vLLM tool parser that reads the calls a model trained with this template writes."""
    if isinstance(jinja, dict):
        jinja = jinja.get("default") or next(iter(jinja.values()), "")
    return next(name for name, sign in TOOL_PARSERS if sign in (jinja or ""))


def encode(tokenizer: PreTrainedTokenizerBase, dialogue: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids of a dialogue and a 0/1 mask of the trained (assistant) positions, as the template's
    `{% generation %}` markers give them (an unmarked template goes through tokenize.Encoder, which finds them)."""
    if not marks_generation(tokenizer.chat_template):
        raise TemplateError("the chat template does not mark its trained text with {% generation %}; preference "
                            "pairs (training.objective: dpo) need data.template: starchat or chatml, or a marked one")
    messages, tools = calls.split(dialogue)
    out = tokenizer.apply_chat_template(
        messages, tools=tools, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    return list(out["input_ids"]), list(out["assistant_masks"])


def render(tokenizer: PreTrainedTokenizerBase, dialogue: list[dict], generation_prompt: bool = False) -> str:
    messages, tools = calls.split(dialogue)
    return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=generation_prompt)


def mark_trained(tokenizer: PreTrainedTokenizerBase, ids: list[int], mask: list[int], color: bool) -> str:
    """The dialogue as text with trained spans shown: green in a terminal, `[[...]]` otherwise."""
    start, end = ("\033[32m", "\033[0m") if color else ("[[", "]]")
    out, run, trained = [], [], False
    for token, m in zip(ids, mask):
        if bool(m) != trained and run:
            text = tokenizer.decode(run)
            out.append(f"{start}{text}{end}" if trained else text)
            run = []
        trained = bool(m)
        run.append(token)
    if run:
        text = tokenizer.decode(run)
        out.append(f"{start}{text}{end}" if trained else text)
    return "".join(out)
