"""Tool calls read back out of generated text, in the format the model's chat template taught it.

Which format comes from the template (data/templates.py `tool_parser`, the name vLLM's `--tool-call-parser`
takes): `hermes`, JSON `{"name", "arguments"}` in `<tool_call>` tags (the templates here, Qwen2.5, Qwen3);
`qwen3_coder`, XML `<tool_call><function=NAME><parameter=ARG>value</parameter></function></tool_call>`, each value
text, typed by the tool's JSON schema as vLLM's parser does; `llama3_json`, the whole answer one JSON object
`{"name", "parameters"}` (after `<|python_tag|>` where kept). Every parser returns what data/calls.py's does:
the text outside calls, and each call as {"name", "arguments"} or {"error", "text"}.
"""

from __future__ import annotations

import json
import re
from typing import Any

from loop.data import calls

_XML_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)
_FUNCTION = re.compile(r"<function=([^>\s]+)>(.*?)(?:</function>|$)", re.DOTALL)
_PARAMETER = re.compile(r"<parameter=([^>\s]+)>\n?(.*?)\n?(?:</parameter>|$)", re.DOTALL)


def _typed(value: str, schema: Any) -> Any:
    """A parameter's text as its schema's type says (text where it says nothing, or the text does not parse)."""
    kind = schema.get("type") if isinstance(schema, dict) else None
    if kind in (None, "string") or (isinstance(kind, list) and "string" in kind):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def _properties(tools: list[dict] | None, name: str) -> dict:
    for tool in tools or []:
        spec = tool.get("function", tool) if isinstance(tool, dict) else {}
        if isinstance(spec, dict) and spec.get("name") == name:
            return (spec.get("parameters") or {}).get("properties") or {}
    return {}


def parse_xml(text: str, tools: list[dict] | None = None) -> tuple[str, list[dict]]:
    """Qwen3-Coder's calls: `<tool_call><function=NAME><parameter=ARG>value</parameter>...</function></tool_call>`."""
    found = []
    for block in _XML_CALL.finditer(text):
        function = _FUNCTION.search(block.group(1))
        if not function:
            found.append({"error": "no <function=NAME> inside <tool_call>", "text": block.group(1)})
            continue
        name, body = function.group(1), function.group(2)
        properties = _properties(tools, name)
        args = {arg: _typed(value, properties.get(arg)) for arg, value in _PARAMETER.findall(body)}
        found.append({"name": name, "arguments": args})
    return _XML_CALL.sub("", text).strip(), found


def parse_llama3(text: str, tools: list[dict] | None = None) -> tuple[str, list[dict]]:
    """Llama 3.x's call: the whole answer one JSON object {"name", "parameters"}; anything else is text."""
    body = text.strip().removeprefix("<|python_tag|>").strip()
    if not body.startswith("{"):
        return text.strip(), []
    try:
        value = json.loads(body)
    except json.JSONDecodeError as e:
        return "", [{"error": f"not JSON ({e.msg})", "text": body}]
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return text.strip(), []
    args = calls.arguments(value.get("parameters", value.get("arguments", {})))
    return "", [{"name": value["name"], "arguments": args} if isinstance(args, dict) else {"error": args, "text": body}]


PARSERS = {"hermes": lambda text, tools=None: calls.parse_calls(text), "qwen3_coder": parse_xml,
           "llama3_json": parse_llama3}


def parse(text: str, parser: str, tools: list[dict] | None = None) -> tuple[str, list[dict]]:
    """The calls in `text` as `parser` (a templates.tool_parser name) reads them; Hermes JSON for one not here."""
    return PARSERS.get(parser, PARSERS["hermes"])(text, tools)
