"""Scriptable access to a node over its signed HTTP API (what `kelipsfs put/get/ls/rm` use).

Which node and which key: ``--node`` and ``--cluster-key-file`` when given, else the local
node's ``endpoint.json`` in the data dir (written by the node at start), else 127.0.0.1:7400
with the open key of the default cluster.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple, TypeVar

import trio

from daemon.bulk import BulkError, FileBody
from daemon.digest import Stopped, fd_digest, new_hasher
from daemon.names import NameError_, validate_name
from daemon.peers import (
    BULK_MIN,
    DIGEST_AFTER_HEADER,
    Address,
    LateDigest,
    PeerClient,
    PeerError,
    StreamedResponse,
    error_of,
)
from daemon.security import Authenticator, load_key, open_cluster_key
from daemon.settings import DEFAULT_PORT, default_data_dir, parse_address

ENDPOINT_FILE = "endpoint.json"
PROGRESS_MIN = 8 << 20
#: Seconds to wait for a connection to a holder the node named (303, 307) before going on to
#: the next holder (a get) or back to the node (a put): a holder's address may not be
#: reachable from where the client runs (it is reachable from the node), and a silent one
#: would hold the transfer up for the whole timeout.
HOLDER_CONNECT_TIMEOUT = 3.0
#: A holder's answers to a redirected put that sending it to the node instead cannot change:
#: a bad request, overtaken by a newer version (409: ``put`` sends it again, and the holder
#: now stamps above that version), too large, not matching its digest (the file changed), no
#: space on every holder of the group.
_FINAL_FROM_HOLDER = frozenset({400, 409, 413, 422, 507})
#: Uploads of one ``put`` overtaken each time by a newer version on the holders (409).
PUT_ATTEMPTS = 3
_T = TypeVar("_T")
#: A get hands blocks of about this size to its writer thread ...
GET_BLOCK = 1 << 20
#: ... and lets this many wait while it writes.
GET_QUEUE_BLOCKS = 8


class ClientError(Exception):
    """Something the user should read: the node's refusal or why it could not be reached."""


class _Overtaken(ClientError):
    """The holders keep a newer version than the one the upload was stamped with (409): a
    concurrent writer's, or one stamped by a clock ahead of the node's. The node now stamps
    above it, so sending the file again makes it the newest."""


@dataclass(frozen=True)
class Target:
    address: tuple[str, int]
    key: bytes


def write_endpoint(data_dir: Path, address: tuple[str, int], cluster_id: str,
                   key_file: Path | None) -> None:
    """Called by a node at start so local commands find it without flags."""
    doc = {"address": f"{address[0]}:{address[1]}", "cluster_id": cluster_id,
           "cluster_key_file": str(key_file.resolve()) if key_file else None, "pid": os.getpid()}
    tmp = data_dir / (ENDPOINT_FILE + ".tmp")
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, data_dir / ENDPOINT_FILE)


def resolve_target(node: str | None, key_file: str | None, cluster_id: str | None,
                   data_dir: str | None) -> Target:
    doc: dict[str, Any] = {}
    endpoint = Path(data_dir).expanduser() if data_dir else default_data_dir()
    path = endpoint / ENDPOINT_FILE
    if path.exists():
        try:
            doc = json.loads(path.read_text())
        except ValueError:
            doc = {}
    if node is not None:
        address = parse_address(node, key="--node")
    elif doc.get("address"):
        address = parse_address(str(doc["address"]), key="endpoint")
    else:
        address = ("127.0.0.1", DEFAULT_PORT)
    chosen_key = key_file or doc.get("cluster_key_file")
    if chosen_key:
        key = load_key(Path(chosen_key))
    else:
        key = open_cluster_key(cluster_id or doc.get("cluster_id") or "kelipsfs")
    return Target(address, key)


def checked_name(name: str) -> str:
    """Validate a name before it is sent (the node checks again): a clear error, no request."""
    try:
        return validate_name(name)
    except NameError_ as exc:
        raise ClientError(str(exc)) from exc


