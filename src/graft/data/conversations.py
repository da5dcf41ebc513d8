"""Bring the common conversation layouts to graft's chat format: ``messages: [{role, content}]``.

* **ShareGPT** (Vicuna, LLaMA-Factory's ``sharegpt``): ``conversations: [{"from": "human", "value": ...}]``,
  optionally with a top-level ``system`` prompt. Speakers map to roles: ``human``/``user`` -> user,
  ``gpt``/``assistant``/``model``/``chatgpt``/``bard``/``bing`` -> assistant, ``system`` -> system,
  ``function_call`` -> assistant, ``observation``/``tool``/``function`` -> tool.
* **OpenAI messages**: ``messages: [{"role": ..., "content": ...}]`` is graft's own layout; content given
  as a list of parts (``[{"type": "text", "text": ...}]``) is joined into one string.

A row is converted when its conversation column holds a list of dicts of that shape; other rows pass
through unchanged, so a mixed file is never half-converted silently: a row whose turns are neither shape
fails in :func:`graft.data.render` with its file and line.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from graft.data.readers import DataError, Record

__all__ = ["SHAREGPT_ROLES", "normalize_conversations", "sharegpt_to_messages"]

#: ShareGPT speaker (``from``) -> chat role.
SHAREGPT_ROLES: dict[str, str] = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "model": "assistant", "chatgpt": "assistant",
    "bard": "assistant", "bing": "assistant", "function_call": "assistant",
    "system": "system",
    "observation": "tool", "tool": "tool", "function": "tool",
}
# Column names tried, in order, when no ``messages`` mapping is given.
_COLUMNS = ("messages", "conversations")


def normalize_conversations(records: list[Record], column: str | None = None) -> list[Record]:
    """Convert ShareGPT / OpenAI conversation rows to ``messages: [{role, content}]``.

    Args:
        records: The rows.
        column: The column holding the conversation (from a ``messages=COLUMN`` field mapping); by
            default ``messages``, else ``conversations``.

    Returns:
        The rows, converted ones with ``messages`` (a ShareGPT ``conversations`` column is renamed unless a
        mapping names it, in which case it is converted in place). Rows of other formats come back as given.

    Raises:
        DataError: A ShareGPT turn with an unknown speaker, or a message whose content parts are not text;
            the message names the row.
    """
    if not records:
        return records
    first = records[0].data
    name = column or next((c for c in _COLUMNS if c in first), None)
    if name is None or not _is_conversation(first.get(name)):
        return records
    target = name if column or name == "messages" else "messages"
    return [_convert(record, name, target) for record in records]


def sharegpt_to_messages(turns: list[Mapping[str, Any]], where: str, system: str | None = None) -> list[dict]:
    """ShareGPT turns (``from`` / ``value``) as chat messages (``role`` / ``content``)."""
    messages = [{"role": "system", "content": system}] if system else []
    for i, turn in enumerate(turns):
        speaker = turn.get("from")
        role = SHAREGPT_ROLES.get(str(speaker).lower()) if speaker is not None else None
        if role is None:
            raise DataError(f"{where}: conversations[{i}] has speaker 'from': {speaker!r}; ShareGPT speakers are "
                            f"{', '.join(SHAREGPT_ROLES)}")
        messages.append({"role": role, "content": turn.get("value")})
    return messages


def _is_conversation(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(turn, Mapping) for turn in value)


def _convert(record: Record, name: str, target: str) -> Record:
    turns = record.data.get(name)
    if not _is_conversation(turns):
        return record  # rendering names the row and what it lacks
    data = dict(record.data)
    if all("from" in turn and "value" in turn for turn in turns):
        system = data.get("system") if isinstance(data.get("system"), str) else None
        messages = sharegpt_to_messages(turns, record.where, system)
    else:
        messages = [_openai_message(turn, record.where, i) for i, turn in enumerate(turns)]
    if target != name:
        del data[name]
    data[target] = messages
    return replace(record, data=data)


def _openai_message(message: Mapping[str, Any], where: str, i: int) -> dict[str, Any]:
    """An OpenAI chat message with its content as one string (text parts joined)."""
    content = message.get("content")
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, Mapping) and part.get("type", "text") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif isinstance(part, str):
                texts.append(part)
            else:
                kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                raise DataError(f"{where}: messages[{i}] has a content part of type {kind!r}; only text parts can "
                                "be trained on")
        content = "".join(texts)
    return {**message, "content": content}
