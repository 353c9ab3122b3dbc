"""Signed HTTP calls from one node to another (and from the CLI to a node).

Small calls go over kept bulk connections (``daemon.bulk_calls``), streamed ones over one
pooled ``httpx.AsyncClient`` per process or a bulk connection of their own; a timeout on every
call, every request signed with the cluster key over (method, target, time, nonce, body
digest). Failures to reach a peer
become ``PeerError`` so callers can fall back to the next contact or holder.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote, urlencode

import httpx
import trio

from daemon import bulk
from daemon.bulk_calls import CallPool
from daemon.digest import EMPTY_DIGEST, digest_of
from daemon.security import BODY_TRAILER, DIGEST_IN_TRAILER, MAC_HEADER, Authenticator
from daemon.store_files import read_small_file

Address = tuple[str, int]
CONTENT_DIGEST_HEADER = "x-kelips-content-digest"
#: An answer's header saying its body ends with the digest of the bytes before it (a file
#: sent as its chunks come, whose whole digest is known only at the end).
DIGEST_AFTER_HEADER = "x-kelips-digest-after"
#: CONTENT_DIGEST_HEADER's value when the digest follows the body in a signed trailer.
TRAILER_MARK = "trailer"
#: Bodies at least this large travel over a bulk connection (``daemon.bulk``), not HTTP.
BULK_MIN = 1 << 20
#: A file up to this size is read on the event loop (from the page cache: faster than the
#: hop to a worker thread).
READ_IN_LOOP = 64 << 10


class PeerError(Exception):
    """The peer could not be reached, timed out, or answered with an error status."""

    def __init__(self, message: str, status: int | None = None,
                 held_clock: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        #: A refusal as stale (409): the clock of the newer version the peer holds.
        self.held_clock = held_clock


class LateDigest:
    """A body's digest (``daemon.digest``) that is known only once the body has been read or sent.

    Why: hashing a large upload before sending it reads it twice and delays the first byte by
    the whole hash (0.2 s for 256 MiB here); hashed as it goes, the digest travels in a signed
    trailer after the body (``daemon.bulk``) and every receiver checks it before it commits.
    Calling it resolves it once (``resolve``); the digest, or the same error, is kept for later
    calls, so the node that relays an upload to several holders verifies its trailer once.
    ``ready``, when given, is set by whatever computes the digest beside the upload (a worker
    thread hashing the file that sendfile sends): ``wait`` waits for it before resolving.
    """

    def __init__(self, resolve: Callable[[], bytes], ready: trio.Event | None = None) -> None:
        self._resolve: Callable[[], bytes] | None = resolve
        self._ready = ready
        self._digest: bytes | None = None
        self.error: Exception | None = None

    async def wait(self) -> bytes:
        """The digest, once it can be known (after ``ready``); raises what resolving raised."""
        if self._ready is not None:
            await self._ready.wait()
        return self()

    def __call__(self) -> bytes:
        if self._resolve is not None:
            resolve, self._resolve = self._resolve, None
            try:
                self._digest = resolve()
            except Exception as exc:
                self.error = exc
        if self.error is not None:
            raise self.error
        assert self._digest is not None
        return self._digest


def resolved(checksum: bytes | LateDigest) -> bytes:
    """The digest itself, resolving a late one."""
    return checksum if isinstance(checksum, bytes) else checksum()


def target_for(path: str, query: Mapping[str, object] | None = None) -> str:
    """The exact request target that is sent and signed: quoted path plus sorted query."""
    target = quote(path, safe="/")
    if query:
        target += "?" + urlencode(sorted((k, str(v)) for k, v in query.items()), quote_via=quote)
    return target


@dataclass(frozen=True)
class Answer:
    """The whole answer to a ``PeerClient.call``."""

    status_code: int
    headers: Mapping[str, str]
    content: bytes

    def json(self) -> Any:
        return json.loads(self.content)


class PeerClient:
    """Signed, pooled, time-limited HTTP calls to other nodes."""

    def __init__(self, auth: Authenticator, timeout: float,
                 wall: Callable[[], float] = time.time) -> None:
        self._auth = auth
        self._wall = wall
        self._timeout = timeout
        # Plain HTTP between nodes (integrity and authenticity come from the HMAC): no TLS,
        # so no CA bundle to parse, which cost 30 ms at every start of every `kelipsfs` call.
        self._client = httpx.AsyncClient(
            verify=False, timeout=httpx.Timeout(timeout),
            limits=httpx.Limits(max_connections=256, max_keepalive_connections=64))
        self._calls = CallPool(timeout)

    async def aclose(self) -> None:
        await self._calls.aclose()
        await self._client.aclose()

    def _headers(self, method: str, target: str, body_digest: bytes,
                 extra: Mapping[str, str] | None = None) -> dict[str, str]:
        headers = self._auth.sign_request(method, target, body_digest, self._wall())
        if extra:
            headers.update(extra)
        return headers

    async def call(self, method: str, addr: Address, path: str,
                   query: Mapping[str, object] | None = None, body: bytes = b"",
                   ok: tuple[int, ...] = (200,)) -> tuple[Answer, float]:
        """A request with a small body over a kept bulk connection (``daemon.bulk_calls``);
        returns the whole answer and its RTT."""
        target = target_for(path, query)
        headers = self._headers(method, target, digest_of(body))
        started = time.perf_counter()
        try:
            status, answer_headers, content = await self._calls.call(addr, method, target,
                                                                     headers, body)
        except bulk.BulkError as exc:
            raise PeerError(f"{addr[0]}:{addr[1]} unreachable: {exc}") from exc
        rtt = time.perf_counter() - started
        if status not in ok:
            raise PeerError(f"{addr[0]}:{addr[1]} answered {status}: "
                            f"{error_of(content) or content[:200].decode('utf-8', 'replace')}",
                            status, held_clock_of(content, status))
        return Answer(status, answer_headers, content), rtt

    async def call_json(self, method: str, addr: Address, path: str,
                        query: Mapping[str, object] | None = None, doc: Any = None
                        ) -> tuple[Any, float]:
        body = json.dumps(doc).encode() if doc is not None else b""
        response, rtt = await self.call(method, addr, path, query, body)
        try:
            return response.json(), rtt
        except ValueError as exc:
            raise PeerError(f"{addr[0]}:{addr[1]} sent malformed JSON") from exc

    async def put_file(self, addr: Address, path: str, query: Mapping[str, object],
                       source: Path | bytes, content_digest: bytes, size: int) -> bytes:
        """Send a local file of ``size`` bytes (or bytes in memory) as the request body (a
        bulk connection, from the file with sendfile, when it is large); the signature covers
        its digest. Returns the answer's body."""
        if isinstance(source, bytes) and size >= BULK_MIN:
            # a block at a time, each bounded by the timeout (a whole run of chunks in one
            # bounded call would fail on a slow link)
            async with self.stream("PUT", addr, path, query, body=_blocks_of(source),
                                   content_digest=content_digest,
                                   bulk_size=size) as response:
                reply = await _read(response, addr)
            if response.status_code != 200:
                raise refusal(addr, reply, response.status_code)
            return reply
        if isinstance(source, bytes) or size < BULK_MIN:
            # a small call on a kept connection (``daemon.bulk_calls``)
            if isinstance(source, bytes):
                data = source
            elif size <= READ_IN_LOOP:
                data = read_small_file(source, size)
            else:
                data = await trio.Path(source).read_bytes()
            if len(data) != size:
                what = "the content" if isinstance(source, bytes) else str(source)
                raise PeerError(f"{what} holds {len(data)} bytes, not the {size} to send")
            target = target_for(path, query)
            headers = self._headers("PUT", target, content_digest,
                                    {CONTENT_DIGEST_HEADER: content_digest.hex()})
            try:
                status, _, reply = await self._calls.call(addr, "PUT", target, headers, data)
            except bulk.BulkError as exc:
                raise PeerError(f"{addr[0]}:{addr[1]} unreachable: {exc}") from exc
            if status != 200:
                raise refusal(addr, reply, status)
            return reply
        # sent by the kernel from the file (bulk.FileBody)
        fh = await trio.to_thread.run_sync(open, source, "rb")
        try:
            async with self.stream("PUT", addr, path, query, body=bulk.FileBody(fh.fileno()),
                                   content_digest=content_digest,
                                   bulk_size=size) as response:
                reply = await _read(response, addr)
        finally:
            fh.close()
        if response.status_code != 200:
            raise refusal(addr, reply, response.status_code)
        return reply

    @asynccontextmanager
    async def stream(self, method: str, addr: Address, path: str,
                     query: Mapping[str, object] | None = None,
                     body: AsyncIterator[bytes] | bulk.FileBody | None = None,
                     content_digest: bytes | LateDigest | None = None,
                     bulk_size: int | None = None, connect_timeout: float | None = None
                     ) -> AsyncIterator[StreamedResponse]:
        """A request whose response body is streamed (object reads, client uploads).

        With ``bulk_size`` (the exact body size; 0 for none) it goes over a bulk connection
        (``daemon.bulk``): the same request and answer, without HTTP's per-byte costs, for
        transfers of large objects. A ``LateDigest`` (bulk only) is resolved once the body
        is sent and travels in the signed trailer. ``connect_timeout`` (bulk only) bounds
        the connect alone (``bulk.request``).
        """
        target = target_for(path, query)
        trailer: tuple[int, Callable[[], Awaitable[bytes]]] | None = None
        if isinstance(content_digest, LateDigest):
            if bulk_size is None:
                raise ValueError("a late digest needs a bulk connection (bulk_size)")
            headers = self._headers(method, target, DIGEST_IN_TRAILER,
                                    {CONTENT_DIGEST_HEADER: TRAILER_MARK})
            late, head_mac = content_digest, headers[MAC_HEADER]

            async def make_trailer() -> bytes:
                return self._auth.sign_trailer(head_mac, await late.wait())
            trailer = (BODY_TRAILER, make_trailer)
        else:
            declared = content_digest if content_digest is not None else EMPTY_DIGEST
            extra = {CONTENT_DIGEST_HEADER: declared.hex()} if content_digest is not None else None
            headers = self._headers(method, target, declared, extra)
        if bulk_size is not None:
            try:
                async with bulk.request(addr, method, target, headers, body, bulk_size,
                                        self._timeout, trailer, connect_timeout) as answer:
                    yield answer
            except bulk.BulkError as exc:
                raise PeerError(f"{addr[0]}:{addr[1]}: bulk transfer failed: {exc}") from exc
            return
        if isinstance(body, bulk.FileBody):
            raise ValueError("a file body needs a bulk connection (bulk_size)")
        url = f"http://{addr[0]}:{addr[1]}{target}"
        request = self._client.build_request(method, url, headers=headers, content=body)
        try:
            response = await self._client.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise PeerError(f"{addr[0]}:{addr[1]} unreachable: {type(exc).__name__}") from exc
        try:
            yield response
        finally:
            await response.aclose()


