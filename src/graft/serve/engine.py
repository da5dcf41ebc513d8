"""Continuous batching over many adapters on one frozen base model.

One thread owns the model. Between decoding steps it runs queued commands (load or unload an
adapter), admits waiting requests (each prompt is prefilled alone, unpadded, through its own
adapter, then its key/value states join the batch), and runs one decoding step for every live
row: one base forward in which ``graft.route`` gives each row its own adapter (LoRA rows are
gathered per adapter into one batched matmul). Finished rows leave at once; nothing waits for
the slowest request of a batch.

Callers submit from any thread and receive :class:`Event` objects through a callback, so the
HTTP layer can bridge them into asyncio and tests can simply block on :meth:`Engine.generate`.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from typing_extensions import Self

from graft import core
from graft.decode.generation import contiguous_head, left_pad, top_p_filter
from graft.serve.kv import BatchKV

log = logging.getLogger("graft.serve")

__all__ = ["Engine", "EngineClosed", "Event", "Result", "Sampling"]


class EngineClosed(RuntimeError):
    """The engine is shutting down and takes no new requests."""


@dataclass(frozen=True)
class Sampling:
    """How one request decodes (OpenAI's parameters)."""

    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not 0 <= self.temperature <= 2:
            raise ValueError(f"temperature must be in [0, 2], got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")


@dataclass(frozen=True)
class Event:
    """A piece of one request's output: new text, and at the end why it finished."""

    text: str = ""
    token_ids: tuple[int, ...] = ()
    finish_reason: str | None = None  # "stop" | "length" | "error"
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    status: int = 500  # with ``error``: the HTTP status it maps to (4xx: the request's fault, e.g. its adapter went)


@dataclass
class Result:
    """A finished request, as :meth:`Engine.generate` returns it."""

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    latency_s: float


@dataclass(eq=False)
class _Row:
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


class Engine:
    """Decode many requests at once, each through its own adapter (or the base model).

    Args:
        model: A causal LM, with or without graft adapters; it is put in eval mode.
        tokenizer: Its tokenizer (``decode`` and the EOS ids are used).
        registry: Where adapter names are resolved (:class:`graft.serve.AdapterRegistry`);
            ``None`` serves the adapters already attached to the model.
        max_batch: Most rows decoded together.
        prefill_tokens: Prompt tokens prefilled between two decoding steps (at least one
            prompt), so a burst of new requests does not stall the running ones for long.
        eos_token_ids: Tokens that end a completion; default the generation config's and the
            tokenizer's EOS.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        *,
        registry: Any = None,
        max_batch: int = 64,
        prefill_tokens: int = 2048,
        eos_token_ids: Sequence[int] | None = None,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.registry = registry
        self.max_batch = max_batch
        self.prefill_tokens = prefill_tokens
        self.eos = set(eos_token_ids) if eos_token_ids is not None else _eos_ids(model, tokenizer)
        self.device = next(model.parameters()).device
        self.max_context = _max_context(model.config)
        self.pad_id = tokenizer.pad_token_id if getattr(tokenizer, "pad_token_id", None) is not None else 0
        if any(layer.merged for _, layer in core.adapter_layers(model)):
            raise ValueError("the model has merged adapters; serve unmerged adapters (graft.unmerge) or the merged model alone")
        self._waiting: deque[_Row] = deque()
        self._commands: deque[tuple[Callable[[], Any], Future]] = deque()
        self._rows: list[_Row] = []
        self._kv = BatchKV(max_batch)
        self._wake = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None
        self.steps = 0  # decoding steps run (for tests and metrics)
        self.max_rows_seen = 0
        # Where the engine thread's time goes (seconds), for benchmarks and /metrics-style reports.
        self.timing = {"prefill_s": 0.0, "prefill_positions": 0, "prefill_batches": 0, "decode_s": 0.0, "decode_rows": 0}

    # ---- lifecycle
    def start(self) -> Engine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="graft-engine", daemon=True)
            self._thread.start()
        return self

    def shutdown(self, timeout: float | None = None) -> None:
        """Stop taking requests, finish the ones in flight, then stop the thread."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # ---- submitting work (any thread)
    def submit(
        self,
        prompt_ids: Sequence[int],
        sink: Callable[[Event], None],
        adapter: str | None = None,
        sampling: Sampling | None = None,
        stream: bool = True,
    ) -> _Row:
        """Queue a request; ``sink`` receives its events on the engine thread (keep it quick).

        With ``stream=False`` the sink gets one event, at the end, holding the whole text. Returns
        a ticket whose ``cancel()`` drops the request at the next step.
        """
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        row = _Row(list(prompt_ids), adapter, sampling or Sampling(), sink, stream=stream)
        with self._wake:
            if self._closing:
                raise EngineClosed("the server is shutting down")
            self._waiting.append(row)
            self._wake.notify()
        return row

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run ``fn`` on the engine thread between two steps (adapter loading changes the model)."""
        future: Future = Future()
        with self._wake:
            self._commands.append((fn, future))
            self._wake.notify()
        return future

    def generate(
        self, prompt_ids: Sequence[int], adapter: str | None = None, sampling: Sampling | None = None, timeout: float | None = None
    ) -> Result:
        """Submit one request and block until it finishes."""
        events: queue.Queue[Event] = queue.Queue()
        began = time.perf_counter()
        self.submit(prompt_ids, events.put, adapter, sampling, stream=False)
        text, ids = [], []
        while True:
            event = events.get(timeout=timeout)
            text.append(event.text)
            ids.extend(event.token_ids)
            if event.finish_reason is not None:
                if event.error is not None:
                    raise RuntimeError(event.error)
                return Result(
                    "".join(text), ids, event.finish_reason, event.prompt_tokens, event.completion_tokens,
                    time.perf_counter() - began,
                )

    # ---- the engine thread
    def _loop(self) -> None:
        while True:
            with self._wake:
                while not (self._commands or self._waiting or self._rows or self._closing):
                    self._wake.wait()
                if self._closing and not (self._commands or self._waiting or self._rows):
                    return
                commands = list(self._commands)
                self._commands.clear()
            for fn, future in commands:
                try:
                    future.set_result(fn())
                except Exception as err:  # noqa: BLE001 - handed to the caller
                    future.set_exception(err)
            with torch.no_grad():
                self._admit()
                if self._rows:
                    try:
                        self._step()
                    except Exception as err:
                        log.exception("decoding step failed")
                        for row in list(self._rows):
                            self._finish(row, "error", error=f"decoding failed: {err}")
                        self._rows, self._kv = [], BatchKV(self.max_batch)

    def _admit(self) -> None:
        """Move waiting requests into the batch, up to ``prefill_tokens`` prompt tokens (at least one)."""
        group: list[_Row] = []
        budget = self.prefill_tokens
        with self._wake:
            while self._waiting and len(self._rows) + len(group) < self.max_batch:
                if group and len(self._waiting[0].prompt_ids) > budget:
                    break
                row = self._waiting.popleft()
                budget -= len(row.prompt_ids)
                group.append(row)
        ready = []
        for row in group:
            try:
                self._prepare(row)
                ready.append(row)
            except Exception as err:  # noqa: BLE001 - reported to this request only
                log.warning("request refused: %s", err)
                self._finish(row, "error", error=str(err), status=getattr(err, "status", 400))
        by_adapter: dict[str | None, list[_Row]] = {}
        for row in ready:  # one adapter per prefill batch: its LoRA runs as a plain matmul pair
            by_adapter.setdefault(row.adapter, []).append(row)
        for chunk in (c for rows in by_adapter.values() for c in _similar_lengths(rows)):
            try:
                self._prefill(chunk)
            except Exception as err:
                log.exception("prefill failed")
                for row in chunk:
                    self._finish(row, "error", error=f"prefill failed: {err}")

    def _prepare(self, row: _Row) -> None:
        if row.cancelled:
            raise ValueError("cancelled")
        if len(row.prompt_ids) >= self.max_context:
            raise ValueError(f"the prompt has {len(row.prompt_ids)} tokens; this model takes at most {self.max_context - 1}")
        if row.adapter is not None:
            if self.registry is not None:
                self.registry.acquire(row.adapter)
                row.acquired = True
            elif row.adapter not in core.state_of(self.model).methods:
                raise ValueError(f"no adapter named {row.adapter!r}")
        if row.sampling.temperature > 0:
            seed = row.sampling.seed if row.sampling.seed is not None else random.getrandbits(63)
            row.generator = torch.Generator().manual_seed(seed)

    def _prefill(self, rows: list[_Row]) -> None:
        """Run prompts of similar length as one left-padded batch; their states then join the decoding batch."""
        from transformers import DynamicCache

        began = time.perf_counter()
        ids, mask, positions = left_pad([row.prompt_ids for row in rows], self.pad_id)
        cache = DynamicCache()
        with self._routing([row.adapter for row in rows]), contiguous_head(self.model):
            out = self.model(
                input_ids=ids.to(self.device), attention_mask=mask.to(self.device), position_ids=positions.to(self.device),
                past_key_values=cache, use_cache=True, logits_to_keep=1,
            )
        width = ids.shape[1]
        self._kv.reserve(len(rows), width)
        for i, (row, token) in enumerate(zip(rows, self._choose(out.logits[:, -1], rows))):
            if self._advance(row, token):
                continue
            start = width - len(row.prompt_ids)
            self._kv.add([(layer.keys[i : i + 1, :, start:], layer.values[i : i + 1, :, start:]) for layer in cache.layers])
            self._rows.append(row)
        self.max_rows_seen = max(self.max_rows_seen, len(self._rows))
        self.timing["prefill_s"] += time.perf_counter() - began
        self.timing["prefill_positions"] += ids.numel()
        self.timing["prefill_batches"] += 1

    def _step(self) -> None:
        began = time.perf_counter()
        self.timing["decode_rows"] += len(self._rows)
        ids = torch.tensor([[row.ids[-1]] for row in self._rows], device=self.device)
        mask, positions = self._kv.step_inputs(self.device)
        with self._routing([row.adapter for row in self._rows]):
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=self._kv, use_cache=True)
        self._kv.advance()
        self.steps += 1
        tokens = self._choose(out.logits[:, -1], self._rows)
        done = [i for i, (row, token) in enumerate(zip(self._rows, tokens)) if self._advance(row, token)]
        for i in reversed(done):  # highest first: the last row moves into a freed slot
            self._kv.remove(i)
            last = self._rows.pop()
            if i < len(self._rows):
                self._rows[i] = last
        self.timing["decode_s"] += time.perf_counter() - began

    def _routing(self, adapters: list[str | None]) -> contextlib.AbstractContextManager:
        """Per-row adapters for one forward; names were checked when their requests were admitted."""
        state = getattr(self.model, core.STATE_ATTR, None)
        if state is None:
            return contextlib.nullcontext()
        return core.routing_unchecked(state, adapters)

    @staticmethod
    def _choose(logits: torch.Tensor, rows: list[_Row]) -> list[int]:
        """Next token per row: greedy rows by argmax, sampled rows with their own generator."""
        tokens = logits.argmax(-1).tolist()
        for i, row in enumerate(rows):
            s = row.sampling
            if s.temperature > 0:
                scaled = logits[i : i + 1].float() / s.temperature
                if s.top_p < 1.0:
                    scaled = top_p_filter(scaled, s.top_p)
                tokens[i] = int(torch.multinomial(torch.softmax(scaled, -1), 1, generator=row.generator))
        return tokens

    def _advance(self, row: _Row, token: int) -> bool:
        """Record a token, send what text is final; True when the row has finished."""
        s = row.sampling
        if row.cancelled:
            self._finish(row, "cancelled")
            return True
        eos = token in self.eos and not s.ignore_eos
        if not eos:
            row.ids.append(token)
        out_of_room = len(row.ids) >= s.max_tokens or len(row.prompt_ids) + len(row.ids) >= self.max_context
        if not (row.stream or s.stop or eos or out_of_room):
            return False  # nothing to send and no stop string to look for: skip detokenizing
        text = self.tokenizer.decode([t for t in row.ids if t not in self.eos], skip_special_tokens=True)
        reason = "stop" if eos else None
        cut = min((i for i in (text.find(x, max(0, row.emitted - len(x))) for x in s.stop) if i >= 0), default=-1)
        if cut >= 0:
            text, reason = text[:cut], "stop"
        elif out_of_room:
            reason = "length"
        if reason is None and not row.stream:
            return False
        if reason is None:
            # Hold back what could still turn into a stop string, or half a multi-byte character.
            hold = max((len(x) - 1 for x in s.stop), default=0)
            end = len(text) - hold
            while end > row.emitted and text[end - 1] == "\ufffd":
                end -= 1
            if end > row.emitted:
                row.sink(Event(text=text[row.emitted : end], token_ids=(token,)))
                row.emitted = end
            elif not eos:
                row.sink(Event(token_ids=(token,)))
            return False
        ids = () if eos else (token,)
        self._finish(row, reason, text=text[row.emitted :], token_ids=ids if row.stream else tuple(row.ids))
        return True

    def _finish(self, row: _Row, reason: str, *, text: str = "", token_ids: tuple[int, ...] = (), error: str | None = None,
                status: int = 500) -> None:
        if row.acquired:
            row.acquired = False
            self.registry.release(row.adapter)
        row.sink(Event(text, token_ids, reason, error, len(row.prompt_ids), len(row.ids), status))


def _eos_ids(model: nn.Module, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    config = getattr(model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    ids.update(eos if isinstance(eos, list) else [eos])
    ids.add(getattr(tokenizer, "eos_token_id", None))
    return {i for i in ids if i is not None}


def _max_context(config: Any) -> int:
    """Longest sequence served: position limit, and the sliding window (the cache keeps no window)."""
    limit = getattr(config, "max_position_embeddings", None) or 2048
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True):
        limit = min(limit, window)
    return int(limit)


def _similar_lengths(rows: list[_Row], waste: float = 0.25) -> list[list[_Row]]:
    """Split prompts, shortest first, into batches padded by at most ``waste`` of their real tokens."""
    chunks: list[list[_Row]] = []
    total = 0
    for row in sorted(rows, key=lambda r: len(r.prompt_ids)):
        n = len(row.prompt_ids)
        if chunks and (len(chunks[-1]) + 1) * n <= (1 + waste) * (total + n):
            chunks[-1].append(row)
            total += n
        else:
            chunks.append([row])
            total = n
    return chunks
