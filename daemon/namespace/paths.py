"""The filesystem over HTTP: what ``kelipsfs put/get/ls/rm/stat`` ask a node, by path.

PUT    /v1/files/PATH        store a file (missing directories are made, 0755); it *replaces*
                             what PATH named, as ``rsync`` and ``install`` do: a new inode gets
                             the content, then the name is bound to it in one step, so a
                             reader sees the old file or the new one, never a mix. Of two puts
                             of one name the one bound last stays. A file larger than a chunk
                             is stored in chunks by the node asked, as it arrives.
GET    /v1/files/PATH        a regular file's content (verified; a large one is named by its
                             holders, 303, and the client fetches it from the nearest)
DELETE /v1/files/PATH        unlink (an empty directory: rmdir)
GET    /v1/files?prefix=P    every non-directory under the directories P names, recursively,
                             whose path starts with P
GET    /v1/stat/PATH         the inode, its content record and holders

The caller holds the cluster key and acts as root: what it makes belongs to uid 0.
Errors carry the POSIX reason: 404 ENOENT, 409 EEXIST/ENOTDIR/EISDIR/ENOTEMPTY, 507 ENOSPC.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import trio

from daemon.asgi import HTTPError, Request, Response, Router
from daemon.core.inodes import Entry, FsError, Inode
from daemon.core.keys import MAX_INO, ROOT_INO, data_name, entry_name, inode_name, parse_ino
from daemon.core.manifest import CHUNK_SIZE
from daemon.data_errors import DataError
from daemon.digest import EMPTY_DIGEST
from daemon.names import NameError_, validate_prefix
from daemon.namespace.cluster import ClusterRecords
from daemon.namespace.ops import Op, inode_to_json
from daemon.namespace.vfs import Caller, Namespace
from daemon.peers import BULK_MIN
from daemon.wire import entry_to_json, tuple_to_json

if TYPE_CHECKING:
    from daemon.api import _Api
    from daemon.runtime import NodeRuntime

ADMIN = Caller(0, 0)
#: Attempts to bind a name whose entry changed between look and bind (ESTALE).
BIND_ATTEMPTS = 3
_STATUS = {errno.ENOENT: 404, errno.EEXIST: 409, errno.ENOTDIR: 409, errno.EISDIR: 409,
           errno.ENOTEMPTY: 409, errno.ESTALE: 409, errno.ENOSPC: 507, errno.EIO: 503,
           errno.ENAMETOOLONG: 400, errno.EINVAL: 400, errno.EMLINK: 409}


def fs_error(exc: FsError, path: str) -> HTTPError:
    """The refusal as an HTTP error naming the path and the POSIX reason."""
    reason = os.strerror(exc.errno)
    detail = "" if exc.errno in (errno.ENOENT, errno.EEXIST) else f" ({exc.message})"
    return HTTPError(_STATUS.get(exc.errno, 400), f"{path}: {reason[0].lower()}{reason[1:]}"
                     f"{detail}", {"errno": errno.errorcode.get(exc.errno, str(exc.errno))})


@contextlib.contextmanager
def answering(path: str) -> Iterator[None]:
    """Refusals of the namespace and failures of the cluster as HTTP errors."""
    try:
        yield
    except FsError as exc:
        raise fs_error(exc, path) from exc
    except DataError as exc:
        raise HTTPError(exc.status, exc.message) from exc


def split_path(path: str) -> tuple[list[str], str]:
    parts = path.split("/")
    return parts[:-1], parts[-1]


class PathApi:
    """The handlers (see the module docstring); ``api`` lends upload and read helpers."""

    def __init__(self, rt: NodeRuntime, api: _Api) -> None:
        self.rt = rt
        self.api = api
        self.records = ClusterRecords(rt)
        self.ns = Namespace(self.records)

    async def _directory(self, parts: list[str], make: bool) -> int:
        """The inode of the directory ``parts`` names from the root (made when ``make``)."""
        current = ROOT_INO
        if make and await self.ns.records.inode(ROOT_INO) is None:
            await self.ns.ensure_root(ADMIN)  # a cluster that no mount has used yet
        for part in parts:
            found = await (self.ns.make_or_find_dir(current, part, 0o755, ADMIN) if make
                           else self.ns.lookup(current, part))
            if not found.is_dir:
                raise FsError(errno.ENOTDIR, f"{part!r} is not a directory")
            current = found.ino
        return current

    async def put(self, req: Request) -> Response:
        path = self.api.name_of(req, "/v1/files/")
        checksum = self.api.body_checksum(req)
        size = self.api.upload_size(req)
        mode = req.int_arg("mode", 0o644) & 0o7777
        mtime_ns = req.int_arg("mtime_ns", 0) or time.time_ns()
        given = req.query.get("ino")
        ino = parse_ino(given) if given is not None else self.ns.new_ino()
        if ino is None or not 1 < ino <= MAX_INO:
            raise HTTPError(400, "ino must be 16 hex digits")
        record = data_name(ino)
        chunked = size > CHUNK_SIZE  # (stored in chunks by this node: no holder to send it to)
        if (given is None and not chunked and req.query.get("direct") == "1"
                and size >= BULK_MIN):
            redirect = await self.api.upload_redirect(record, req.target,
                                                      {"ino": f"{ino:016x}"})
            if redirect is not None:
                return redirect
        with answering(path):
            parts, leaf = split_path(path)
            directory = await self._directory(parts, make=True)
            made = await self.ns.records.apply(Op("make_inode", ino, {
                "ino": ino, "mode": stat.S_IFREG | mode, "uid": 0, "gid": 0, "rdev": 0,
                "parent": directory}))
            try:
                if chunked:
                    entry = await self.rt.chunks.store_stream(ino, req.stream(), size,
                                                              checksum, mtime_ns)
                else:
                    entry = await self.rt.dataplane.writes.insert_stream(
                        record, req.stream(), size, checksum, 0, mtime_ns)
                bound = await self._bind(directory, leaf, ino)
            except BaseException:
                with trio.CancelScope(shield=True):
                    await self.ns.drop_links(ino, 1)
                raise
        assert made.inode is not None
        inode = made.inode.join(entry)
        return Response.json({"path": path, "version": [bound.version.clock,
                                                        bound.version.writer.hex()],
                              "inode": inode_to_json(inode), "tuple": tuple_to_json(entry)})

    async def _bind(self, directory: int, name: str, ino: int) -> Any:
        """Make ``name`` in ``directory`` name ``ino``, replacing a file it named; the tuple
        of the entry written."""
        for attempt in range(1, BIND_ATTEMPTS + 1):
            old: Entry | None = await self.ns.records.entry(directory, name)
            if old is not None and old.is_dir:
                raise FsError(errno.EISDIR, f"{name!r} is a directory")
            try:
                result = await self.ns.records.apply(Op("add_entry", directory, {
                    "directory": directory, "name": name, "child": ino,
                    "kind": stat.S_IFREG, "replace_ok": True,
                    "expect": old.ino if old is not None else 0}))
            except FsError as exc:
                if exc.errno != errno.ESTALE or attempt == BIND_ATTEMPTS:
                    raise
                continue
            if old is not None:
                await self.ns.drop_links(old.ino, 1)
            return next(t for t in result.tuples if t.name.startswith("e/"))
        raise AssertionError("unreachable")

    async def get(self, req: Request) -> Response:
        started = time.perf_counter()
        path = self.api.name_of(req, "/v1/files/")
        self.api.verify(req, EMPTY_DIGEST)
        inode = await self._regular(path)
        if inode.content is None:  # made and never written: empty
            from daemon.api import meta_headers
            return Response(200, b"", meta_headers(0, inode.mode & 0o7777, inode.mtime_ns,
                                                   EMPTY_DIGEST, 0))
        return await self.api.read_answer(req, data_name(inode.ino), started)

    async def _regular(self, path: str) -> Inode:
        with answering(path):
            inode = await self.ns.resolve(path)
        if inode.is_dir:
            raise fs_error(FsError(errno.EISDIR, "a directory has no content"), path)
        if not stat.S_ISREG(inode.mode):
            raise HTTPError(409, f"{path}: not a regular file", {"errno": "EINVAL"})
        return inode

    def _target(self, req: Request, prefix: str) -> tuple[str, list[str], str]:
        """A bodiless request's path: (the path, its directories, its last name)."""
        path = self.api.name_of(req, prefix)
        self.api.verify(req, EMPTY_DIGEST)
        parts, leaf = split_path(path)
        return path, parts, leaf

    async def delete(self, req: Request) -> Response:
        path, parts, leaf = self._target(req, "/v1/files/")
        with answering(path):
            directory = await self._directory(parts, make=False)
            entry = await self.ns.records.entry(directory, leaf)
            if entry is not None and entry.is_dir:
                await self.ns.rmdir(directory, leaf)
            else:
                await self.ns.unlink(directory, leaf)
        return Response.json({"deleted": path})

    async def stat(self, req: Request) -> Response:
        path, parts, leaf = self._target(req, "/v1/stat/")
        with answering(path):
            directory = await self._directory(parts, make=False)
            bound = await self.records.record(entry_name(directory, leaf))
            inode = await self.ns.lookup(directory, leaf)
            record = inode_name(inode.ino)
            holders, _ = await self.rt.dataplane.placement(record)
            content = (await self.rt.dataplane.find(data_name(inode.ino))
                       if inode.content is not None else None)
            own = await self.rt.dataplane.find(record)
        shown = content if content is not None else own
        version = None if bound is None else [bound.version.clock, bound.version.writer.hex()]
        return Response.json({
            "path": path, "version": version, "inode": inode_to_json(inode),
            "tuple": None if shown is None else tuple_to_json(shown),
            "group": self.rt.node.group_of(record),
            "holders": [entry_to_json(h) for h in holders]})

    async def listing(self, req: Request) -> Response:
        self.api.verify(req, EMPTY_DIGEST)
        try:
            prefix = validate_prefix(req.query.get("prefix", ""))
        except NameError_ as exc:
            raise HTTPError(400, str(exc)) from exc
        parts, start = split_path(prefix) if prefix else ([], "")
        objects: list[dict[str, Any]] = []
        missing: set[int] = set()
        try:
            top = await self._directory(parts, make=False) if parts else ROOT_INO
        except FsError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                return Response.json({"objects": [], "unreachable_groups": []})
            raise fs_error(exc, prefix) from exc
        base = "/".join(parts)
        await self._walk(top, base, start, objects, missing)
        objects.sort(key=lambda o: o["name"])
        return Response.json({"objects": objects, "unreachable_groups": sorted(missing)})

    async def _walk(self, directory: int, base: str, start: str, out: list[dict[str, Any]],
                    missing: set[int]) -> None:
        try:
            entries = await self.ns.readdir(directory)
        except (FsError, DataError):
            missing.add(self.rt.node.group_of(inode_name(directory)))
            return
        for entry in entries:
            if not entry.name.startswith(start):
                continue
            path = f"{base}/{entry.name}" if base else entry.name
            if entry.is_dir:
                await self._walk(entry.ino, path, "", out, missing)
                continue
            try:
                inode = await self.ns.records.inode(entry.ino)
            except (FsError, DataError):
                missing.add(self.rt.node.group_of(inode_name(entry.ino)))
                continue
            if inode is None:
                continue
            version = inode.content or inode.version
            out.append({"name": path, "size": inode.size, "mode": inode.mode & 0o7777,
                        "type": stat.S_IFMT(inode.mode) >> 12, "mtime_ns": inode.mtime_ns,
                        "clock": 0 if version is None else version.clock})


def add_routes(router: Router, rt: NodeRuntime, api: _Api) -> None:
    paths = PathApi(rt, api)
    router.add("PUT", "/v1/files/", paths.put)
    router.add("GET", "/v1/files/", paths.get)
    router.add("DELETE", "/v1/files/", paths.delete)
    router.add("GET", "/v1/files", paths.listing)
    router.add("GET", "/v1/stat/", paths.stat)
