"""Continuous batching over many adapters on one frozen base model.

One thread owns the model. Between decoding steps it runs queued commands (load or unload an
adapter), admits waiting requests (each prompt is prefilled alone, unpadded, through its own
adapter, then its key/value states join the batch), and runs one decoding step for every live
row: one base forward in which ``graft.route`` gives each row its own adapter (LoRA rows are
gathered per adapter into one batched matmul). Finished rows leave at once; nothing waits for
the slowest request of a batch.

Callers submit from any thread and receive :class:`Event` objects through a callback, so the
HTTP layer can bridge them into asyncio and tests can simply block on :meth:`Engine.generate`.

One request never fails another: a row whose logits are not finite, whose sampler or
detokenizing raises, fails alone (its cache slot scrubbed); a prefill batch that raises is
retried row by row. A cancelled row (its client went away) leaves before the next step. The
KV-cache budget holds back admissions that would not fit beside the running rows, and
:meth:`Engine.drain` / :meth:`Engine.abort` end a shutdown with an error for each request left.
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
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from typing_extensions import Self

from graft import core
from graft.decode.generation import contiguous_head, left_pad
from graft.serve.kv import BatchKV, KVBudget, token_bytes
from graft.serve.registry import release_memory
from graft.serve.rows import Event, Row
from graft.serve.sampling import Sampling, choose

log = logging.getLogger("graft.serve")

__all__ = ["Engine", "EngineBusy", "EngineClosed", "Event", "Result", "Row", "Sampling"]


class EngineClosed(RuntimeError):
    """The engine is shutting down and takes no new requests."""

    status = 503


class EngineBusy(RuntimeError):
    """The queue of waiting requests is full; the client should retry later."""

    status = 429


@dataclass
class Result:
    """A finished request, as :meth:`Engine.generate` returns it."""

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    latency_s: float


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
        kv_budget_bytes: Most bytes the batch's key/value cache may take, counted for every
            admitted request as if it ran to ``max_tokens`` (see :meth:`kv_bytes`); a request
            that does not fit beside the running ones waits. ``None``: no limit.
        max_waiting: Most requests queued for admission; more are refused (:class:`EngineBusy`).
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
        kv_budget_bytes: int | None = None,
        max_waiting: int = 1024,
    ) -> None:
        if max_waiting < 1:
            raise ValueError(f"max_waiting must be >= 1, got {max_waiting}")
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
        dtype = next(model.parameters()).dtype
        self.budget = KVBudget(kv_budget_bytes, token_bytes(model.config, dtype), max_batch, self.max_context)
        self.max_waiting = max_waiting
        self._waiting: deque[Row] = deque()
        self._commands: deque[tuple[Callable[[], Any], Future]] = deque()
        self._rows: list[Row] = []
        self._kv = BatchKV(max_batch)
        self._wake = threading.Condition()
        self._closing = False  # shutdown(): finish what runs, then stop
        self._draining = False  # drain(): take nothing new
        self._abort: str | None = None  # abort(): fail everything in flight with this message
        self._abort_status = 503
        self._thread: threading.Thread | None = None
        self.steps = 0  # decoding steps run (for tests and metrics)
        self.max_rows_seen = 0
        self.cancelled_rows = 0  # requests dropped because their client went away
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

    def drain(self, grace_s: float) -> threading.Timer:
        """Take no new requests; those still running after ``grace_s`` seconds end with a 503 error."""
        with self._wake:
            self._draining = True
        message = f"the server shut down before this request finished (shutdown grace {grace_s:g} s)"
        timer = threading.Timer(grace_s, self.abort, args=(message,))
        timer.daemon = True
        timer.start()
        return timer

    def abort(self, message: str, status: int = 503) -> None:
        """End every waiting and running request now with an error event (``status``), within one step."""
        with self._wake:
            self._draining = True
            self._abort = message
            self._abort_status = status
            self._wake.notify()

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
    ) -> Row:
        """Queue a request; ``sink`` receives its events on the engine thread (keep it quick).

        With ``stream=False`` the sink gets one event, at the end, holding the whole text. Returns
        a ticket whose ``cancel()`` drops the request at the next step.

        Raises:
            EngineClosed: shutting down. EngineBusy: ``max_waiting`` requests already wait.
        """
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        row = Row(list(prompt_ids), adapter, sampling or Sampling(), sink, stream=stream)
        with self._wake:
            if self._closing or self._draining:
                raise EngineClosed("the server is shutting down")
            if len(self._waiting) >= self.max_waiting:
                raise EngineBusy(f"{len(self._waiting)} requests are waiting already; retry later")
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

    # ---- the memory budget (see kv.KVBudget)
    @property
    def kv_budget_bytes(self) -> int | None:
        return self.budget.limit_bytes

    @kv_budget_bytes.setter
    def kv_budget_bytes(self, value: int | None) -> None:
        self.budget.limit_bytes = value

    def kv_bytes(self, spans: Sequence[int]) -> int:
        """Bytes the batch cache can grow to holding rows of these spans (prompt + max tokens each)."""
        return self.budget.bytes_for(spans)

    def fits(self, spans: Sequence[int]) -> bool:
        """Whether rows of these spans fit the KV-cache budget together."""
        return self.budget.fits(spans)

    # ---- the engine thread
    def _loop(self) -> None:
        while True:
            with self._wake:
                while not (self._commands or self._waiting or self._rows or self._closing or self._abort):
                    self._wake.wait()
                if self._closing and not (self._commands or self._waiting or self._rows):
                    return
                commands = list(self._commands)
                self._commands.clear()
                aborting, self._abort = self._abort, None
            for fn, future in commands:
                try:
                    future.set_result(fn())
                except Exception as err:  # noqa: BLE001 - handed to the caller
                    future.set_exception(err)
            if aborting is not None:
                self._fail_everything(aborting, self._abort_status)
                continue
            with torch.no_grad():
                self._admit()
                self._drop_cancelled()
                if self._rows:
                    try:
                        self._step()
                    except Exception as err:
                        log.exception("decoding step failed")
                        self._fail_everything(f"decoding failed: {err}", 500)
                    if not self._rows and not self._waiting:
                        # Idle: the cache and the activations are freed; hand the pages back to the OS so
                        # RSS follows (glibc keeps large freed blocks otherwise: +80% after a SmolLM2 soak).
                        release_memory()

    def _fail_everything(self, message: str, status: int) -> None:
        with self._wake:
            waiting = list(self._waiting)
            self._waiting.clear()
        for row in [*waiting, *self._rows]:
            self._finish(row, "error", error=message, status=status)
        self._rows, self._kv = [], BatchKV(self.max_batch)

    def _admit(self) -> None:
        """Move waiting requests into the batch, up to ``prefill_tokens`` prompt tokens (at least one)
        and within the KV-cache budget (the head of the queue waits for room: first come, first served)."""
        group: list[Row] = []
        refused: list[tuple[Row, str]] = []
        budget = self.prefill_tokens
        spans = [row.span(self.max_context) for row in self._rows]
        with self._wake:
            while self._waiting and len(self._rows) + len(group) < self.max_batch:
                head = self._waiting[0]
                if group and len(head.prompt_ids) > budget:
                    break
                span = head.span(self.max_context)
                if not head.cancelled and not self.fits([*spans, span]):
                    if spans:
                        break  # wait for running requests to finish and free their cache
                    need, have = self.kv_bytes([span]) / 2**20, self.kv_budget_bytes / 2**20
                    why = f"this request needs {need:.1f} MiB of key/value cache; the server's budget is {have:.1f} MiB"
                    refused.append((self._waiting.popleft(), why))
                    continue
                self._waiting.popleft()
                budget -= len(head.prompt_ids)
                spans.append(span)
                group.append(head)
        for row, why in refused:
            self._finish(row, "error", error=why, status=400)
        ready = []
        for row in group:
            if row.cancelled:
                self.cancelled_rows += 1
                self._finish(row, "cancelled")
                continue
            try:
                self._prepare(row)
                ready.append(row)
            except Exception as err:  # noqa: BLE001 - reported to this request only
                log.warning("request refused: %s", err)
                self._finish(row, "error", error=str(err), status=getattr(err, "status", 400))
        by_adapter: dict[str | None, list[Row]] = {}
        for row in ready:  # one adapter per prefill batch: its LoRA runs as a plain matmul pair
            by_adapter.setdefault(row.adapter, []).append(row)
        for chunk in (c for rows in by_adapter.values() for c in _similar_lengths(rows)):
            self._prefill_isolating(chunk)

    def _prepare(self, row: Row) -> None:
        if len(row.prompt_ids) >= self.max_context:
            raise ValueError(f"the prompt has {len(row.prompt_ids)} tokens; this model takes at most {self.max_context - 1}")
        if row.adapter is not None:
            if self.registry is not None:
                self.registry.acquire(row.adapter)
                row.acquired = True
            elif row.adapter not in core.state_of(self.model).methods:
                raise ValueError(f"no adapter named {row.adapter!r}")
        if not row.sampling.greedy:
            seed = row.sampling.seed if row.sampling.seed is not None else random.getrandbits(63)
            row.generator = torch.Generator().manual_seed(seed)

    def _prefill_isolating(self, rows: list[Row]) -> None:
        """Prefill ``rows``; when their batch fails, each alone, so only the request at fault fails."""
        try:
            self._prefill(rows)
        except Exception as err:
            if len(rows) > 1:
                for row in rows:
                    self._prefill_isolating([row])
                return
            log.exception("prefill failed")
            self._finish(rows[0], "error", error=f"prefill failed: {err}")

    def _prefill(self, rows: list[Row]) -> None:
        """Run prompts of similar length as one left-padded batch; their states then join the decoding batch.

        Raises only before any row joined (the forward, the cache reservation): the caller may retry.
        """
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
        for i, (row, token) in enumerate(zip(rows, choose(out.logits[:, -1], rows))):
            if self._advance(row, token):
                continue
            start = width - len(row.prompt_ids)
            try:
                self._kv.add([(layer.keys[i : i + 1, :, start:], layer.values[i : i + 1, :, start:]) for layer in cache.layers])
            except Exception as err:
                log.exception("joining the batch failed")
                self._finish(row, "error", error=f"prefill failed: {err}")
                continue
            self._rows.append(row)
        self.max_rows_seen = max(self.max_rows_seen, len(self._rows))
        self.timing["prefill_s"] += time.perf_counter() - began
        self.timing["prefill_positions"] += ids.numel()
        self.timing["prefill_batches"] += 1

    def _drop_cancelled(self) -> None:
        """Rows whose client went away leave before the next step, their cache slots freed."""
        gone = [i for i, row in enumerate(self._rows) if row.cancelled]
        for i in reversed(gone):
            self.cancelled_rows += 1
            self._finish(self._rows[i], "cancelled")
            self._remove(i)

    def _remove(self, i: int, scrub: bool = False) -> None:
        """Drop row ``i`` (the last row moves into its slot, as in the cache)."""
        self._kv.remove(i, scrub=scrub)
        last = self._rows.pop()
        if i < len(self._rows):
            self._rows[i] = last

    def _step(self) -> None:
        began = time.perf_counter()
        self.timing["decode_rows"] += len(self._rows)
        ids = torch.tensor([[row.ids[-1]] for row in self._rows], device=self.device)
        mask, positions = self._kv.step_inputs(self.device)
        with self._routing([row.adapter for row in self._rows]):
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=self._kv, use_cache=True)
        self._kv.advance()
        self.steps += 1
        tokens = choose(out.logits[:, -1], self._rows)
        done = [(i, isinstance(token, Exception)) for i, (row, token) in enumerate(zip(self._rows, tokens))
                if self._advance(row, token)]
        for i, failed in reversed(done):  # highest first: the last row moves into a freed slot
            self._remove(i, scrub=failed)  # a failed row's states may hold NaN: clear them, masked or not
        self.timing["decode_s"] += time.perf_counter() - began

    def _routing(self, adapters: list[str | None]) -> contextlib.AbstractContextManager:
        """Per-row adapters for one forward; names were checked when their requests were admitted."""
        state = getattr(self.model, core.STATE_ATTR, None)
        if state is None:
            return contextlib.nullcontext()
        return core.routing_unchecked(state, adapters)

    def _advance(self, row: Row, token: int | Exception) -> bool:
        """Record a token (or this row's own error), send what text is final; True when the row has finished."""
        if row.cancelled:
            self.cancelled_rows += 1
            self._finish(row, "cancelled")
            return True
        try:
            if isinstance(token, Exception):
                raise token
            out = row.take(token, self.tokenizer, self.eos, self.max_context)
        except Exception as err:  # noqa: BLE001 - this request fails, its batch-mates go on
            log.warning("request failed: %s: %s", type(err).__name__, err)
            self._finish(row, "error", error=f"{type(err).__name__}: {err}", status=getattr(err, "status", 500))
            return True
        if out is None:
            return False
        text, ids, reason = out
        if reason is None:
            self._send(row, Event(text=text, token_ids=ids))
            return False
        self._finish(row, reason, text=text, token_ids=ids)
        return True

    def _send(self, row: Row, event: Event) -> None:
        try:
            row.sink(event)
        except Exception:
            log.warning("dropping a request whose caller no longer listens", exc_info=True)
            row.cancel()

    def _finish(self, row: Row, reason: str, *, text: str = "", token_ids: tuple[int, ...] = (), error: str | None = None,
                status: int = 500) -> None:
        if row.acquired:
            row.acquired = False
            self.registry.release(row.adapter)
        self._send(row, Event(text, token_ids, reason, error, len(row.prompt_ids), len(row.ids), status))


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


def _similar_lengths(rows: list[Row], waste: float = 0.25) -> list[list[Row]]:
    """Split prompts, shortest first, into batches padded by at most ``waste`` of their real tokens."""
    chunks: list[list[Row]] = []
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
