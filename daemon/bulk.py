"""Bulk transfers: the node's HTTP API in a lighter framing, on the same TCP port.

Why: objects of hundreds of MiB cross two or three processes on their way (client, the node it
asked, the holders), and through h11 every byte is copied three more times in Python (into
its receive buffer, out of it, into ``bytes``) and every 64 KiB costs an event and an ASGI
message on each side. That held a 256 MiB put or get to a fraction of a local ``cp``. A bulk
connection carries the same request (method, signed target, the same headers, so the same
HMAC check) and the same response (status, headers), but the body is raw bytes, read with
``receive_some`` of up to 1 MiB straight into the handler: one copy from the kernel.

Framing (one request per connection, unless the client asks to keep it for its next small
call: ``daemon.bulk_calls``)::

    client -> node:  b"KBLK" | u32 big-endian length | JSON {"method", "target", "headers",
                     optional "trailer": n} | exactly content-length body bytes | n bytes
    node -> client:  u32 length | JSON {"status", "headers"} | the body: content-length bytes
                     (until the connection closes when a response declares none)

The optional trailer carries what is known only once the body has been sent: an upload
hashed while it is read sends its digest there (``security.Authenticator.sign_trailer``),
so nothing has to read a large file once to hash it and again to send it. The server hands
it to the application in the last ``http.request`` message, under ``TRAILER_KEY``.

A response that ends short of its content-length is a failed transfer, as with HTTP. The server
side is an ASGI server for the node's ``Router`` (``serve_connection``); ``daemon.api`` hands it
every TCP connection whose first four bytes are the magic (peeked, not consumed), and every
other one to hypercorn. The client side (``request``) is what ``PeerClient.stream`` uses for
large bodies; it sends the body while it waits for the answer, so an early refusal (401, 413,
507) stops the upload at once instead of after hundreds of MiB. A body that is a file already
on disk (``FileBody``: the CLI's put, a mount's or a repair's copy) goes out with sendfile(2),
as downloads do: the bytes never pass through Python.
"""

from __future__ import annotations

import errno
import json
import os
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import trio

from daemon.asgi import TRAILER_KEY, ZEROCOPY

MAGIC = b"KBLK"
#: Largest head (request or response line and headers, as JSON) accepted.
HEAD_MAX = 64 * 1024
#: Largest trailer accepted after a request's body.
TRAILER_MAX = 1024
#: Largest single receive: the size of the chunks handed to handlers and callers.
RECV_BLOCK = 1 << 20
#: Most bytes one sendfile(2) call may send.
SENDFILE_BLOCK = 1 << 20
#: How long a kept connection may wait for its next request before the server closes it.
IDLE_SECONDS = 30.0
#: After an early answer, how long the server keeps reading what the client still sends,
#: so closing does not reset the connection before the client has read the answer.
DRAIN_SECONDS = 2.0

_LENGTH = struct.Struct(">I")
#: sendfile(2) errors that are the connection's, not the file's.
_SOCKET_ERRNOS = frozenset({errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.ECONNABORTED,
                            errno.ETIMEDOUT, errno.EHOSTUNREACH, errno.ENETUNREACH})
ASGIApp = Callable[[dict[str, Any], Callable[[], Awaitable[dict[str, Any]]],
                    Callable[[dict[str, Any]], Awaitable[None]]], Awaitable[None]]


class BulkError(Exception):
    """The bulk exchange failed: the peer broke the framing, went away or was too slow."""


@dataclass(frozen=True)
class FileBody:
    """A request body sent from an open file, from ``offset``, with sendfile(2).

    Why: an upload of a file already on disk read through Python costs a thread hop and a copy
    into a ``bytes`` per MiB and a copy into the socket; sendfile hands the page cache's pages
    to the socket (measured on a 256 MiB put: the client's CPU went from ~0.29 to ~0.13 core-s).
    ``on_sent`` (e.g. a progress bar) is told how many bytes each call sent. A file that ends
    before the announced length fails the request (``BulkError``).
    """

    fd: int
    offset: int = 0
    on_sent: Callable[[int], None] | None = None


