"""Shutting down without dropping anyone: uvicorn's server with a drain in front of its grace period."""

from __future__ import annotations

from typing import Any

import uvicorn

from graft.serve.engine import Engine

__all__ = ["DrainingServer"]

REPLY_S = 5  # after the drain ended what still ran: time for those error replies to leave before uvicorn cuts


class DrainingServer(uvicorn.Server):
    """A uvicorn server whose shutdown (SIGINT, SIGTERM, ``should_exit``) drains the engine: new
    requests get a 503 at once, those in flight have ``grace_s`` seconds to finish, then each gets
    a JSON error (non-streamed) or an error event and ``[DONE]`` (streamed). uvicorn's own timeout,
    which would cancel them with a plain-text 500 or a cut stream, is set ``REPLY_S`` later.
    """

    def __init__(self, config: uvicorn.Config, engine: Engine, grace_s: float) -> None:
        if grace_s < 0:
            raise ValueError(f"the shutdown grace must be >= 0 seconds, got {grace_s}")
        config.timeout_graceful_shutdown = grace_s + REPLY_S
        super().__init__(config)
        self.engine, self.grace_s = engine, grace_s

    async def shutdown(self, sockets: Any = None) -> None:
        self.engine.drain(self.grace_s)
        await super().shutdown(sockets)