class Client:
    def __init__(self, target: Target, timeout: float = 60.0) -> None:
        self.target = target
        self.peers = PeerClient(Authenticator(target.key), timeout)

    async def aclose(self) -> None:
        await self.peers.aclose()

    async def _json(self, method: str, path: str, query: dict[str, object] | None = None
                    ) -> Any:
        try:
            doc, _ = await self.peers.call_json(method, self.target.address, path, query)
        except PeerError as exc:
            raise ClientError(str(exc)) from exc
        return doc

    async def status(self) -> Any:
        return await self._json("GET", "/v1/status")

    async def listing(self, prefix: str) -> Any:
        return await self._json("GET", "/v1/files", {"prefix": prefix})

    async def stat(self, name: str) -> Any:
        return await self._json("GET", "/v1/stat/" + checked_name(name))

    async def remove(self, name: str) -> Any:
        return await self._json("DELETE", "/v1/files/" + checked_name(name))

    async def put(self, local: Path, name: str, progress: bool) -> Any:
        """Upload a file over a bulk connection: the kernel sends it from the file (sendfile)
        while a worker thread hashes it, and the digest follows the body in the signed
        trailer. The first byte leaves at once, and no byte is copied through Python to be
        sent. A file that changes while it is sent fails the upload: its size, mtime and
        ctime are checked again before the trailer is signed (a file that grew would
        otherwise be stored cut at its first size), its digest by every holder."""
        name = checked_name(name)
        try:
            fh = await trio.to_thread.run_sync(open, local, "rb")
        except OSError as exc:
            raise ClientError(f"{local}: {exc.strerror or exc}") from exc
        try:
            for attempt in range(1, PUT_ATTEMPTS + 1):
                try:
                    return await self._put_open(fh, local, name, progress)
                except _Overtaken as exc:
                    if attempt == PUT_ATTEMPTS:
                        raise ClientError(f"{exc}; gave up after {attempt} attempts") from exc
            raise AssertionError("unreachable")
        finally:
            fh.close()

    async def _put_open(self, fh: BinaryIO, local: Path, name: str, progress: bool) -> Any:
        st = os.fstat(fh.fileno())
        if st.st_size == 0 and os.pread(fh.fileno(), 1, 0):
            raise ClientError(f"{local}: reports a size of 0 but has content (a /proc or "
                              "/sys file?); copy it to a regular file first")
        query = {"size": st.st_size, "mode": st.st_mode & 0o7777, "mtime_ns": st.st_mtime_ns}
        meter = _Progress(st.st_size, "put") if progress and st.st_size >= PROGRESS_MIN else None
        hashed: list[bytes] = []
        failed: list[str] = []
        ready = trio.Event()
        stop = threading.Event()

        async def hash_file() -> None:
            try:
                hashed.append(await trio.to_thread.run_sync(
                    functools.partial(fd_digest, fh.fileno(), st.st_size, stop=stop.is_set)))
            except (OSError, EOFError, Stopped) as exc:
                failed.append(str(exc))
            finally:
                ready.set()

        def digest() -> bytes:
            if failed:
                raise ClientError(f"{local}: could not be read while it was sent: {failed[0]}")
            now = os.fstat(fh.fileno())
            if (now.st_size, now.st_mtime_ns, now.st_ctime_ns) != (
                    st.st_size, st.st_mtime_ns, st.st_ctime_ns):
                raise ClientError(f"{local}: changed while it was sent; nothing was stored")
            return hashed[0]

        async def upload(address: Address, direct: bool,
                         extra: dict[str, object] | None = None) -> tuple[int, bytes]:
            if meter:
                meter.restart()
            asked = {**query, **(extra or {})}
            async with self.peers.stream(
                    "PUT", address, "/v1/files/" + name, {**asked, "direct": 1} if direct
                    else asked, body=FileBody(fh.fileno(), on_sent=meter.add if meter else None),
                    content_digest=LateDigest(digest, ready),  # (checked again each attempt)
                    bulk_size=st.st_size,
                    connect_timeout=None if address == self.target.address
                    else HOLDER_CONNECT_TIMEOUT) as response:
                return response.status_code, await response.aread()

        async def hashed_upload() -> tuple[int, bytes]:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(hash_file)
                try:
                    status, data = await upload(self.target.address, st.st_size >= BULK_MIN)
                    if status == 307:  # not a holder: it named them
                        status, data = await self._upload_to_holders(data, upload)
                finally:
                    stop.set()  # a failed upload does not wait for the whole file's hash
            return status, data

        try:
            status, data = await _unwrapped(hashed_upload)
        except (PeerError, BulkError) as exc:
            raise ClientError(str(exc)) from exc
        finally:
            if meter:
                meter.done()
        if status == 409:
            raise _Overtaken(_error(data, status))
        if status != 200:
            raise ClientError(_error(data, status))
        return json.loads(data)

    async def _upload_to_holders(
            self, answer: bytes,
            upload: Callable[[Address, bool, dict[str, object] | None],
                             Awaitable[tuple[int, bytes]]]
    ) -> tuple[int, bytes]:
        """Send the upload to the first holder the node named in ``answer`` (it stores its
        copy and relays to the others). If that holder cannot be reached, the transfer breaks,
        it refuses for a reason of its own (e.g. 401: its clock is off) or the answer names
        none, send it to the node itself, which relays it to every holder and answers for the
        whole group. A refusal of the content itself (``_FINAL_FROM_HOLDER``) is the answer:
        the node would meet the same one."""
        try:
            plan = json.loads(answer)
        except ValueError:
            plan = None
        holders = plan.get("holders") if isinstance(plan, dict) else None
        extra = plan.get("query") if isinstance(plan, dict) else None
        extra = extra if isinstance(extra, dict) else {}
        if isinstance(holders, list) and holders:
            try:
                address = parse_address(str(holders[0]), key="holder")
                status, data = await upload(address, False, extra)
                if status == 200 or status in _FINAL_FROM_HOLDER:
                    return status, data
            except (PeerError, BulkError, ValueError):
                pass
        return await upload(self.target.address, False, extra)

    async def get(self, name: str, out: BinaryIO, progress: bool) -> int:
        """Stream an object to ``out``, verifying size and digest at the end.

        Kelips' read path: the node looks the name up (one hop) and answers a small object
        itself; a large one with its live holders, nearest first (303), instead of relaying
        every byte; the client then fetches from the nearest holder over a bulk connection,
        resuming at the same offset on the next one if a holder fails mid-transfer.
        Receiving and writing overlap (``_writer``).
        """
        name = checked_name(name)
        try:
            meta, sink = await self._download(name, out, progress)
        except (PeerError, BulkError) as exc:
            raise ClientError(str(exc)) from exc
        except Exception as exc:
            if isinstance(exc, ClientError):
                raise
            raise ClientError(f"transfer failed: {type(exc).__name__}: {exc}") from exc
        if sink.size != meta.size or sink.sha.digest() != meta.checksum:
            raise ClientError(f"{name}: received {sink.size} bytes that do not match the object "
                              "(size or checksum); output discarded")
        return sink.size

    async def _download(self, name: str, out: BinaryIO, progress: bool
                        ) -> tuple[_Meta, _Sink]:
        async def into_writer() -> tuple[_Meta, _Sink]:
            async with _writer(out) as sink:
                meta = await self._get_into(name, sink, progress)
            return meta, sink

        return await _unwrapped(into_writer)  # (the writer's nursery wraps what it raised)

    async def _get_into(self, name: str, sink: _Sink, progress: bool) -> _Meta:
        # A pooled HTTP request: a small object comes back in the answer; a large one is
        # named by its holders (303) and fetched over a bulk connection.
        async with self.peers.stream("GET", self.target.address, "/v1/files/" + name,
                                     {"direct": 1}) as response:
            if response.status_code != 303:
                return await _copy_answer(response, sink, progress)
            plan = json.loads(await response.aread())
        return await self._from_holders(name, plan, sink, progress)

    async def _from_holders(self, name: str, plan: dict[str, Any], sink: _Sink,
                            progress: bool) -> _Meta:
        """Fetch from the holders the node named, nearest first; resume on the next one."""
        meter = _meter(int(plan["size"]), progress)
        meta: _Meta | None = None
        errors: list[str] = []
        record = str(plan.get("name", name))  # the content record the node named
        for holder in plan["holders"]:
            address = parse_address(str(holder), key="holder")
            query = {"min_clock": plan["clock"] if meta is None else meta.clock,
                     "offset": sink.size}
            try:
                async with self.peers.stream("GET", address, "/v1/replica/" + record, query,
                                             bulk_size=0,
                                             connect_timeout=HOLDER_CONNECT_TIMEOUT) as response:
                    if response.status_code != 200:
                        errors.append(f"{holder}: "
                                      f"{_error(await response.aread(), response.status_code)}")
                        continue
                    found = _Meta.from_headers(response.headers)
                    if meta is not None and found != meta:
                        errors.append(f"{holder}: has another version")
                        continue
                    meta = found
                    await sink.copy(response, meter)
                    return meta
            except (PeerError, BulkError) as exc:
                errors.append(f"{holder}: {exc}")
        if sink.size == 0:  # no holder served it to us: let the node relay it
            async with self.peers.stream("GET", self.target.address, "/v1/files/" + name,
                                         bulk_size=0) as response:
                return await _copy_answer(response, sink, progress)
        raise ClientError(f"{name}: transfer failed on every holder: {'; '.join(errors)}")


