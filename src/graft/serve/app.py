"""The HTTP face of the server: OpenAI's completions, chat completions and models endpoints,
and vLLM's adapter load/unload endpoints, over one :class:`~graft.serve.engine.Engine`.

Every error leaves as OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, with a
4xx status for the caller's mistakes; nothing a client sends can stop the engine thread.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from graft.serve.engine import Engine, EngineClosed, Event, Sampling
from graft.serve.registry import AdapterError, AdapterRegistry


@dataclass(frozen=True)
class Limits:
    """What one request may ask for."""

    max_body_bytes: int = 1 << 20
    max_prompt_tokens: int = 4096
    max_tokens: int = 2048
    max_n: int = 8


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def _error_type(status: int) -> str:
    """OpenAI's error type for an HTTP status."""
    return "server_error" if status >= 500 else "not_found_error" if status == 404 else "invalid_request_error"


def error_response(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}}, status_code=status)


# --------------------------------------------------------------------------------------------
# Request bodies (unknown fields are ignored, as OpenAI does; unsupported ones are refused)


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = None
    logprobs: Any = None
    stream_options: dict[str, Any] | None = None
    ignore_eos: bool = False  # vLLM's extension: decode max_tokens tokens whatever the model says


class CompletionBody(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    suffix: str | None = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[ContentPart] | None = None


class ChatBody(_Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


class LoadBody(BaseModel):
    lora_name: str
    lora_path: str


class UnloadBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    lora_name: str


# --------------------------------------------------------------------------------------------
# The app


def create_app(
    engine: Engine,
    registry: AdapterRegistry,
    *,
    api_keys: list[str] | None = None,
    limits: Limits | None = None,
) -> FastAPI:
    """The FastAPI app serving ``engine``; ``api_keys`` empty or ``None`` = no authentication."""
    limits = limits or Limits()
    keys = [k.encode() for k in api_keys or []]
    base = registry.base_name
    app = FastAPI(title="graft serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.registry = engine, registry

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, err: ApiError) -> JSONResponse:
        return error_response(err.status, err.message, err.type, err.param, err.code)

    @app.exception_handler(AdapterError)
    async def _adapter_error(_: Request, err: AdapterError) -> JSONResponse:
        return error_response(err.status, str(err), _error_type(err.status), "lora_name", err.code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        if first.get("type") == "json_invalid":
            return error_response(400, f"the body is not valid JSON: {first.get('msg', '')}", code="invalid_json")
        return error_response(400, f"{where or 'body'}: {first.get('msg', 'invalid')}", param=where or None, code="invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, err: StarletteHTTPException) -> JSONResponse:
        return error_response(err.status_code, str(err.detail), "not_found_error" if err.status_code == 404 else "invalid_request_error")

    @app.exception_handler(Exception)
    async def _crash(_: Request, err: Exception) -> JSONResponse:
        return error_response(500, f"internal error: {type(err).__name__}: {err}", "server_error")

    @app.middleware("http")
    async def _body_limit(request: Request, call_next: Any) -> Any:
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limits.max_body_bytes):
            return error_response(413, f"the request body is larger than {limits.max_body_bytes} bytes", code="body_too_large")
        if request.method == "POST" and length is None:
            body = b""
            async for chunk in request.stream():
                body += chunk
                if len(body) > limits.max_body_bytes:
                    return error_response(413, f"the request body is larger than {limits.max_body_bytes} bytes", code="body_too_large")
            request._body = body  # starlette reads the cached body from here
        return await call_next(request)

    async def authorised(request: Request) -> None:
        if not keys:
            return
        header = request.headers.get("authorization", "")
        token = header[7:].strip().encode() if header[:7].lower() == "bearer " else b""
        ok = False
        for key in keys:  # compare with every key, in constant time each: no early exit to time
            ok |= hmac.compare_digest(token, key)
        if not ok:
            raise ApiError(401, "missing or incorrect API key (send 'Authorization: Bearer KEY')", code="invalid_api_key")

    guarded = [Depends(authorised)]
    app.state.authorised = authorised  # for endpoints added by graft.serve.dispatch

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models", dependencies=guarded)
    async def models() -> dict[str, Any]:
        now = int(time.time())
        data = [{"id": base, "object": "model", "created": now, "owned_by": "graft", "root": base, "parent": None}]
        for name in registry.names():
            data.append({"id": name, "object": "model", "created": now, "owned_by": "graft", "root": str(registry.paths.get(name, "")), "parent": base})
        return {"object": "list", "data": data}

    @app.post("/v1/load_lora_adapter", dependencies=guarded)
    async def load_adapter(body: LoadBody) -> PlainTextResponse:
        await asyncio.wrap_future(engine.call(lambda: registry.load_now(body.lora_name, body.lora_path)))
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter", dependencies=guarded)
    async def unload_adapter(body: UnloadBody) -> PlainTextResponse:
        await asyncio.wrap_future(engine.call(lambda: registry.unregister(body.lora_name)))
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    @app.post("/v1/completions", dependencies=guarded)
    async def completions(body: CompletionBody, request: Request) -> Any:
        if body.echo or body.suffix:
            raise ApiError(400, "echo and suffix are not supported", param="echo" if body.echo else "suffix")
        prompts = _prompt_ids(engine.tokenizer, body.prompt)
        return await _run(request, body, prompts, chat=False)

    @app.post("/v1/chat/completions", dependencies=guarded)
    async def chat_completions(body: ChatBody, request: Request) -> Any:
        messages = []
        for m in body.messages:
            if isinstance(m.content, list):
                if any(p.type != "text" for p in m.content):
                    raise ApiError(400, "only text content parts are supported", param="messages")
                text = "".join(p.text or "" for p in m.content)
            else:
                text = m.content or ""
            messages.append({"role": "system" if m.role == "developer" else m.role, "content": text})
        try:
            ids = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        except Exception as err:
            raise ApiError(400, f"the chat template rejected these messages: {err}", param="messages") from err
        ids = ids["input_ids"] if not isinstance(ids, list) else ids
        if body.max_completion_tokens is not None:
            body = body.model_copy(update={"max_tokens": body.max_completion_tokens})
        return await _run(request, body, [list(ids)], chat=True)

    async def _run(request: Request, body: _Common, prompts: list[list[int]], chat: bool) -> Any:
        adapter = None if body.model == base else body.model
        if adapter is not None and not registry.knows(adapter):
            raise ApiError(404, f"the model {body.model!r} does not exist; served: {[base, *registry.names()]}", "not_found_error", "model", "model_not_found")
        if body.logprobs not in (None, False, 0):
            raise ApiError(400, "logprobs are not supported", param="logprobs")
        if body.n > limits.max_n or body.n * len(prompts) > limits.max_n * 4:
            raise ApiError(400, f"n must be <= {limits.max_n}", param="n")
        max_tokens = body.max_tokens if body.max_tokens is not None else (engine.max_context if chat else 16)
        if body.max_tokens is not None and max_tokens > limits.max_tokens:
            raise ApiError(400, f"max_tokens is {max_tokens}; this server allows at most {limits.max_tokens}", param="max_tokens")
        for ids in prompts:
            if not ids:
                raise ApiError(400, "the prompt is empty", param="prompt")
            longest = min(limits.max_prompt_tokens, engine.max_context - 1)
            if len(ids) > longest:
                raise ApiError(400, f"the prompt has {len(ids)} tokens; this server allows at most {longest}", param="messages" if chat else "prompt", code="context_length_exceeded")
            if body.max_tokens is not None and len(ids) + max_tokens > engine.max_context:
                raise ApiError(400, f"prompt ({len(ids)}) + max_tokens ({max_tokens}) exceeds the context ({engine.max_context})", param="max_tokens", code="context_length_exceeded")
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        try:
            sampling = Sampling(min(max_tokens, limits.max_tokens), body.temperature, body.top_p, stop, body.seed, body.ignore_eos)
        except ValueError as err:
            raise ApiError(400, str(err)) from err

        events: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        mailbox = _Mailbox(asyncio.get_running_loop(), events)
        tickets = []
        try:
            for p, ids in enumerate(prompts):
                for k in range(body.n):
                    index = p * body.n + k
                    seeded = sampling if body.seed is None else dataclasses.replace(sampling, seed=body.seed + k)
                    tickets.append(engine.submit(ids, mailbox.sink(index), adapter, seeded, stream=body.stream))
        except EngineClosed as err:
            for t in tickets:
                t.cancel()
            raise ApiError(503, str(err), "server_error") from err
        reply = _Reply(chat, body.model, len(tickets), sum(len(ids) for ids in prompts) * body.n)
        if body.stream:
            usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(_stream(request, events, reply, tickets, usage), media_type="text/event-stream")
        try:
            while reply.open:
                index, event = await events.get()
                reply.add(index, event)
        except asyncio.CancelledError:
            for t in tickets:
                t.cancel()
            raise
        if reply.error:
            raise ApiError(reply.status, reply.error, _error_type(reply.status),
                           code="model_not_found" if reply.status == 404 else None)
        return reply.body()

    async def _stream(request: Request, events: asyncio.Queue, reply: _Reply, tickets: list, usage: bool) -> AsyncIterator[str]:
        try:
            if reply.chat:
                for i in range(reply.count):
                    yield _sse(reply.chunk(i, {"role": "assistant", "content": ""}, None))
            while reply.open:
                index, event = await events.get()
                reply.add(index, event)
                if event.error:
                    yield _sse({"error": {"message": event.error, "type": "server_error", "param": None, "code": None}})
                elif event.text or event.finish_reason:
                    delta = {"content": event.text} if reply.chat else event.text
                    yield _sse(reply.chunk(index, delta, event.finish_reason))
            if usage:
                yield _sse({**reply.chunk(0, "", None), "choices": [], "usage": reply.usage()})
            yield "data: [DONE]\n\n"
        finally:
            if reply.open:  # the client went away: stop decoding for it
                for t in tickets:
                    t.cancel()

    return app


class _Mailbox:
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


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _prompt_ids(tokenizer: Any, prompt: Any) -> list[list[int]]:
    """OpenAI's four prompt forms: a string, strings, token ids, lists of token ids."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if prompt and all(isinstance(t, int) for t in prompt):
        prompt = [prompt]
    if not prompt:
        raise ApiError(400, "the prompt is empty", param="prompt")
    out = []
    vocab = len(tokenizer)
    for p in prompt:
        if isinstance(p, str):
            out.append(tokenizer(p, add_special_tokens=False)["input_ids"])
        else:
            if any(not 0 <= t < vocab for t in p):
                raise ApiError(400, f"token ids must be in [0, {vocab})", param="prompt")
            out.append(list(p))
    return out


class _Reply:
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
