"""Small calls between nodes over kept bulk connections.

Why: a namespace operation on a cluster of several nodes is a few small JSON calls (to the
inode's primary, from it to the other holders), and through an HTTP client and server library
each costs a connection pool's and h11's bookkeeping on both sides, more than the work it asks
for. The same signed request goes instead over a bulk connection (``daemon.bulk``: a JSON head
and raw bytes) that stays open for the next call to that node, so a call is one write and one
read on each side.

A connection carries one call at a time; idle ones are kept per address (at most
``IDLE_PER_PEER``, for at most ``IDLE_KEEP`` seconds, well within the server's
``bulk.IDLE_SECONDS``). A kept connection found closed before any byte of the answer came is
dropped and the call made once more on a new one (the server had closed it while idle); any
other failure is the call's, and the connection is closed.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import trio

from daemon.bulk import MAGIC, BulkError, Reader, declared_length, frame, parse_headers

#: Idle connections kept per peer address.
IDLE_PER_PEER = 8
#: Seconds an idle connection is kept for reuse.
IDLE_KEEP = 10.0
#: Largest body sent in one piece with its head (a larger one goes in a send of its own).
SEND_JOINED = 64 << 10

Address = tuple[str, int]


@dataclass
class _Connection:
    stream: trio.SocketStream
    reader: Reader
    idle_since: float = field(default_factory=time.monotonic)


class _Stale(Exception):
    """A kept connection turned out closed before the answer began."""


class CallPool:
    """Kept bulk connections to other nodes, one call at a time on each."""

    def __init__(self, timeout: float) -> None:
        self._timeout = timeout
        self._idle: dict[Address, list[_Connection]] = {}

    async def call(self, address: Address, method: str, target: str,
                   headers: Mapping[str, str], body: bytes,
                   connect_timeout: float | None = None) -> tuple[int, dict[str, str], bytes]:
        """(status, headers, body) of one call; BulkError if it could not be made."""
        for _ in range(2):
            conn = self._take(address)
            fresh = conn is None
            if conn is None:
                conn = await self._connect(address, connect_timeout)
            try:
                status, answer, data, keep = await self._exchange(conn, method, target,
                                                                  headers, body, fresh)
            except _Stale:
                continue
            if keep:
                self._give(address, conn)
            else:
                await _close(conn)
            return status, answer, data
        raise BulkError("kept connections kept closing")

    async def aclose(self) -> None:
        idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                await _close(conn)

    def _take(self, address: Address) -> _Connection | None:
        conns = self._idle.get(address)
        now = time.monotonic()
        while conns:
            conn = conns.pop()
            if now - conn.idle_since < IDLE_KEEP and not conn.reader.buffer:
                return conn
            conn.stream.socket.close()
        return None

    def _give(self, address: Address, conn: _Connection) -> None:
        conns = self._idle.setdefault(address, [])
        if len(conns) >= IDLE_PER_PEER:
            conn.stream.socket.close()
            return
        conn.idle_since = time.monotonic()
        conns.append(conn)

    async def _connect(self, address: Address, connect_timeout: float | None) -> _Connection:
        try:
            with trio.fail_after(self._timeout if connect_timeout is None else connect_timeout):
                stream = await trio.open_tcp_stream(*address)
        except (OSError, trio.TooSlowError) as exc:
            raise BulkError(f"cannot connect: {type(exc).__name__}") from exc
        return _Connection(stream, Reader(stream))

    async def _exchange(self, conn: _Connection, method: str, target: str,
                        headers: Mapping[str, str], body: bytes, fresh: bool
                        ) -> tuple[int, dict[str, str], bytes, bool]:
        """Send the request and read the whole answer; whether the connection may be kept.
        Closes the connection on any failure (and on cancellation)."""
        head = {"method": method, "target": target, "keep": True,
                "headers": {**headers, "content-length": str(len(body))}}
        done = False
        try:
            with trio.fail_after(self._timeout):
                try:
                    if len(body) > SEND_JOINED:  # (a copy of a large body costs more)
                        await conn.stream.send_all(MAGIC + frame(head))
                        await conn.stream.send_all(body)
                    else:
                        await conn.stream.send_all(MAGIC + frame(head) + body)
                    if not conn.reader.buffer and not await conn.reader.more() and not fresh:
                        raise _Stale
                except (trio.BrokenResourceError, OSError) as exc:
                    if not fresh:
                        raise _Stale from exc
                    raise
                answer = await conn.reader.head()
                status = answer.get("status")
                if not isinstance(status, int):
                    raise BulkError("answer without a status")
                answer_headers = parse_headers(answer.get("headers", {}))
                length = declared_length(answer_headers)
                if length is None:  # the body runs to the end of the connection
                    chunks = [conn.reader.leftover()]
                    while await conn.reader.more():
                        chunks.append(conn.reader.leftover())
                    data, keep = b"".join(chunks), False
                else:
                    data = await conn.reader.exactly(length)
                    keep = answer.get("keep") is True
            done = True
            return status, answer_headers, data, keep
        except (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError,
                OSError) as exc:
            raise BulkError(f"the call failed: {type(exc).__name__}") from exc
        finally:
            if not done:
                await _close(conn)


async def _close(conn: _Connection) -> None:
    with trio.CancelScope(shield=True):
        await conn.stream.aclose()