class _Meta(NamedTuple):
    size: int
    checksum: bytes
    clock: int
    #: The digest follows the object's bytes in the body (``DIGEST_AFTER_HEADER``).
    digest_after: bool = False

    @classmethod
    def from_headers(cls, headers: Mapping[str, str]) -> _Meta:
        try:
            if headers.get(DIGEST_AFTER_HEADER) == "1":
                return cls(int(headers["x-kelips-size"]), b"",
                           int(headers.get("x-kelips-clock", "0")), digest_after=True)
            return cls(int(headers["x-kelips-size"]), bytes.fromhex(headers["x-kelips-checksum"]),
                       int(headers.get("x-kelips-clock", "0")))
        except (KeyError, ValueError) as exc:
            raise ClientError(f"the node sent bad object metadata: {exc}") from exc


class _Sink:
    """Where a get's bytes go: hashed and written by a writer task in a worker thread."""

    def __init__(self, send: trio.MemorySendChannel[bytes], out: BinaryIO) -> None:
        self.sha = new_hasher()
        self.size = 0
        #: What came after the object's bytes (``copy``'s ``payload``): its digest.
        self.after = b""
        self._send = send
        self._out = out

    async def copy(self, response: StreamedResponse, meter: _Progress | None,
                   payload: int | None = None) -> None:
        """The answer's body into the output; ``payload``: the bytes of it that are the
        object's (the rest, kept in ``after``, is not written)."""
        if int(response.headers.get("content-length", GET_BLOCK)) < GET_BLOCK:
            # Small: hashed and written here; a thread hop would cost more than the write.
            data = self._split(await response.aread(), payload)
            self.size += len(data)
            _hash_and_write(self.sha, self._out, data)
            return
        pending: list[bytes] = []
        pending_size = 0
        async for block in response.aiter_bytes(GET_BLOCK):
            chunk = self._split(block, payload)
            self.size += len(chunk)
            pending.append(chunk)
            pending_size += len(chunk)
            if pending_size >= GET_BLOCK:
                await self._send.send(b"".join(pending))
                pending, pending_size = [], 0
            if meter:
                meter.add(len(chunk))
        if pending:
            await self._send.send(b"".join(pending))
        if meter:
            meter.done()

    def _split(self, block: bytes, payload: int | None) -> bytes:
        """The part of ``block`` that is the object's; the rest goes to ``after``."""
        if payload is None:
            return block
        room = max(0, payload - self.size)
        if len(block) > room:
            self.after += block[room:]
            return block[:room]
        return block


