"""Pure ASGI middleware: bearer authentication first, then the request body size limit.

Both run before FastAPI reads or parses a body, so an unauthenticated client cannot make the
worker parse anything (it gets 401 and nothing else, not a 422 describing the schema), and an
oversized body is refused with 413 after at most ``max_bytes`` of it were received.

The body limit also refuses a JSON body that is ambiguous (a key given twice in one object) or
not JSON at all though Python's ``json`` reads it (``NaN``, ``Infinity``): 400 INVALID_PARAMS;
and a body declared as anything but JSON: 415 INVALID_PARAMS.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Collection, Mapping, MutableMapping, Sequence
from typing import Any, Final

from vram_residency._strictjson import unique_keys
from vram_residency.service.auth import BearerCheck

__all__ = ["AuthMiddleware", "BodyLimitMiddleware", "HeadMiddleware", "ambiguous_json"]

log = logging.getLogger("vram_residency.service.auth")

#: Body bytes past the limit that are read and thrown away before the 413 is sent, and for at most
#: how long: a client still sending when the worker answers and closes would otherwise see the
#: connection reset (unread data) instead of the 413. A larger body is cut off at once.
DRAIN_MAX_BYTES: Final = 8 * 1024 * 1024
DRAIN_SECONDS: Final = 5.0

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


async def _discard(receive: Receive, budget: int) -> None:
    """Read and drop the rest of a refused request's body: at most ``budget`` bytes, for at most
    ``DRAIN_SECONDS``."""
    try:
        async with asyncio.timeout(DRAIN_SECONDS):
            while budget > 0:
                message = await receive()
                if message["type"] != "http.request":
                    return  # the client left
                budget -= len(message.get("body", b""))
                if not message.get("more_body", False):
                    return
    except TimeoutError:
        return


#: The methods whose bodies this API reads (the others ignore a body, as FastAPI does).
_BODY_METHODS: Final = frozenset({"POST", "PUT", "PATCH"})


class _Ambiguous(ValueError):
    pass


_unique_keys: Final = unique_keys(lambda key: _Ambiguous(f"duplicate key {key!r} in the JSON body"))


def _no_constant(name: str) -> Any:
    raise _Ambiguous(f"{name} is not a JSON number")


def _is_json(headers: Sequence[tuple[bytes, bytes]]) -> bool:
    """Whether FastAPI will read the body as JSON: a JSON content type (FastAPI's strict content
    type: a body without one is not JSON to it). Every body this API takes is JSON."""
    values = [v for k, v in headers if k == b"content-type"]
    if not values:
        return False
    media = values[0].split(b";", 1)[0].strip().lower()
    return media == b"application/json" or (media.startswith(b"application/") and media.endswith(b"+json"))


def ambiguous_json(body: bytes) -> str | None:
    """Why ``body`` is JSON that two readers could read differently, or None. Two values for one
    key (RFC 8259 leaves the meaning open: Python keeps the last, other parsers the first, so a
    proxy or a signer and the worker could act on different requests), and ``NaN``/``Infinity``,
    which are not JSON. A body that is not JSON at all is left to FastAPI, which says so."""
    try:
        json.loads(body, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except _Ambiguous as exc:
        return str(exc)
    except (ValueError, RecursionError):  # not JSON (or too deep, or too long a number)
        return None
    return None


class AuthMiddleware:
    """401 with the body ``refusal`` (the API's AUTH_FAILED error) for every path outside
    ``public`` without the token."""

    def __init__(
        self, app: ASGIApp, check: BearerCheck, public: Collection[str], refusal: Mapping[str, Any]
    ) -> None:
        self.app = app
        self._check = check
        self._public = frozenset(public)
        self._refusal = dict(refusal)

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
        await _json(send, 401, self._refusal, [(b"www-authenticate", b"Bearer")])


class BodyLimitMiddleware:
    """413 for a declared or received body larger than ``max_bytes`` (``path_max`` may give a
    path its own limit); 400 for an ambiguous JSON body (``ambiguous_json``), 415 for a body
    declared as another type.

    The body is read here, in full, before the app sees it: bodies of this API are small, and an
    error raised from inside the app's own body reading would be turned into a 400 by FastAPI.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, path_max: Mapping[str, int] | None = None) -> None:
        self.app = app
        self._max = max_bytes
        self._path_max = dict(path_max or {})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self._path_max.get(scope.get("path", ""), self._max)
        for k, v in scope.get("headers", ()):
            if k == b"content-length" and (not v.isdigit() or int(v) > limit):
                if v.isdigit() and int(v) - limit <= DRAIN_MAX_BYTES:
                    await _discard(receive, int(v))
                await self._refuse(send, limit)
                return
        chunks: list[bytes] = []
        total = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left; nothing to answer
            body = message.get("body", b"")
            total += len(body)
            if total > limit:
                if message.get("more_body", False):
                    await _discard(receive, DRAIN_MAX_BYTES)
                await self._refuse(send, limit)
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if body and scope.get("method") in _BODY_METHODS:
            # FastAPI would hand a body of another type to the schema as bytes, and answer that
            # it "should be a valid dictionary": say what to send instead (curl -d sends form
            # encoding unless told otherwise).
            status, why = (
                (400, ambiguous_json(body))
                if _is_json(scope.get("headers", ()))
                else (415, "request bodies are JSON: send Content-Type: application/json")
            )
            if why is not None:
                await _json(
                    send,
                    status,
                    {"code": "INVALID_PARAMS", "message": why, "retriable": False, "retry_after_ms": None},
                )
                return
        replay: Message | None = {"type": "http.request", "body": body, "more_body": False}

        async def replay_receive() -> Message:
            nonlocal replay
            if replay is not None:
                message, replay = replay, None
                return message
            return await receive()  # after the body: only http.disconnect can come

        await self.app(scope, replay_receive, send)

    async def _refuse(self, send: Send, limit: int) -> None:
        await _json(
            send,
            413,
            {
                "code": "INVALID_PARAMS",
                "message": f"request body larger than {limit} bytes",
                "retriable": False,
                "retry_after_ms": None,
            },
            [(b"connection", b"close")],
        )


class HeadMiddleware:
    """HEAD wherever GET is answered (RFC 9110, 9.3.2), and ``HEAD`` in a 405's ``Allow`` wherever
    ``GET`` is (15.5.6: Allow lists every supported method). FastAPI's routes take only the methods
    they declare; declaring HEAD on each would put a HEAD operation for each in the OpenAPI schema.

    A HEAD request is served as GET to the app; the server (uvicorn keeps its own scope, where the
    method is still HEAD) sends the headers, Content-Length included, and no body."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope.get("method") == "HEAD":
            scope = {**scope, "method": "GET"}

        async def send_allow(message: Message) -> None:
            if message["type"] == "http.response.start" and message.get("status") == 405:
                headers = []
                for k, v in message.get("headers", ()):
                    if k.lower() == b"allow":
                        methods = [m.strip() for m in v.split(b",")]
                        if b"GET" in methods and b"HEAD" not in methods:
                            v = b", ".join([*methods, b"HEAD"])
                    headers.append((k, v))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_allow)
