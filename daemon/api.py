"""The node's HTTP endpoints (served by hypercorn's trio worker on the node's port).

Node-to-node: /v1/sync (join, anti-entropy), /v1/lookup, /v1/placement, /v1/list,
/v1/replica/NAME (store, read, delete a copy), /v1/tuple (publish tuples); the namespace's
own (``daemon.namespace.http``).
Clients: the filesystem by path (``daemon.namespace.paths``: /v1/files/PATH, /v1/stat/PATH),
the DHT's raw objects (/v1/objects/NAME, /v1/objects-stat/NAME), /v1/status. /metrics is the
Prometheus text format.

Every request except /metrics must be signed with the cluster key; anything unsigned, wrongly
signed, replayed, oversized or malformed is refused with a 4xx, counted, and changes nothing.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable
from typing import TYPE_CHECKING, Any

import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from daemon import bulk
from daemon.asgi import HTTPError, Request, Response, Router
from daemon.core import codec
from daemon.core.ids import NODE_ID_BYTES
from daemon.core.keys import OBJECT, record_ino
from daemon.core.manifest import is_manifest, manifest_sizes
from daemon.core.messages import Snapshot, SyncRequest, TupleEntry, Version
from daemon.data_errors import DataError
from daemon.dataplane import Located
from daemon.digest import DIGEST_SIZE, EMPTY_DIGEST, digest_of
from daemon.names import NameError_, validate_name, validate_prefix
from daemon.namespace.http import add_routes as add_namespace_routes
from daemon.namespace.paths import add_routes as add_path_routes
from daemon.peers import (
    BULK_MIN,
    CONTENT_DIGEST_HEADER,
    DIGEST_AFTER_HEADER,
    TRAILER_MARK,
    LateDigest,
)
from daemon.security import DIGEST_IN_TRAILER, MAC_HEADER, AuthError
from daemon.settings import format_address
from daemon.store_layout import ChecksumMismatch, StaleVersion, StoredObject, StoreError, StoreFull
from daemon.wire import entry_to_json, tuple_from_json, tuple_to_json

if TYPE_CHECKING:
    from daemon.runtime import NodeRuntime

log = logging.getLogger("kelipsfs.http")

#: Microseconds the node spent on a GET /v1/files (lookup + fetch), measured inside the node.
ELAPSED_HEADER = "x-kelips-elapsed-us"
META_HEADERS = ("x-kelips-size", "x-kelips-mode", "x-kelips-mtime-ns", "x-kelips-checksum",
                "x-kelips-clock")


def _patch_hypercorn_send() -> None:
    """Make a send on a connection that another task is also sending on close it, not crash.

    When a peer aborts a chunked upload (a node's put to a replica timed out across a
    partition), hypercorn's h11 protocol answers with an error response while the request's
    own response may still be sending: trio raises BusyResourceError, which hypercorn
    lets escape its task group (0.18), and that took the whole node down in the partition scenario.
    The connection is dead either way; treat it like a broken one.
    """
    from hypercorn.events import Closed, RawData
    from hypercorn.trio import tcp_server

    original = tcp_server.TCPServer.protocol_send
    if getattr(original, "_kelipsfs_guarded", False):
        return

    async def protocol_send(self: tcp_server.TCPServer, event: object) -> None:
        try:
            await original(self, event)  # type: ignore[arg-type]
        except trio.BusyResourceError:
            if isinstance(event, RawData):
                await self.protocol.handle(Closed())

    protocol_send._kelipsfs_guarded = True  # type: ignore[attr-defined]
    tcp_server.TCPServer.protocol_send = protocol_send  # type: ignore[method-assign]


_patch_hypercorn_send()


def _patch_hypercorn_bulk() -> None:
    """Serve connections that open with the bulk magic with ``daemon.bulk``, not HTTP.

    The first bytes are peeked (MSG_PEEK), not read: any other connection reaches hypercorn
    untouched. Only connections to our own ``Router`` are diverted (hypercorn wraps the ASGI
    app in an ``ASGIWrapper`` whose ``app`` is ours).
    """
    from hypercorn.trio import tcp_server

    original = tcp_server.TCPServer.run
    if getattr(original, "_kelipsfs_bulk", False):
        return

    async def run(self: tcp_server.TCPServer) -> None:
        router = getattr(self.app, "app", None)
        sock = getattr(self.stream, "socket", None)
        if isinstance(router, Router) and sock is not None:
            is_bulk = await _opens_with_magic(sock, router.bulk_timeout)
            if is_bulk is None:  # closed or silent: nothing to serve
                await self.stream.aclose()
                return
            if is_bulk:
                peer = sock.getpeername()
                await bulk.serve_connection(self.stream, router, (str(peer[0]), int(peer[1])),
                                            router.bulk_timeout)
                return
        await original(self)

    run._kelipsfs_bulk = True  # type: ignore[attr-defined]
    tcp_server.TCPServer.run = run  # type: ignore[method-assign]


async def _opens_with_magic(sock: trio.socket.SocketType, timeout: float) -> bool | None:
    """Whether the connection starts with ``bulk.MAGIC``; None if it closed or stayed silent
    for ``timeout`` seconds (peeked, so the bytes stay for whoever serves it)."""
    with trio.move_on_after(timeout):
        while True:
            try:
                first = await sock.recv(len(bulk.MAGIC), socket.MSG_PEEK)
            except OSError:
                return None
            if not first:
                return None
            if first == bulk.MAGIC:
                return True
            if not bulk.MAGIC.startswith(first):
                return False
            await trio.sleep(0.001)  # a prefix of the magic so far: wait for the rest
    return None


_patch_hypercorn_bulk()


async def serve_http(app: Router, listen: tuple[str, int], *,
                     task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    config = Config()
    config.bind = [f"{listen[0]}:{listen[1]}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.keep_alive_timeout = 30
    config.h11_max_incomplete_size = 64 * 1024
    config.graceful_timeout = 1.0
    await serve(app, config, task_status=task_status)  # type: ignore[arg-type]


def build_app(rt: NodeRuntime) -> Router:
    api = _Api(rt)
    router = Router(on_error=lambda req, exc: log.exception("%s %s failed", req.method, req.path,
                                                            exc_info=exc),
                    bulk_timeout=rt.settings.http_timeout)
    router.add("POST", "/v1/sync", api.sync)
    router.add("GET", "/v1/lookup", api.lookup)
    router.add("GET", "/v1/placement", api.placement)
    router.add("GET", "/v1/list", api.list_group)
    router.add("POST", "/v1/tuple", api.tuples)
    router.add("PUT", "/v1/replica/", api.put_replica)
    router.add("GET", "/v1/replica/", api.get_replica)
    router.add("DELETE", "/v1/replica/", api.delete_replica)
    router.add("PUT", "/v1/objects/", api.put_object)
    router.add("GET", "/v1/objects/", api.get_object)
    router.add("GET", "/v1/objects-stat/", api.stat_object)
    router.add("GET", "/v1/status", api.status)
    router.add("GET", "/metrics", api.metrics)
    add_namespace_routes(router, rt, api.read_json, api.verify)
    add_path_routes(router, rt, api)
    return router


class _Api:
    def __init__(self, rt: NodeRuntime) -> None:
        self.rt = rt

    # --- helpers -------------------------------------------------------------------------------

    def verify(self, req: Request, body_digest: bytes) -> None:
        try:
            self.rt.auth.verify_request(req.method, req.target, req.headers, body_digest,
                                        self.rt.wall())
        except AuthError as exc:
            self.rt.metrics.inc("kelips_rejected_packets_total", reason="http_auth")
            raise HTTPError(401, f"request not authenticated: {exc}") from exc

    async def _small_body(self, req: Request) -> bytes:
        body = await req.body(self.rt.settings.max_request_bytes)
        self.verify(req, digest_of(body))
        return body

    async def read_json(self, req: Request) -> Any:
        import json
        body = await self._small_body(req)
        try:
            return json.loads(body)
        except ValueError as exc:
            raise HTTPError(400, "body is not JSON") from exc

    def name_of(self, req: Request, prefix: str) -> str:
        try:
            return validate_name(req.path[len(prefix):])
        except NameError_ as exc:
            raise HTTPError(400, str(exc)) from exc

    def body_checksum(self, req: Request) -> bytes | LateDigest:
        """Authenticate an upload's head and say what its body must hash to: the digest
        declared (and signed) in its header, or, for a body hashed while it was sent, a
        ``LateDigest`` read from the signed trailer once the body has arrived."""
        if req.headers.get(CONTENT_DIGEST_HEADER) != TRAILER_MARK:
            declared = self._declared_digest(req)
            self.verify(req, declared)
            return declared
        if not req.trailer_ok:
            raise HTTPError(400, "a digest in a trailer needs a bulk connection")
        self.verify(req, DIGEST_IN_TRAILER)
        head_mac = req.headers[MAC_HEADER]

        def from_trailer() -> bytes:
            if req.trailer is None:
                raise HTTPError(400, "the body's digest trailer is missing")
            try:
                return self.rt.auth.verify_trailer(head_mac, req.trailer)
            except AuthError as exc:
                self.rt.metrics.inc("kelips_rejected_packets_total", reason="http_auth")
                raise HTTPError(401, f"body not authenticated: {exc}") from exc

        return LateDigest(from_trailer)

    def _declared_digest(self, req: Request) -> bytes:
        raw = req.headers.get(CONTENT_DIGEST_HEADER, "")
        try:
            declared = bytes.fromhex(raw)
        except ValueError:
            declared = b""
        if len(declared) != DIGEST_SIZE:
            raise HTTPError(400, f"missing or malformed {CONTENT_DIGEST_HEADER} header")
        return declared

    @staticmethod
    def _attrs(req: Request) -> bytes:
        try:
            attrs = bytes.fromhex(req.query.get("attrs", ""))
        except ValueError as exc:
            raise HTTPError(400, "attrs must be hex") from exc
        if len(attrs) > codec.MAX_ATTRS_BYTES:
            raise HTTPError(400, f"attrs are at most {codec.MAX_ATTRS_BYTES} bytes")
        return attrs

    def _version(self, req: Request) -> Version:
        try:
            writer = bytes.fromhex(req.arg("writer"))
        except ValueError as exc:
            raise HTTPError(400, "writer must be hex") from exc
        if len(writer) != 20:
            raise HTTPError(400, "writer must be a 20-byte node id")
        return Version(req.int_arg("clock"), writer)

    # --- node to node -----------------------------------------------------------------------

    async def sync(self, req: Request) -> Response:
        body = await self._small_body(req)
        try:
            envelope = codec.decode(body)
        except codec.DecodeError as exc:
            self.rt.metrics.inc("kelips_rejected_packets_total", reason="malformed")
            raise HTTPError(400, f"malformed sync request: {exc}") from exc
        if not isinstance(envelope.message, SyncRequest):
            raise HTTPError(400, "expected a sync request")
        outs = self.rt.node.receive(self.rt.now(), envelope)
        reply = next((o.message for o in outs
                      if o.dest == envelope.message.sender.address), None)
        await self.rt.dispatch([o for o in outs if o.message is not reply])
        if reply is None:
            reply = self.rt.node.snapshot(envelope.message.sender.node_id)
        data = codec.encode(self.rt.node.envelope(reply))
        return Response(200, data, {"content-type": "application/octet-stream"})

    async def lookup(self, req: Request) -> Response:
        await self._small_body(req)
        name = validate_or_400(req.arg("name"))
        node = self.rt.node
        if node.group_of(name) != node.group:
            raise HTTPError(421, f"{name} is not in this node's group")
        answer = node.answer_lookup(name)
        if req.query.get("local"):
            answer = type(answer)(answer.entry, answer.holders, ())
        return Response.json({
            "tuple": tuple_to_json(answer.entry) if answer.entry is not None else None,
            "holders": [entry_to_json(e) for e in answer.holders],
            "candidates": [entry_to_json(e) for e in answer.candidates]})

    async def placement(self, req: Request) -> Response:
        await self._small_body(req)
        name = validate_or_400(req.arg("name"))
        node = self.rt.node
        if node.group_of(name) != node.group:
            raise HTTPError(421, f"{name} is not in this node's group")
        return Response.json({"holders": [entry_to_json(e) for e in node.placement(name)]})

    async def list_group(self, req: Request) -> Response:
        await self._small_body(req)
        prefix = prefix_or_400(req.query.get("prefix", ""))
        return Response.json({"objects": self.rt.dataplane.local_listing(prefix)})

    async def tuples(self, req: Request) -> Response:
        doc = await self.read_json(req)
        try:
            entries = [tuple_from_json(t) for t in doc["tuples"]]
            for t in entries:
                validate_name(t.name)
        except (KeyError, TypeError, ValueError) as exc:
            raise HTTPError(400, f"malformed tuples: {exc}") from exc
        now = self.rt.now()
        announce = req.query.get("announce") == "1"  # (the writer is of another group)
        fresh = [t for t in entries if self.rt.node.record_write(now, t)]
        if announce:
            await self.rt.dispatch(self.rt.node.announce(now, *fresh))
        return Response.json({"ok": True})

    async def put_replica(self, req: Request) -> Response:
        name = self.name_of(req, "/v1/replica/")
        checksum = self.body_checksum(req)
        version = self._version(req)
        size = req.int_arg("size")
        if size < 0 or size > self.rt.settings.max_object_bytes:
            raise HTTPError(413, f"object of {size} bytes over the limit")
        try:
            obj = await self.rt.store.put(name, version, req.int_arg("mode", 0o644),
                                          req.int_arg("mtime_ns", 0), req.stream(),
                                          expected_checksum=checksum, expected_size=size,
                                          attrs=self._attrs(req))
        except StaleVersion as exc:
            raise HTTPError(409, str(exc), {"held_clock": exc.held.clock}) from exc
        except StoreFull as exc:
            raise HTTPError(507, str(exc)) from exc
        except ChecksumMismatch as exc:
            raise HTTPError(422, str(exc)) from exc
        except StoreError as exc:
            raise HTTPError(500, str(exc)) from exc
        await self._publish_stored(req, obj)
        return Response.json({"stored": obj.size})

    async def _publish_stored(self, req: Request, obj: StoredObject) -> None:
        """A writer that names the holders in ``holders`` has this holder publish the tuple
        as it stores the bytes (and announce it to the group with ``announce=1``)."""
        raw = req.query.get("holders")
        if raw is None or obj.version != self._version(req):
            return
        try:
            holders = tuple(sorted(bytes.fromhex(h) for h in raw.split(",")))
        except ValueError as exc:
            raise HTTPError(400, f"malformed holders: {exc}") from exc
        if not holders or any(len(h) != NODE_ID_BYTES for h in holders):
            raise HTTPError(400, "holders must be node ids")
        t = TupleEntry(obj.name, obj.version, 1, obj.size, obj.mode, obj.mtime_ns,
                       obj.checksum, holders, False, obj.attrs)
        node = self.rt.node
        now = self.rt.now()
        if node.record_write(now, t) and req.query.get("announce") == "1":
            await self.rt.dispatch(node.announce(now, t))

    async def get_replica(self, req: Request) -> Response:
        name = self.name_of(req, "/v1/replica/")
        self.verify(req, EMPTY_DIGEST)
        obj = self.rt.store.get(name)
        min_clock = req.int_arg("min_clock", 0)
        if obj is None or obj.tombstone or obj.version.clock < min_clock:
            raise HTTPError(404, f"{name}: not held here")
        offset = req.int_arg("offset", 0)
        if not 0 <= offset <= obj.size:
            raise HTTPError(416, "offset outside the object")
        length = req.int_arg("length", obj.size - offset)  # (a part: one chunk of a run)
        if not 0 <= length <= obj.size - offset:
            raise HTTPError(416, "length past the end of the object")
        headers = meta_headers(obj.size, obj.mode, obj.mtime_ns, obj.checksum,
                                obj.version.clock)
        headers["content-length"] = str(length)
        self.rt.metrics.inc("kelips_content_bytes_served_total", length)
        # Not hashed here: every reader of a replica hashes what it receives against the
        # checksum sent above, or a part against the one its manifest gives, and fails over
        # or refuses on a mismatch.
        stream = (self.rt.store.read_chunks(obj, offset=offset, verify=False)
                  if length == obj.size - offset else
                  _part(self.rt.store.read_range(obj, offset, length)))
        return Response(200, headers=headers, stream=stream, file=obj.path, file_offset=offset)

    async def delete_replica(self, req: Request) -> Response:
        name = self.name_of(req, "/v1/replica/")
        self.verify(req, EMPTY_DIGEST)
        try:
            await self.rt.store.delete(name, self._version(req))
        except StaleVersion as exc:
            raise HTTPError(409, str(exc), {"held_clock": exc.held.clock}) from exc
        except StoreError as exc:
            raise HTTPError(500, str(exc)) from exc
        return Response.json({"deleted": True})

    # --- clients: the raw objects of the DHT (the filesystem is daemon.namespace.paths) ------

    async def put_object(self, req: Request) -> Response:
        record = OBJECT + self.name_of(req, "/v1/objects/")
        checksum = self.body_checksum(req)
        size = self.upload_size(req)
        if req.query.get("direct") == "1" and size >= BULK_MIN:
            holders = await self.upload_redirect(record, req.target)
            if holders is not None:
                return holders
        try:
            entry = await self.rt.dataplane.writes.insert_stream(
                record, req.stream(), size, checksum, req.int_arg("mode", 0o644),
                req.int_arg("mtime_ns", 0))
        except DataError as exc:
            raise HTTPError(exc.status, exc.message) from exc
        return Response.json({"tuple": tuple_to_json(entry)})

    def upload_size(self, req: Request) -> int:
        size = req.int_arg("size")
        if size < 0 or size > self.rt.settings.max_object_bytes:
            raise HTTPError(413, f"object of {size} bytes over the limit")
        return size

    async def upload_redirect(self, record: str, target: str,
                              extra: dict[str, object] | None = None) -> Response | None:
        """For a client that sends large uploads to a holder itself (``direct=1``): a 307
        naming the record's holders when this node is not one of them. Why: relayed, every
        byte crosses this node first (received once, sent r times); sent to a holder, it is
        received there and sent r - 1 times, so the whole object makes one trip fewer over the
        network and through a process. The head was authenticated; the body is not read. None
        when this node is a holder or knows none: it relays the upload, as without ``direct``.
        ``extra`` is what the client must add to its request (a new file's inode number).
        ``location`` is the same request at the first holder (a holder never redirects), for
        a generic HTTP client; ``kelipsfs put`` signs a new request for it."""
        try:
            holders, _ = await self.rt.dataplane.placement(record)
        except DataError:
            return None  # (insert_stream meets the same failure and says so)
        if not holders or any(h.node_id == self.rt.node.node_id for h in holders):
            return None
        self.rt.metrics.inc("kelips_puts_sent_to_holders_total")
        named = [format_address(h.address) for h in holders]
        answer = Response.json({"holders": named, "query": extra or {}}, 307)
        answer.headers["location"] = f"http://{named[0]}{target}"
        return answer

    async def get_object(self, req: Request) -> Response:
        started = time.perf_counter()
        record = OBJECT + self.name_of(req, "/v1/objects/")
        self.verify(req, EMPTY_DIGEST)
        return await self.read_answer(req, record, started)

    async def read_answer(self, req: Request, record: str, started: float) -> Response:
        """The newest version of a record. Small ones (up to the inline limit) are read whole
        before the answer starts, so a failed transfer is an error status rather than a cut
        body, and ``x-kelips-elapsed-us`` (the node's own time from the request's arrival to
        the verified bytes in hand: lookup plus fetch) covers the whole read; for a larger
        one it covers the time until the first holder answered."""
        try:
            plan = await self.rt.dataplane.read_plan(record)
            if req.query.get("direct") == "1":
                holders = self._holders_answer(plan[0])
                if holders is not None:
                    return holders
            entry = plan[0].entry
            if entry is not None and not entry.tombstone and is_manifest(entry.attrs):
                return await self._chunked_answer(record, plan, started)
            meta, stream = await self.rt.dataplane.open_read(record, plan)
            body: bytes | None = None
            if meta.size <= codec.INLINE_MAX:
                body = b"".join([chunk async for chunk in stream])
        except DataError as exc:
            raise HTTPError(exc.status, exc.message) from exc
        headers = meta_headers(meta.size, meta.mode, meta.mtime_ns, meta.checksum, meta.clock)
        headers[ELAPSED_HEADER] = str(int((time.perf_counter() - started) * 1e6))
        if body is not None:
            return Response(200, body, headers)  # content-length from the body
        headers["content-length"] = str(meta.size)
        return Response(200, headers=headers, stream=stream)

    async def _chunked_answer(self, record: str, plan: tuple[Located, bytes | None],
                              started: float) -> Response:
        """A file stored in chunks, sent as its chunks come (each checked against its own
        digest): the whole file's digest, which no holder has, follows the bytes
        (``DIGEST_AFTER_HEADER``)."""
        manifest, meta = await self.rt.chunks.read_manifest(record, plan)
        ino = record_ino(record)
        if ino is None:
            raise DataError(f"{record}: not a content record")
        headers = meta_headers(manifest.size, meta.mode, meta.mtime_ns, b"", meta.clock)
        del headers["x-kelips-checksum"]
        headers[DIGEST_AFTER_HEADER] = "1"
        headers[ELAPSED_HEADER] = str(int((time.perf_counter() - started) * 1e6))
        headers["content-length"] = str(manifest.size + DIGEST_SIZE)
        return Response(200, headers=headers,
                        stream=self.rt.chunks.stream_checked(ino, manifest))

    def _holders_answer(self, found: Located) -> Response | None:
        """For a client that fetches large objects from a holder itself (``direct=1``): a 303
        naming the record, its version and its live holders, nearest first (this node among
        them when it holds it), so the bytes go from a holder's file to the client in one
        bulk transfer (sendfile on the holder) instead of being relayed through this node.
        None for small objects, which this node answers itself (one request, often one
        datagram)."""
        entry = found.entry
        sizes = manifest_sizes(entry.attrs) if entry is not None else None
        if entry is not None and not entry.tombstone and sizes is not None:
            # A chunked file is sent by this node (no holder has it whole): over a bulk
            # connection, which a 303 naming no holder asks the client for.
            return Response.json({"name": entry.name, "size": sizes[0],
                                  "clock": entry.version.clock, "holders": []}, 303)
        if entry is None or entry.tombstone or entry.size < BULK_MIN or not found.holders:
            return None  # (a missing object: open_read says so, and counts it)
        self.rt.metrics.inc("kelips_reads_sent_to_holders_total")
        return Response.json({"name": entry.name, "size": entry.size,
                              "checksum": entry.checksum.hex(), "clock": entry.version.clock,
                              "holders": [format_address(h.address) for h in found.holders]}, 303)

    async def stat_object(self, req: Request) -> Response:
        name = self.name_of(req, "/v1/objects-stat/")
        record = OBJECT + name
        self.verify(req, EMPTY_DIGEST)
        try:
            found = await self.rt.dataplane.locate(record)
        except DataError as exc:
            raise HTTPError(exc.status, exc.message) from exc
        if found.entry is None or found.entry.tombstone:
            raise HTTPError(404, f"{name}: no such object")
        return Response.json({"tuple": tuple_to_json(found.entry), "group":
                              self.rt.node.group_of(record), "hops": found.hops,
                              "holders": [entry_to_json(h) for h in found.holders]})

    async def status(self, req: Request) -> Response:
        self.verify(req, EMPTY_DIGEST)
        return Response.json(self.rt.status())

    async def metrics(self, req: Request) -> Response:
        return Response.text(self.rt.metrics.render(), content_type="text/plain; version=0.0.4")


def validate_or_400(name: str) -> str:
    try:
        return validate_name(name)
    except NameError_ as exc:
        raise HTTPError(400, str(exc)) from exc


def prefix_or_400(prefix: str) -> str:
    try:
        return validate_prefix(prefix)
    except NameError_ as exc:
        raise HTTPError(400, str(exc)) from exc


async def _part(read: Awaitable[bytes]) -> AsyncIterator[bytes]:
    yield await read


def meta_headers(size: int, mode: int, mtime_ns: int, checksum: bytes, clock: int
                  ) -> dict[str, str]:
    return {"content-type": "application/octet-stream", "x-kelips-size": str(size),
            "x-kelips-mode": str(mode), "x-kelips-mtime-ns": str(mtime_ns),
            "x-kelips-checksum": checksum.hex(), "x-kelips-clock": str(clock)}


__all__ = ["Snapshot", "build_app", "serve_http"]
