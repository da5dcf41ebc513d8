"""One request inside the engine: its prompt, its tokens so far, and what text of them is final."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from graft.serve.sampling import Sampling

__all__ = ["Event", "Row"]


@dataclass(frozen=True)
class Event:
    """A piece of one request's output: new text, and at the end why it finished."""

    text: str = ""
    token_ids: tuple[int, ...] = ()
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    status: int = 500  # with ``error``: the HTTP status it maps to (4xx: the request's fault, e.g. its adapter went)


@dataclass(eq=False)
class Row:
    """A request being decoded; the engine thread alone changes it (``cancel`` may come from any thread)."""

    prompt_ids: list[int]
    adapter: str | None
    sampling: Sampling
    sink: Callable[[Event], None]
    generator: torch.Generator | None = None
    ids: list[int] = field(default_factory=list)
    emitted: int = 0  # characters of text already sent
    acquired: bool = False
    cancelled: bool = False
    stream: bool = True  # False: one event at the end (fewer wake-ups of the caller's thread)

    def cancel(self) -> None:
        """Stop decoding this request at the next step (the client went away)."""
        self.cancelled = True

    def span(self, max_context: int) -> int:
        """Most cache columns this request can ever fill: its prompt and every token it may add."""
        return min(len(self.prompt_ids) + self.sampling.max_tokens, max_context)

    def take(self, token: int, tokenizer: Any, eos: set[int], max_context: int) -> tuple[str, tuple[int, ...], str | None] | None:
        """Record a token; return ``(text, token ids, finish reason)`` to send now, or ``None`` for nothing yet."""
        s = self.sampling
        is_eos = token in eos and not s.ignore_eos
        if not is_eos:
            self.ids.append(token)
        out_of_room = len(self.ids) >= s.max_tokens or len(self.prompt_ids) + len(self.ids) >= max_context
        if not (self.stream or s.stop or is_eos or out_of_room):
            return None  # nothing to send and no stop string to look for: skip detokenizing
        text = tokenizer.decode([t for t in self.ids if t not in eos], skip_special_tokens=True)
        reason = "stop" if is_eos else None
        cut = min((i for i in (text.find(x, max(0, self.emitted - len(x))) for x in s.stop) if i >= 0), default=-1)
        if cut >= 0:
            text, reason = text[:cut], "stop"
        elif out_of_room:
            reason = "length"
        if reason is None and not self.stream:
            return None
        if reason is None:
            # Hold back what could still turn into a stop string, or half a multi-byte character.
            hold = max((len(x) - 1 for x in s.stop), default=0)
            end = len(text) - hold
            while end > self.emitted and text[end - 1] == "\ufffd":
                end -= 1
            if end > self.emitted:
                piece, self.emitted = text[self.emitted : end], end
                return piece, (token,), None
            return None if is_eos else ("", (token,), None)
        ids = () if is_eos else (token,)
        return text[self.emitted :], ids if self.stream else tuple(self.ids), reason
