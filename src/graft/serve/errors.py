"""Every failure leaves the server as OpenAI's error shape, and none closes the connection.

``{"error": {"message", "type", "param", "code"}}`` with a 4xx status for the caller's mistakes
and a JSON 500 for the server's. Starlette answers an unhandled exception with a plain-text 500
and then re-raises it, which makes uvicorn drop the connection (the client's next request on it
fails); :class:`GuardedRoute` turns such exceptions into JSON inside the route instead.
:class:`BodyGuard` refuses oversized bodies and bodies that are not JSON before any parsing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from graft.serve.registry import AdapterError

log = logging.getLogger("graft.serve")

__all__ = ["ApiError", "BodyGuard", "GuardedRoute", "error_response", "error_type", "install_error_handlers"]


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str | None = None, param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_ or error_type(status)


def error_type(status: int) -> str:
    """OpenAI's error type for an HTTP status."""
    return "server_error" if status >= 500 else "not_found_error" if status == 404 else "invalid_request_error"


def error_response(status: int, message: str, type_: str | None = None, param: str | None = None,
                   code: str | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type_ or error_type(status), "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, err: ApiError) -> JSONResponse:
        return error_response(err.status, err.message, err.type, err.param, err.code)

    @app.exception_handler(AdapterError)
    async def _adapter_error(_: Request, err: AdapterError) -> JSONResponse:
        return error_response(err.status, str(err), error_type(err.status), "lora_name", err.code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {}
        if first.get("type") == "json_invalid":
            return error_response(400, f"the body is not valid JSON: {first.get('msg', '')}", code="invalid_json")
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        where = ".".join(loc)
        param = (first.get("ctx") or {}).get("param") or (loc[0] if loc else None)  # the top-level field
        message = first.get("msg", "invalid")
        if not where and first.get("type") == "model_attributes_type":
            message = "the body must be a JSON object"
        return error_response(400, f"{where or param or 'body'}: {message}", param=param, code="invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, err: StarletteHTTPException) -> JSONResponse:
        return error_response(err.status_code, str(err.detail))


HANDLED = (ApiError, AdapterError, RequestValidationError, StarletteHTTPException)


class GuardedRoute(APIRoute):
    """A route whose unexpected exceptions become a JSON 500 on a connection that stays open."""

    def get_route_handler(self) -> Callable[[Request], Any]:
        handler = super().get_route_handler()

        async def guarded(request: Request) -> Any:
            try:
                return await handler(request)
            except HANDLED:
                raise
            except Exception as err:
                log.exception("%s %s failed", request.method, request.url.path)
                return error_response(500, f"internal error: {type(err).__name__}: {err}")

        return guarded


class BodyGuard:
    """ASGI middleware: bodies over ``max_bytes`` get a 413 (also when sent chunked, counted while read),
    POST bodies with a content type other than JSON a 415. Pure ASGI, so the route still receives
    the client's disconnect."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        refusal = self._refusal(headers)
        if refusal is None and "content-length" not in headers:
            body, more = b"", True
            while more:  # read it all now, counting: the app would buffer it anyway
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                body += message.get("body", b"")
                more = message.get("more_body", False)
                if len(body) > self.max_bytes:
                    refusal = self._too_large()
                    break
            if refusal is None:
                receive = _replay(body, receive)
        if refusal is not None:
            return await refusal(scope, receive, send)
        return await self.app(scope, receive, send)

    def _refusal(self, headers: dict[str, str]) -> JSONResponse | None:
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return self._too_large()
        kind = headers.get("content-type", "").split(";")[0].strip().lower()
        if kind and kind != "application/json" and not kind.endswith("+json"):
            return error_response(415, f"the body must be JSON sent with 'Content-Type: application/json', got {kind!r}",
                                  code="unsupported_media_type")
        return None

    def _too_large(self) -> JSONResponse:
        return error_response(413, f"the request body is larger than {self.max_bytes} bytes", code="body_too_large")


def _replay(body: bytes, receive: Callable) -> Callable:
    sent = False

    async def replay() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # then the client's disconnect, as the server reports it

    return replay
