"""The HTTP face of the server: OpenAI's completions, chat completions and models endpoints,
and vLLM's adapter load/unload endpoints, over one :class:`~graft.serve.engine.Engine`.

Every error leaves as OpenAI's shape (``errors.py``), with a 4xx status for the caller's
mistakes; what a request may say is checked at the edge (``protocol.py``); nothing a client
sends can stop the engine thread or fail another client's request. A client that goes away
has its request cancelled within one decoding step, streamed or not.

Routes come in groups (:func:`openai_routes`, :func:`adapter_routes`), each an ``APIRouter``
with :class:`~graft.serve.errors.GuardedRoute`; more groups plug in the same way:
``app.include_router(router, dependencies=app.state.guarded)``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import PlainTextResponse, StreamingResponse

from graft.data import promptformat
from graft.serve.engine import Engine, EngineBusy, EngineClosed
from graft.serve.errors import (
    ApiError,
    BodyGuard,
    GuardedRoute,
    error_response,
    error_type,
    install_error_handlers,
)
from graft.serve.protocol import (
    ChatBody,
    CompletionBody,
    Limits,
    LoadBody,
    UnloadBody,
    chat_messages,
    prompt_ids,
    sampling_for,
)
from graft.serve.registry import AdapterRegistry
from graft.serve.replies import Mailbox, Reply, sse
from graft.serve.sampling import SEED_RANGE

__all__ = ["ApiError", "Limits", "adapter_routes", "create_app", "error_response", "openai_routes"]


def create_app(
    engine: Engine,
    registry: AdapterRegistry,
    *,
    api_keys: list[str] | None = None,
    limits: Limits | None = None,
    expose_paths: bool = False,
) -> FastAPI:
    """The FastAPI app serving ``engine``; ``api_keys`` empty or ``None`` = no authentication.

    ``expose_paths`` lists each adapter's server path in ``GET /v1/models`` (``root``), as vLLM
    does; off by default, since it tells every key holder the server's directory layout.
    """
    limits = limits or Limits()
    app = FastAPI(title="graft serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.router.route_class = GuardedRoute
    app.state.engine, app.state.registry, app.state.limits = engine, registry, limits
    install_error_handlers(app)
    app.add_middleware(BodyGuard, max_bytes=limits.max_body_bytes)
    app.state.guarded = [Depends(bearer_auth(api_keys or []))]

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    app.include_router(openai_routes(engine, registry, limits, expose_paths), dependencies=app.state.guarded)
    app.include_router(adapter_routes(engine, registry), dependencies=app.state.guarded)
    return app


def bearer_auth(api_keys: list[str]) -> Any:
    """A dependency checking ``Authorization: Bearer KEY`` against every key (none: open server)."""
    keys = [k.encode() for k in api_keys]

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

    return authorised


def adapter_routes(engine: Engine, registry: AdapterRegistry) -> APIRouter:
    """vLLM's ``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter``."""
    router = APIRouter(route_class=GuardedRoute)

    @router.post("/v1/load_lora_adapter")
    async def load_adapter(body: LoadBody) -> PlainTextResponse:
        await asyncio.wrap_future(engine.call(lambda: registry.load_now(body.lora_name, body.lora_path)))
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @router.post("/v1/unload_lora_adapter")
    async def unload_adapter(body: UnloadBody) -> PlainTextResponse:
        await asyncio.wrap_future(engine.call(lambda: registry.unregister(body.lora_name)))
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    return router


def openai_routes(engine: Engine, registry: AdapterRegistry, limits: Limits, expose_paths: bool = False) -> APIRouter:
    """``/v1/models``, ``/v1/completions`` and ``/v1/chat/completions``."""
    router = APIRouter(route_class=GuardedRoute)
    base = registry.base_name

    @router.get("/v1/models")
    async def models() -> dict[str, Any]:
        now = int(time.time())
        data = [{"id": base, "object": "model", "created": now, "owned_by": "graft", "root": base, "parent": None}]
        for name in registry.names():
            root = str(registry.paths.get(name, "")) if expose_paths else name
            data.append({"id": name, "object": "model", "created": now, "owned_by": "graft", "root": root, "parent": base})
        return {"object": "list", "data": data}

    @router.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request) -> Any:
        if body.echo or body.suffix:
            raise ApiError(400, "echo and suffix are not supported", param="echo" if body.echo else "suffix")
        return await run(engine, registry, limits, request, body, prompt_ids(engine.tokenizer, body.prompt), chat=False)

    @router.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody, request: Request) -> Any:
        messages = chat_messages(body)
        # An adapter that saved its training format (graft_format.json) gets its prompts rendered that way.
        fmt = promptformat.read_cached(registry.paths.get(body.model)) if body.model != base else None
        if fmt is not None:
            try:
                ids = fmt.messages_ids(engine.tokenizer, messages)
            except ValueError as err:
                raise ApiError(400, f"adapter {body.model!r}: {err}", param="messages") from err
        else:
            try:
                ids = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            except Exception as err:
                raise ApiError(400, f"the chat template rejected these messages: {err}", param="messages") from err
            ids = ids["input_ids"] if not isinstance(ids, list) else ids
        if body.max_completion_tokens is not None:
            body = body.model_copy(update={"max_tokens": body.max_completion_tokens})
        return await run(engine, registry, limits, request, body, [list(ids)], chat=True)

    return router