class StreamedResponse(Protocol):
    """What ``PeerClient.stream`` yields: an httpx response or a ``bulk.BulkResponse``."""

    @property
    def status_code(self) -> int: ...

    @property
    def headers(self) -> Mapping[str, str]: ...

    def aiter_bytes(self, chunk_size: int | None = None) -> AsyncIterator[bytes]: ...

    async def aread(self) -> bytes: ...


async def _blocks_of(data: bytes) -> AsyncIterator[bytes]:
    for start in range(0, len(data), bulk.SENDFILE_BLOCK):
        yield data[start:start + bulk.SENDFILE_BLOCK]


async def stream_of(data: bytes) -> AsyncIterator[bytes]:
    """Bytes already in memory as a body stream (none at all for no bytes)."""
    if data:
        yield data


async def _read(response: StreamedResponse, addr: Address) -> bytes:
    try:
        return await response.aread()
    except (httpx.HTTPError, bulk.BulkError) as exc:
        raise PeerError(f"{addr[0]}:{addr[1]}: transfer failed: {exc}") from exc


def error_of(body: bytes) -> str | None:
    """The ``error`` a node's JSON error answer carries, or None if the body is not one."""
    try:
        doc = json.loads(body)
    except ValueError:
        return None
    return str(doc["error"]) if isinstance(doc, dict) and "error" in doc else None


def _error_message(body: bytes, status: int) -> str:
    return error_of(body) or f"HTTP {status}: {body[:200]!r}"


def held_clock_of(body: bytes, status: int) -> int | None:
    """The clock of the newer version a holder keeps, from its refusal of an older write or
    delete as stale (409), so the writer can stamp its retry above it; else None."""
    if status != 409:
        return None
    try:
        doc = json.loads(body)
    except ValueError:
        return None
    value = doc.get("held_clock") if isinstance(doc, dict) else None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def refusal(addr: Address, body: bytes, status: int) -> PeerError:
    """A holder's refusal of an object upload (with the held clock of a 409)."""
    return PeerError(f"{addr[0]}:{addr[1]} refused the object: {_error_message(body, status)}",
                     status, held_clock_of(body, status))