class Reader:
    """Reads a head out of a stream; bytes received past it are the start of the body."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self.stream = stream
        self.buffer = bytearray()

    async def exactly(self, count: int) -> bytes:
        while len(self.buffer) < count:
            chunk = await self.stream.receive_some(max(RECV_BLOCK, count - len(self.buffer)))
            if not chunk:
                raise BulkError(f"connection closed after {len(self.buffer)} of {count} bytes")
            self.buffer += chunk
        out = bytes(self.buffer[:count])
        del self.buffer[:count]
        return out

    async def head(self) -> dict[str, Any]:
        (length,) = _LENGTH.unpack(await self.exactly(_LENGTH.size))
        if length > HEAD_MAX:
            raise BulkError(f"head of {length} bytes over the {HEAD_MAX} limit")
        try:
            doc = json.loads(await self.exactly(length))
        except ValueError as exc:
            raise BulkError(f"head is not JSON: {exc}") from exc
        if not isinstance(doc, dict):
            raise BulkError("head is not a JSON object")
        return doc

    async def more(self) -> bool:
        """Wait for more bytes (False: the connection was closed)."""
        chunk = await self.stream.receive_some(RECV_BLOCK)
        self.buffer += chunk
        return bool(chunk)

    def leftover(self, limit: int | None = None) -> bytes:
        """What was received past the head (at most ``limit`` bytes; the rest stays)."""
        out = bytes(self.buffer[:limit])
        del self.buffer[:limit]
        return out


def frame(doc: Mapping[str, Any]) -> bytes:
    payload = json.dumps(doc, separators=(",", ":")).encode()
    return _LENGTH.pack(len(payload)) + payload


def parse_headers(value: object) -> dict[str, str]:
    if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise BulkError("headers must be an object of strings")
    return {k.lower(): v for k, v in value.items()}


def declared_length(headers: Mapping[str, str]) -> int | None:
    declared = headers.get("content-length")
    if declared is None:
        return None
    if not declared.isdigit():
        raise BulkError(f"bad content-length {declared[:40]!r}")
    return int(declared)


# --- the server side ------------------------------------------------------------------------

async def serve_connection(stream: trio.abc.Stream, app: ASGIApp,
                           client: tuple[str, int] | None, timeout: float) -> None:
    """Serve the requests of a bulk connection with ``app``, then close it: one, or several
    in turn when the client asks to keep the connection (``"keep": true`` in its head) and
    every answer has a content-length; it is closed after ``IDLE_SECONDS`` without one."""
    reader = Reader(stream)
    try:
        keep = await _serve(stream, reader, app, client, timeout)
        while keep:
            with trio.move_on_after(IDLE_SECONDS):
                if not await reader.more():
                    return  # the client closed it
            if not reader.buffer:
                return  # idle too long
            keep = await _serve(stream, reader, app, client, timeout)
    except (BulkError, trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError,
            OSError):
        pass  # a broken or malformed exchange only ends this connection
    finally:
        await stream.aclose()


async def _serve(stream: trio.abc.Stream, reader: Reader, app: ASGIApp,
                 client: tuple[str, int] | None, timeout: float) -> bool:
    """Serve one request; whether the connection may carry another."""
    with trio.fail_after(timeout):
        if await reader.exactly(len(MAGIC)) != MAGIC:
            raise BulkError("not a bulk connection")
        head = await reader.head()
    method, target = head.get("method"), head.get("target")
    if not isinstance(method, str) or not isinstance(target, str) or not target.startswith("/"):
        raise BulkError("head needs a method and a target")
    headers = parse_headers(head.get("headers", {}))
    remaining = declared_length(headers) or 0
    trailer_size = head.get("trailer", 0)
    if type(trailer_size) is not int or not 0 <= trailer_size <= TRAILER_MAX:
        raise BulkError(f"bad trailer size {str(trailer_size)[:40]!r}")
    path, _, query = target.partition("?")
    scope: dict[str, Any] = {
        "type": "http", "http_version": "1.1", "scheme": "http", "method": method.upper(),
        "path": unquote(path), "raw_path": path.encode("latin-1"),
        "query_string": query.encode("latin-1"), "client": client,
        "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]}
    pending = reader.leftover(remaining)  # (the start of a trailer stays in the reader)

    async def receive() -> dict[str, Any]:
        nonlocal remaining, pending, trailer_size
        if remaining <= 0 and not trailer_size:
            return {"type": "http.request", "body": b"", "more_body": False}
        chunk = b""
        if pending:
            chunk, pending = pending, b""
        elif remaining > 0:
            with trio.fail_after(timeout):
                chunk = bytes(await stream.receive_some(min(RECV_BLOCK, remaining)))
            if not chunk:
                return {"type": "http.disconnect"}
        remaining -= len(chunk)
        if remaining > 0:
            return {"type": "http.request", "body": chunk, "more_body": True}
        message: dict[str, Any] = {"type": "http.request", "body": chunk, "more_body": False}
        if trailer_size:
            size, trailer_size = trailer_size, 0
            try:
                with trio.fail_after(timeout):
                    message[TRAILER_KEY] = await reader.exactly(size)
            except BulkError:
                return {"type": "http.disconnect"}
        return message

    answer: dict[str, Any] = {}
    scope["extensions"] = {TRAILER_KEY: {}}
    if isinstance(stream, trio.SocketStream):
        scope["extensions"][ZEROCOPY] = {}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            answer["status"] = message["status"]
            answer["headers"] = {k.decode("latin-1"): v.decode("latin-1")
                                 for k, v in message.get("headers", [])}
            return
        if message["type"] not in ("http.response.body", ZEROCOPY):
            return
        data = message.get("body", b"")
        if "sent" not in answer:
            answer["sent"] = True
            framed: dict[str, Any] = {"status": answer.get("status", 500),
                                      "headers": answer.get("headers", {})}
            if keep_asked and "content-length" in framed["headers"]:
                framed["keep"] = answer["keep"] = True
            data = frame(framed) + data
        if data:
            with trio.fail_after(timeout):
                await stream.send_all(data)
        if message["type"] == ZEROCOPY:
            assert isinstance(stream, trio.SocketStream)
            await _sendfile(stream.socket, message["file"].fileno(), message.get("offset", 0),
                            message["count"], timeout)

    keep_asked = head.get("keep") is True
    await app(scope, receive, send)
    if remaining > 0:  # answered before reading the whole body: let the client read that
        with trio.move_on_after(DRAIN_SECONDS):
            while remaining > 0 and await stream.receive_some(RECV_BLOCK):
                pass
        return False
    return bool(answer.get("keep")) and not trailer_size and not pending


async def _sendfile(sock: trio.socket.SocketType, fd: int, offset: int, count: int,
                    timeout: float, on_sent: Callable[[int], None] | None = None) -> None:
    """Send ``count`` bytes of ``fd`` from ``offset`` with sendfile(2): no copy through Python.

    In the event loop itself, SENDFILE_BLOCK bytes at most per call on the non-blocking
    socket: from the page cache that is a few hundred microseconds; a file not in the page
    cache is read from disk inside the call, which bounds the stall to one block's read
    (~1 ms at this machine's 1-2 GB/s; ~10 ms on a spinning disk), well inside a gossip
    period. A worker thread per call was tried and halved the throughput (a thread hop for
    every socket buffer's worth).
    """
    while count > 0:
        with trio.fail_after(timeout):
            await trio.lowlevel.wait_writable(sock)
        try:
            sent = os.sendfile(sock.fileno(), fd, offset, min(count, SENDFILE_BLOCK))
        except BlockingIOError:
            continue
        except OSError as exc:
            if exc.errno in _SOCKET_ERRNOS:
                raise  # the peer went away: the caller's usual connection error
            raise BulkError(f"cannot read the file to send it: "
                            f"{exc.strerror or exc}") from exc
        if sent == 0:
            raise BulkError(f"the file ended {count} bytes short of what was announced")
        offset += sent
        count -= sent
        if on_sent is not None:
            on_sent(sent)


# --- the client side ------------------------------------------------------------------------

class BulkResponse:
    """What ``request`` yields: the parts of an httpx response the data plane uses."""

    def __init__(self, status: int, headers: dict[str, str], reader: Reader,
                 timeout: float) -> None:
        self.status_code = status
        self.headers = headers
        self._reader = reader
        self._timeout = timeout
        self._length = declared_length(headers)

    async def aiter_bytes(self, chunk_size: int | None = None) -> AsyncIterator[bytes]:
        """The body as it arrives, in chunks of up to ``RECV_BLOCK`` (``chunk_size`` is only a
        hint: chunks are never merged, which would cost a copy); BulkError if it ends short."""
        left = self._length
        first = self._reader.leftover()
        if first:
            if left is not None:
                first = first[:left]
                left -= len(first)
            yield first
        while left is None or left > 0:
            try:
                with trio.fail_after(self._timeout):
                    chunk = await self._reader.stream.receive_some(
                        RECV_BLOCK if left is None else min(RECV_BLOCK, left))
            except (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError,
                    OSError) as exc:
                raise BulkError(f"the body stopped: {type(exc).__name__}") from exc
            if not chunk:
                if left is None:
                    return
                raise BulkError(f"the body ended {left} bytes short")
            if left is not None:
                left -= len(chunk)
            yield bytes(chunk)  # already bytes from a socket: no copy

    async def aread(self) -> bytes:
        return b"".join([chunk async for chunk in self.aiter_bytes()])


@asynccontextmanager
async def request(address: tuple[str, int], method: str, target: str,
                  headers: Mapping[str, str], body: AsyncIterator[bytes] | FileBody | None,
                  content_length: int, timeout: float,
                  trailer: tuple[int, Callable[[], Awaitable[bytes]]] | None = None,
                  connect_timeout: float | None = None) -> AsyncIterator[BulkResponse]:
    """One bulk request; yields the response once its head has arrived.

    The body (exactly ``content_length`` bytes, from an iterator or a ``FileBody``) is sent
    while the answer is awaited: a server that answers before the end (a refusal) stops the
    upload. ``trailer`` (its size, and what makes it, awaited once the whole body is sent)
    follows the body; if making it raises, the connection is closed without it and the error
    propagates: the server sees an unfinished request and keeps nothing.
    ``connect_timeout`` (default ``timeout``) bounds the connect alone: a caller with
    somewhere else to go (another holder, the node it asked) need not wait long for an address
    it cannot reach.
    """
    try:
        with trio.fail_after(timeout if connect_timeout is None else connect_timeout):
            stream = await trio.open_tcp_stream(*address)
    except (OSError, trio.TooSlowError) as exc:
        raise BulkError(f"cannot connect: {type(exc).__name__}") from exc
    async with stream:
        doc: dict[str, Any] = {"method": method, "target": target,
                               "headers": {**headers, "content-length": str(content_length)}}
        if trailer is not None:
            doc["trailer"] = trailer[0]
        reader = Reader(stream)
        sent: list[BaseException] = []

        async def send(data: bytes | FileBody) -> bool:
            try:
                if isinstance(data, FileBody):
                    await _sendfile(stream.socket, data.fd, data.offset, content_length,
                                    timeout, data.on_sent)
                    return True
                with trio.fail_after(timeout):
                    await stream.send_all(data)
                return True
            except (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError,
                    OSError) as exc:
                sent.append(exc)  # the answer (if any) says why; else this is the error
                return False

        async def send_body() -> None:
            # Errors of ``body`` itself (the caller's source) propagate unchanged.
            if not await send(MAGIC + frame(doc)):
                return
            count = 0
            if isinstance(body, FileBody):
                if not await send(body):
                    return
                count = content_length  # (_sendfile raised BulkError if the file ended short)
            elif body is not None:
                async for chunk in body:
                    count += len(chunk)
                    if count > content_length:
                        raise BulkError(f"body longer than the {content_length} bytes announced")
                    if not await send(chunk):
                        return
            if count != content_length:
                raise BulkError(f"body of {count} bytes, {content_length} announced")
            if trailer is not None:
                data = await trailer[1]()
                if len(data) != trailer[0]:
                    raise BulkError(f"trailer of {len(data)} bytes, {trailer[0]} announced")
                await send(data)

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(send_body)
                try:
                    with trio.fail_after(timeout if body is None else timeout * 4):
                        head = await reader.head()
                except (BulkError, trio.TooSlowError, trio.BrokenResourceError, OSError) as exc:
                    reason = sent[0] if sent else exc
                    raise BulkError(f"no answer: {type(reason).__name__}: {reason}") from exc
                nursery.cancel_scope.cancel()  # answered: nothing more to send
        except BaseExceptionGroup as group:  # strict groups: unwrap the one real error
            raise group.exceptions[0] from None
        status = head.get("status")
        if not isinstance(status, int):
            raise BulkError("answer without a status")
        yield BulkResponse(status, parse_headers(head.get("headers", {})), reader, timeout)
