"""Pure ASGI middleware: bearer authentication first, then the request body size limit.

Both run before FastAPI reads or parses a body, so an unauthenticated client cannot make the
worker parse anything (it gets 401 and nothing else, not a 422 describing the schema), and an
oversized body is refused with 413 after at most ``max_bytes`` of it were received.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Collection, MutableMapping, Sequence
from typing import Any

from vram_residency.service.auth import BearerCheck

__all__ = ["AuthMiddleware", "BodyLimitMiddleware"]

log = logging.getLogger("vram_residency.service.auth")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


async def _json(
    send: Send, status: int, body: dict[str, Any], headers: Sequence[tuple[bytes, bytes]] = ()
) -> None:
    raw = json.dumps(body, separators=(",", ":")).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(raw)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": raw})


class AuthMiddleware:
    """401 ``{"code": "AUTH_FAILED"}`` for every path outside ``public`` without the token."""

    def __init__(self, app: ASGIApp, check: BearerCheck, public: Collection[str]) -> None:
        self.app = app
        self._check = check
        self._public = frozenset(public)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in self._public:
            await self.app(scope, receive, send)
            return
        values = [v for k, v in scope.get("headers", ()) if k == b"authorization"]
        # Exactly one Authorization header: two could be read differently by a proxy and by us.
        if len(values) == 1 and self._check.check_header(values[0]):
            # The breadcrumb of every authenticated request: which token (fp6), never the token.
            log.info(
                "authenticated %s %s",
                scope.get("method", ""),
                scope.get("path", ""),
                extra={"fp6": self._check.fp6},
            )
            await self.app(scope, receive, send)
            return
        await _json(send, 401, {"code": "AUTH_FAILED"}, [(b"www-authenticate", b"Bearer")])


class BodyLimitMiddleware:
    """413 for a declared or received body larger than ``max_bytes``.

    The body is read here, in full, before the app sees it: bodies of this API are small, and an
    error raised from inside the app's own body reading would be turned into a 400 by FastAPI.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self._max = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for k, v in scope.get("headers", ()):
            if k == b"content-length" and (not v.isdigit() or int(v) > self._max):
                await self._refuse(send)
                return
        chunks: list[bytes] = []
        total = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left; nothing to answer
            body = message.get("body", b"")
            total += len(body)
            if total > self._max:
                await self._refuse(send)
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replay: Message | None = {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        async def replay_receive() -> Message:
            nonlocal replay
            if replay is not None:
                message, replay = replay, None
                return message
            return await receive()  # after the body: only http.disconnect can come

        await self.app(scope, replay_receive, send)

    async def _refuse(self, send: Send) -> None:
        await _json(
            send,
            413,
            {
                "code": "INVALID_PARAMS",
                "message": f"request body larger than {self._max} bytes",
                "retriable": False,
                "retry_after_ms": None,
            },
            [(b"connection", b"close")],
        )
