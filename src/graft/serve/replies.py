"""Engine events into HTTP replies: OpenAI's response and stream-chunk shapes."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from typing import Any

from graft.serve.rows import Event

__all__ = ["Mailbox", "Reply", "sse"]


class Mailbox:
    """Events from the engine thread into one asyncio queue, with at most one loop wake-up pending.

    A decoding step emits one event per row; waking the event loop for each would make the HTTP
    thread compete with the engine for the GIL (and the CPU) dozens of times per step.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, events: asyncio.Queue) -> None:
        self.loop, self.events = loop, events
        self.pending: list[tuple[int, Event]] = []
        self.lock = threading.Lock()

    def sink(self, index: int) -> Any:
        def put(event: Event) -> None:
            with self.lock:
                self.pending.append((index, event))
                wake = len(self.pending) == 1
            if wake and not self.loop.is_closed():
                self.loop.call_soon_threadsafe(self._drain)

        return put

    def _drain(self) -> None:
        with self.lock:
            items, self.pending = self.pending, []
        for item in items:
            self.events.put_nowait(item)


def sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class Reply:
    """Collects the events of one HTTP request's choices into OpenAI's response shape."""

    def __init__(self, chat: bool, model: str, count: int, prompt_tokens: int) -> None:
        self.chat, self.model, self.count, self.prompt_tokens = chat, model, count, prompt_tokens
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.texts = [""] * count
        self.reasons: list[str | None] = [None] * count
        self.completion_tokens = 0
        self.error: str | None = None
        self.status = 500

    @property
    def open(self) -> bool:
        return any(r is None for r in self.reasons)

    def add(self, index: int, event: Event) -> None:
        self.texts[index] += event.text
        if event.finish_reason is not None:
            self.reasons[index] = "stop" if event.finish_reason == "cancelled" else event.finish_reason
            self.completion_tokens += event.completion_tokens
            if event.error:
                self.error, self.status = event.error, event.status

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens, "total_tokens": self.prompt_tokens + self.completion_tokens}

    def body(self) -> dict[str, Any]:
        if self.chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None, "finish_reason": r} for i, (t, r) in enumerate(zip(self.texts, self.reasons))]
        else:
            choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": r} for i, (t, r) in enumerate(zip(self.texts, self.reasons))]
        kind = "chat.completion" if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices, "usage": self.usage()}

    def chunk(self, index: int, delta: Any, reason: str | None) -> dict[str, Any]:
        if self.chat:
            choice = {"index": index, "delta": delta if reason is None else (delta or {}), "logprobs": None, "finish_reason": reason}
            kind = "chat.completion.chunk"
        else:
            choice = {"index": index, "text": delta, "logprobs": None, "finish_reason": reason}
            kind = "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": [choice]}
