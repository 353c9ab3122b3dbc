"""The namespace's node-to-node endpoints: operations for a primary, records for its holders.

POST /v1/ns/op     an operation (``daemon.namespace.ops``) for the inode's primary; answers
                   the result and the tuples written, or the POSIX error that refused it
POST /v1/records   records a primary stores on this holder (small, content in the body)
GET  /v1/entries   the entry tuples of a directory of this node's group (``dir=<ino>``)

Signed like every other request; a malformed body is a 400 and changes nothing.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from daemon.asgi import HTTPError, Request, Response, Router
from daemon.core.inodes import FsError
from daemon.core.keys import MAX_INO, entry_prefix
from daemon.data_errors import DataError
from daemon.digest import EMPTY_DIGEST
from daemon.names import NameError_, validate_name
from daemon.namespace import ops
from daemon.namespace.primary import store_records
from daemon.store_layout import StoreError, StoreFull
from daemon.wire import record_from_json, tuple_to_json

if TYPE_CHECKING:
    from daemon.runtime import NodeRuntime

ReadJson = Callable[[Request], Awaitable[Any]]
Verify = Callable[[Request, bytes], None]


def add_routes(router: Router, rt: NodeRuntime, read_json: ReadJson, verify: Verify) -> None:
    async def apply_op(req: Request) -> Response:
        doc = await read_json(req)
        try:
            op = ops.from_json(doc)
        except (ValueError, TypeError) as exc:
            raise HTTPError(400, f"malformed operation: {exc}") from exc
        try:
            result, written = await rt.primary.apply(op)
        except FsError as exc:
            return Response.json({"errno": exc.errno, "message": exc.message})
        except DataError as exc:
            raise HTTPError(exc.status, exc.message) from exc
        return Response.json({"result": ops.result_to_json(result),
                              "tuples": [tuple_to_json(t) for t in written]})

    async def store(req: Request) -> Response:
        doc = await read_json(req)
        limit = rt.settings.max_request_bytes
        try:
            records = [record_from_json(r, limit) for r in doc["records"]]
            for t, _ in records:
                validate_name(t.name)
        except (KeyError, TypeError, ValueError, NameError_) as exc:
            raise HTTPError(400, f"malformed records: {exc}") from exc
        try:
            newer = await store_records(rt, records, publish=doc.get("publish") is True)
        except StoreFull as exc:
            raise HTTPError(507, str(exc)) from exc
        if doc.get("sync") is True:  # fsync's barrier (``ClusterRecords.sync``)
            try:
                await rt.store.sync()
            except StoreError as exc:
                raise HTTPError(507 if isinstance(exc, StoreFull) else 500, str(exc)) from exc
        return Response.json({"stored": len(records) - len(newer), "newer": newer})

    async def entries(req: Request) -> Response:
        verify(req, EMPTY_DIGEST)
        directory = req.int_arg("dir")
        if not 0 < directory <= MAX_INO:
            raise HTTPError(400, "dir must be an inode number")
        node = rt.node
        if node.group_of(entry_prefix(directory)) != node.group:
            raise HTTPError(421, f"directory {directory:x} is not of this node's group")
        return Response.json({"entries": [tuple_to_json(t)
                                          for t in node.tuples.entries(directory)]})

    router.add("POST", "/v1/ns/op", apply_op)
    router.add("POST", "/v1/records", store)
    router.add("GET", "/v1/entries", entries)