async def run(engine: Engine, registry: AdapterRegistry, limits: Limits, request: Request, body: Any,
              prompts: list[list[int]], chat: bool) -> Any:
    """Submit every choice of one request and answer with its reply, streamed or whole."""
    adapter = None if body.model == registry.base_name else body.model
    if adapter is not None and not registry.knows(adapter):
        served = [registry.base_name, *registry.names()]
        raise ApiError(404, f"the model {body.model!r} does not exist; served: {served}", param="model", code="model_not_found")
    sampling = sampling_for(body, prompts, limits, engine.max_context, chat, fits=lambda span: engine.fits([span]))
    events: asyncio.Queue = asyncio.Queue()
    mailbox = Mailbox(asyncio.get_running_loop(), events)
    tickets = []
    try:
        for p, ids in enumerate(prompts):
            for k in range(body.n):
                seeded = sampling if body.seed is None else dataclasses.replace(sampling, seed=_nth_seed(body.seed, k))
                tickets.append(engine.submit(ids, mailbox.sink(p * body.n + k), adapter, seeded, stream=body.stream))
    except (EngineClosed, EngineBusy) as err:
        for t in tickets:
            t.cancel()
        raise ApiError(err.status, str(err), code="server_busy" if err.status == 429 else "shutting_down") from err
    reply = Reply(chat, body.model, len(tickets), sum(len(ids) for ids in prompts) * body.n)
    if body.stream:
        usage = bool((body.stream_options or {}).get("include_usage"))
        return StreamingResponse(stream(events, reply, tickets, usage), media_type="text/event-stream")
    if not await _collect(request, events, reply, tickets):
        return error_response(499, "the client closed the request", code="client_closed_request")  # nobody reads it
    if reply.error:
        raise ApiError(reply.status, reply.error, error_type(reply.status),
                       code="model_not_found" if reply.status == 404 else None)
    return reply.body()


def _nth_seed(seed: int, k: int) -> int:
    """Choice ``k``'s seed: ``seed + k``, wrapped into the 64-bit range."""
    low, high = SEED_RANGE
    return (seed + k - low) % (high - low + 1) + low


async def _collect(request: Request, events: asyncio.Queue, reply: Reply, tickets: list) -> bool:
    """Wait for every choice's events; False (the choices cancelled) when the client disconnects first."""
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        while reply.open:
            getter = asyncio.ensure_future(events.get())
            done, _ = await asyncio.wait({getter, gone}, return_when=asyncio.FIRST_COMPLETED)
            if getter not in done:
                getter.cancel()
                for t in tickets:
                    t.cancel()
                return False
            reply.add(*getter.result())
        return True
    except asyncio.CancelledError:
        for t in tickets:
            t.cancel()
        raise
    finally:
        gone.cancel()


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone (the body was read already: the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def stream(events: asyncio.Queue, reply: Reply, tickets: list, usage: bool) -> AsyncIterator[str]:
    """Server-sent events; an error (the request's own, or the server's shutdown) is an error event,
    and the stream still ends with ``[DONE]``."""
    try:
        if reply.chat:
            for i in range(reply.count):
                yield sse(reply.chunk(i, {"role": "assistant", "content": ""}, None))
        while reply.open:
            index, event = await events.get()
            reply.add(index, event)
            if event.error:
                yield sse({"error": {"message": event.error, "type": error_type(event.status), "param": None,
                                     "code": None}})
            elif event.text or event.finish_reason:
                delta = {"content": event.text} if reply.chat else event.text
                yield sse(reply.chunk(index, delta, event.finish_reason))
        if usage:
            yield sse({**reply.chunk(0, "", None), "choices": [], "usage": reply.usage()})
        yield "data: [DONE]\n\n"
    finally:
        if reply.open:  # the client went away: stop decoding for it
            for t in tickets:
                t.cancel()
