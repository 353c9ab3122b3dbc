"""A very small ASGI layer: requests with bounded or streamed bodies, routed by method and
path prefix, answered with bytes or a byte stream. hypercorn's trio worker serves it.

It exists instead of a framework because the node has a dozen endpoints, needs streaming in
both directions and authenticates raw request targets, and every dependency is attack surface.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote

import trio

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


#: The ASGI extension a server offers when it can send a file's bytes itself (sendfile).
ZEROCOPY = "http.response.zerocopysend"
#: Where the last ``http.request`` message of a request with a trailer (``daemon.bulk``)
#: carries it: bytes that follow the body, such as the digest of a body hashed as sent.
TRAILER_KEY = "kelips.trailer"


class HTTPError(Exception):
    """Raised by handlers: becomes a JSON error response with this status; ``detail`` adds
    fields a program needs beside the message (e.g. the version a refusal names)."""

    def __init__(self, status: int, message: str, detail: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.detail = detail or {}


class Request:
    """One HTTP request: method, decoded path, raw target (what is signed), query, headers."""

    def __init__(self, scope: Scope, receive: Receive) -> None:
        self.method: str = scope["method"]
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
        query: bytes = scope.get("query_string", b"")
        self.target = raw_path.decode("latin-1") + ("?" + query.decode("latin-1") if query else "")
        self.path = unquote(raw_path.decode("latin-1"))
        self.query = dict(parse_qsl(query.decode("latin-1"), keep_blank_values=True))
        self.headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                        for k, v in scope.get("headers", [])}
        client = scope.get("client")
        self.client: tuple[str, int] | None = (str(client[0]), int(client[1])) if client else None
        self._receive = receive
        self._consumed = False
        #: Whether the connection can carry a trailer after the body (bulk connections).
        self.trailer_ok = TRAILER_KEY in scope.get("extensions", {})
        #: What followed the body (a bulk request's trailer), once the body has been read.
        self.trailer: bytes | None = None

    async def body(self, limit: int) -> bytes:
        """The whole body, refused with 413 beyond ``limit`` bytes (checked as it arrives)."""
        declared = self.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise HTTPError(413, f"request body over {limit} bytes")
        parts: list[bytes] = []
        size = 0
        async for chunk in self.stream():
            size += len(chunk)
            if size > limit:
                raise HTTPError(413, f"request body over {limit} bytes")
            parts.append(chunk)
        return b"".join(parts)

    async def stream(self) -> AsyncIterator[bytes]:
        if self._consumed:
            return
        self._consumed = True
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                raise HTTPError(499, "client went away")
            chunk = message.get("body", b"")
            if chunk:
                yield chunk
            if not message.get("more_body", False):
                self.trailer = message.get(TRAILER_KEY)
                return

    def arg(self, name: str) -> str:
        value = self.query.get(name)
        if value is None:
            raise HTTPError(400, f"missing query parameter {name!r}")
        return value

    def int_arg(self, name: str, default: int | None = None) -> int:
        if name not in self.query and default is not None:
            return default
        try:
            return int(self.arg(name))
        except ValueError as exc:
            raise HTTPError(400, f"query parameter {name!r} must be an integer") from exc




@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    stream: AsyncIterator[bytes] | None = None
    #: The same bytes as ``stream``, as a range of a file (``content-length`` bytes from
    #: ``file_offset``): sent with sendfile by a server offering ZEROCOPY, else ``stream`` is.
    file: Path | None = None
    file_offset: int = 0

    @classmethod
    def json(cls, doc: object, status: int = 200) -> Response:
        return cls(status, json.dumps(doc).encode(), {"content-type": "application/json"})

    @classmethod
    def text(cls, text: str, status: int = 200, content_type: str = "text/plain") -> Response:
        return cls(status, text.encode(), {"content-type": f"{content_type}; charset=utf-8"})


Handler = Callable[[Request], Awaitable[Response]]


class Router:
    """Routes by (method, path prefix); the longest matching prefix wins."""

    def __init__(self, on_error: Callable[[Request, Exception], None] | None = None,
                 bulk_timeout: float = 30.0) -> None:
        self._routes: list[tuple[str, str, Handler]] = []
        self._on_error = on_error
        #: Seconds a bulk connection (``daemon.bulk``) may stay silent at any step.
        self.bulk_timeout = bulk_timeout

    def add(self, method: str, prefix: str, handler: Handler) -> None:
        self._routes.append((method, prefix, handler))
        self._routes.sort(key=lambda r: -len(r[1]))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        request = Request(scope, receive)
        try:
            response = await self._dispatch(request)
        except HTTPError as exc:
            response = Response.json({**exc.detail, "error": exc.message}, exc.status)
        except Exception as exc:  # a bug must answer 500, not kill the server
            if self._on_error is not None:
                self._on_error(request, exc)
            response = Response.json({"error": f"internal error: {type(exc).__name__}"}, 500)
        await _send(send, response, scope)

    async def _dispatch(self, request: Request) -> Response:
        allowed = False
        for method, prefix, handler in self._routes:
            if request.path == prefix or request.path.startswith(prefix.rstrip("/") + "/") \
                    or (prefix.endswith("/") and request.path.startswith(prefix)):
                if method == request.method:
                    return await handler(request)
                allowed = True
        if allowed:
            raise HTTPError(405, f"{request.method} not allowed on {request.path}")
        raise HTTPError(404, f"no such endpoint {request.path}")


async def _send(send: Send, response: Response, scope: Scope) -> None:
    headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in response.headers.items()]
    if response.file is not None and ZEROCOPY in scope.get("extensions", {}):
        try:
            fh = await trio.to_thread.run_sync(open, response.file, "rb")
        except OSError:
            fh = None  # replaced or dropped since: the stream says what happened
        if fh is not None:
            try:
                await send({"type": "http.response.start", "status": response.status,
                            "headers": headers})
                await send({"type": ZEROCOPY, "file": fh, "offset": response.file_offset,
                            "count": int(response.headers["content-length"])})
            finally:
                fh.close()
            return
    if response.stream is None:
        headers.append((b"content-length", str(len(response.body)).encode()))
        await send({"type": "http.response.start", "status": response.status, "headers": headers})
        await send({"type": "http.response.body", "body": response.body})
        return
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    async for chunk in response.stream:
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": b""})