@asynccontextmanager
async def _writer(out: BinaryIO) -> AsyncIterator[_Sink]:
    """A ``_Sink`` whose blocks a writer task hashes and writes while the next ones arrive;
    leaving waits until everything is written."""
    send, receive = trio.open_memory_channel[bytes](GET_QUEUE_BLOCKS)
    sink = _Sink(send, out)

    async def write_blocks() -> None:
        async with receive:
            async for block in receive:
                await trio.to_thread.run_sync(_hash_and_write, sink.sha, out, block)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(write_blocks)
        async with send:
            yield sink


async def _copy_answer(response: StreamedResponse, sink: _Sink, progress: bool) -> _Meta:
    """A node's whole answer with the object (200) into ``sink``; its refusal as ClientError."""
    if response.status_code != 200:
        raise ClientError(_error(await response.aread(), response.status_code))
    meta = _Meta.from_headers(response.headers)
    await sink.copy(response, _meter(meta.size, progress),
                    meta.size if meta.digest_after else None)
    return meta._replace(checksum=sink.after) if meta.digest_after else meta


def _meter(total: int, progress: bool) -> _Progress | None:
    return _Progress(total, "get") if progress and total >= PROGRESS_MIN else None


async def _unwrapped(run: Callable[[], Awaitable[_T]]) -> _T:
    """``run()``, raising the one error its nursery raised as itself, not in a group."""
    try:
        return await run()
    except BaseExceptionGroup as group:
        first = group.exceptions[0]
        if len(group.exceptions) == 1 and isinstance(first, Exception):
            raise first from None
        raise


def _hash_and_write(sha: Any, out: BinaryIO, block: bytes) -> None:
    sha.update(block)
    out.write(block)


def _error(data: bytes, status: int) -> str:
    message = error_of(data)
    return f"{message} (HTTP {status})" if message else f"HTTP {status}"


class _Progress:
    """A one-line progress bar on stderr for large transfers on a terminal."""

    def __init__(self, total: int, label: str) -> None:
        self.total = max(total, 1)
        self.label = label
        self.seen = 0
        self.started = time.monotonic()
        self.last = 0.0

    def restart(self) -> None:
        """The transfer starts again from its first byte (sent again to another node)."""
        self.seen = 0
        self.started = time.monotonic()

    def add(self, n: int) -> None:
        self.seen += n
        now = time.monotonic()
        if now - self.last < 0.2 and self.seen < self.total:
            return
        self.last = now
        rate = self.seen / max(now - self.started, 1e-6) / (1 << 20)
        width = 30
        filled = int(width * self.seen / self.total)
        sys.stderr.write(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] "
                         f"{self.seen / self.total:6.1%} {rate:7.1f} MiB/s")
        sys.stderr.flush()

    def done(self) -> None:
        sys.stderr.write("\n")
        sys.stderr.flush()
