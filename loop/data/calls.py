"""Tool use in dialogues: the schema of tool calls, tool results and a dialogue's tool list, and reading
a call back out of generated text.

The schema is TRL's and OpenAI's conversational one, what `apply_chat_template(messages, tools=...)` takes:
an assistant message may carry `tool_calls` (`[{"type": "function", "function": {"name", "arguments"}}]`,
arguments an object or a JSON string) with or without text; a `tool` message carries a result (`content`,
and `tool_call_id` or `name` where given); a dialogue may have a `tools` list of JSON-schema function
definitions. Inside the loop a dialogue stays one list of messages (what every stage cuts, hashes and
counts), so its tool list rides on its first message under the key "tools": a prefix cut at a turn keeps
it, and the digest sees it. `split` takes it off again wherever a template renders the dialogue.
"""

from __future__ import annotations

import json
import re
from typing import Any

from loop.data.records import Messages, loads

TOOLS = "tools"  # the key of a dialogue's tool list on its first message


def split(dialogue: Messages) -> tuple[Messages, list | None]:
    """(messages as a template takes them, the dialogue's tool list or None)."""
    if dialogue and isinstance(dialogue[0], dict) and TOOLS in dialogue[0]:
        return [{k: v for k, v in dialogue[0].items() if k != TOOLS}, *dialogue[1:]], dialogue[0][TOOLS]
    return dialogue, None


def attach(messages: Messages, tools: Any) -> Messages:
    """The dialogue of `messages` with `tools` (nothing attached when there are none)."""
    if tools is None or not messages or not isinstance(messages[0], dict):
        return messages
    return [{**messages[0], TOOLS: tools}, *messages[1:]]


def uses_tools(dialogue: Messages) -> bool:
    return any(isinstance(m, dict) and (m.get("tool_calls") or m.get("role") == "tool" or TOOLS in m)
               for m in dialogue)


def tool_name(tool: Any) -> str | None:
    """The name a tool definition gives (`{"type": "function", "function": {"name"}}`, or `{"name"}` bare)."""
    if not isinstance(tool, dict):
        return None
    spec = tool.get("function", tool)
    return spec.get("name") if isinstance(spec, dict) and isinstance(spec.get("name"), str) else None


def wrapped(tools: Any) -> Any:
    """Bare function definitions (`{"name", "description", "parameters"}`, as older shapes keep them) in the
    `{"type": "function", "function": ...}` form that chat templates are written for; anything else as it is."""
    if not isinstance(tools, list):
        return tools
    return [{"type": "function", "function": t} if isinstance(t, dict) and "function" not in t and "name" in t
            else t for t in tools]


def check_tools(tools: Any) -> str | None:
    """Why a tool list is not one (a list of named function definitions, each name once), or None."""
    if not isinstance(tools, list):
        return f"tools must be a list of function definitions, got {type(tools).__name__}"
    names = [tool_name(t) for t in tools]
    for i, name in enumerate(names):
        if not name:
            return f"tools[{i}] must be a function definition with a name ({{'type': 'function', 'function': " \
                   "{'name', 'description', 'parameters'}})"
        if name in names[:i]:
            return f"tools[{i}]: the tool {name!r} is defined twice"
    return None


def arguments(raw: Any) -> dict | str:
    """A call's arguments as an object, or why they are not JSON for one."""
    if isinstance(raw, str):
        try:
            raw = loads(raw)
        except ValueError as e:  # nesting bounded: a string nested 10,000 deep is a bad record, not RecursionError
            return f"arguments are not valid JSON ({e})"
    if not isinstance(raw, dict):
        return f"arguments must be a JSON object, got {type(raw).__name__}"
    return raw


def check_call(call: Any, names: list[str] | None) -> tuple[str, str] | None:
    """(kind, reason) when one entry of `tool_calls` is wrong; `names` are the tools the dialogue offers (None:
    it gives no list, so any name goes)."""
    spec = call.get("function") if isinstance(call, dict) else None
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not spec["name"]:
        return "bad_tool_call", "a tool call must be {'type': 'function', 'function': {'name', 'arguments'}}"
    if call.get("type", "function") != "function":
        return "bad_tool_call", f"a tool call's type must be 'function', got {call['type']!r}"
    if names is not None and spec["name"] not in names:
        return "unknown_tool", f"calls the tool {spec['name']!r}, which is not in the dialogue's tools {names}"
    if "arguments" not in spec:
        return "bad_arguments", f"the call to {spec['name']!r} has no arguments (give {{}} for none)"
    found = arguments(spec["arguments"])
    if isinstance(found, str):
        return "bad_arguments", f"the call to {spec['name']!r}: {found}"
    return None


def call(name: str, args: dict, call_id: str | None = None) -> dict:
    """One entry of `tool_calls` in the schema."""
    return {**({"id": call_id} if call_id else {}), "type": "function", "function": {"name": name, "arguments": args}}


_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


def parse_calls(text: str) -> tuple[str, list[dict]]:
    """Generated text as (the text outside calls, the calls): each `<tool_call>{"name", "arguments"}</tool_call>`
    block (the Hermes / Qwen2.5 convention the templates render) as {"name", "arguments"}, with the arguments
    parsed, or as {"error", "text"} when the block is not such JSON."""
    found = []
    for block in _CALL.finditer(text):
        try:
            value = loads(block.group(1))
        except ValueError as e:
            found.append({"error": f"not JSON ({e})", "text": block.group(1)})
            continue
        if not isinstance(value, dict) or not isinstance(value.get("name"), str):
            found.append({"error": "not a {name, arguments} object", "text": block.group(1)})
            continue
        args = arguments(value.get("arguments", {}))
        found.append({"name": value["name"], "arguments": args} if isinstance(args, dict) else
                     {"error": args, "text": block.group(1)})
    return _CALL.sub("", text).strip(), found


def describe(found: dict, names: list[str] | None = None) -> str:
    """One parsed call (from parse_calls) as a user reads it: `name {"argument": value}`, or what is wrong."""
    if "error" in found:
        return f"malformed tool call ({found['error']}): {found['text']}"
    unknown = "" if names is None or found["name"] in names else f"  (not one of the tools {names})"
    return f"{found['name']} {json.dumps(found['arguments'], ensure_ascii=False)}{unknown}"


def read_tools(text: str, where: str) -> list[dict]:
    """A tools file's definitions (a JSON list, or {"tools": [...]}; bare definitions wrapped), or a ValueError
    that says what is wrong with it."""
    try:
        found = loads(text)
    except ValueError as e:
        raise ValueError(f"{where}: not JSON ({e})") from None
    found = wrapped(found.get("tools") if isinstance(found, dict) else found)
    if problem := check_tools(found):
        raise ValueError(f"{where}: {problem}")
    return found
