"""Tool calling in conversational rows: TRL's optional ``tools`` and ``chat_template_kwargs``
columns, read and checked, and whether a conversation uses tools (then its rows need the
tool schemas, which the chat template renders into the prompt).

A row, as TRL's DPOTrainer reads it (trl 1.16)::

    tools                 list of JSON schemas, one per tool (or the JSON text of that list)
    chat_template_kwargs  {name: value} extra variables of the chat template (or its JSON text)
    assistant message     {"role": "assistant", "content": str | None, "tool_calls": [{...}, ...]}
    tool result           {"role": "tool", "content": str, ...}

Every function here raises ValueError with the problem; validation turns it into a row problem.
"""

from __future__ import annotations

import json
from typing import Any


def parse_tools(value: Any) -> list[dict] | None:
    """A row's tool schemas: None when the row gives none (null, or an empty list), else a
    list of dicts. JSON text is parsed first, as TRL does."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as bad:
            raise ValueError(f"'tools' is text but not valid JSON ({bad.msg} at column {bad.colno})") from None
    if value is None or value == []:
        return None
    if not isinstance(value, list) or not all(isinstance(tool, dict) for tool in value):
        raise ValueError(f"'tools' is {_kind(value)}, expected a list of tool schemas (JSON objects)")
    return value


def parse_template_kwargs(value: Any, reserved: tuple[str, ...]) -> dict[str, Any]:
    """A row's extra chat-template variables: {} when it gives none; JSON text is parsed.

    Entries whose value is null are dropped: `datasets` fills the keys a row lacks with null
    when it unifies rows, and a template tests `x is defined`, which null passes.
    """
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as bad:
            raise ValueError(
                f"'chat_template_kwargs' is text but not valid JSON ({bad.msg} at column {bad.colno})"
            ) from None
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"'chat_template_kwargs' is {_kind(value)}, expected an object of template variables")
    clashes = [name for name in value if name in reserved]
    if clashes:
        raise ValueError(
            f"'chat_template_kwargs' sets {', '.join(map(repr, clashes))}, which mallowspo sets itself "
            "(give tool schemas in the 'tools' column)"
        )
    return {name: v for name, v in value.items() if v is not None}


def tool_calls_of(message: dict) -> list[dict]:
    """The tool calls of a message ([] for none); raises ValueError when they are malformed."""
    calls = message.get("tool_calls")
    if calls is None:
        return []
    if not isinstance(calls, list) or not all(isinstance(call, dict) for call in calls):
        raise ValueError(f"has tool_calls {_kind(calls)}, expected a list of {{'type', 'function'}} objects")
    if calls and message.get("role") != "assistant":
        raise ValueError(f"is a {message.get('role')!r} message with tool_calls; only assistant messages call tools")
    return calls


def message_text(message: dict) -> str:
    """What a message says: its content and, as JSON, its tool calls."""
    calls = message.get("tool_calls")
    return (message.get("content") or "") + (json.dumps(calls, sort_keys=True, default=str) if calls else "")


def first_tool_use(conversation: dict[str, list[dict]]) -> str | None:
    """Where the first message that calls a tool, or gives a tool's result, is
    (e.g. "message 1 of 'chosen' calls a tool"); None when the conversation uses no tool."""
    for name, messages in conversation.items():
        for position, message in enumerate(messages):
            if message.get("tool_calls"):
                return f"message {position} of '{name}' calls a tool"
            if message.get("role") == "tool":
                return f"message {position} of '{name}' is a tool result"
    return None


def _kind(value: Any) -> str:
    if isinstance(value, list):
        return "a list of " + "/".join(sorted({type(v).__name__ for v in value})) if value else "an empty list"
    return "null" if value is None else f"a {type(value).__name__}"
