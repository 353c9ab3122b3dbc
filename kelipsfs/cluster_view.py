"""What a kelipsfs mount asks of its node: the trio-side half of ``kelipsfs.fuse_ops``.

``ClusterView``'s methods are what the FUSE callbacks need from the cluster (look a name up,
list a prefix, fetch a version into a local file, insert one, delete, rename by copy, rewrite
metadata, the read-only extended attributes). Every one runs in the node's trio thread: the
callbacks call them through ``trio.from_thread.run`` with the captured token. Nothing here
takes a lock of ``kelipsfs.fuse_ops``, so a callback that holds one while it waits cannot
deadlock; disk work (copies, hashing, writes of fetched bytes) goes to worker threads so the
gossip loop never blocks on the disk.

The helpers beside it are the shapes these methods return (``Fetched``, ``DirInfo``) and the
local directories a mount writes its copies into (``prepare_local_dirs``).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import secrets
import shutil
import time
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, cast

import trio

from daemon.core.messages import TupleEntry
from daemon.dataplane import Changed, DataError, DataPlane, NotFound, TransferFailed
from daemon.digest import file_digest

if TYPE_CHECKING:
    from daemon.runtime import NodeRuntime

log = logging.getLogger("kelipsfs.fuse")

#: Read-only extended attributes live in this namespace.
XATTR_PREFIX = "user.kelips."
#: Linux caps one xattr value (and a name list) at 64 KiB; larger values are paged.
XATTR_MAX = 64 * 1024
#: Bytes gathered from a remote holder before one write to the cache file.
FETCH_BATCH = 1 << 20


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view = view[written:]


def _materialize(source: Path, dest: Path, checksum: bytes, link: bool) -> bool:
    """Make ``dest`` a copy of a local store file (worker thread); False if that failed.

    A hard link when the caller only reads it (no bytes copied: the store never writes a
    committed file again, and the link keeps the inode when the store replaces the version);
    its reads are verified as they go (``LocalCopy``) rather than by hashing it all here
    first. A real copy, verified now, when the caller will write to it.
    """
    try:
        if link:
            os.link(source, dest)
            return True
        shutil.copyfile(source, dest)
        if file_digest(dest) == checksum:
            return True
        log.warning("local copy %s does not match its checksum; fetching instead", source)
    except OSError as exc:
        log.debug("cannot use the local copy %s: %s", source, exc)
    dest.unlink(missing_ok=True)
    return False


class Fetched(NamedTuple):
    """What was fetched into a local file: the version's metadata."""

    size: int
    checksum: bytes
    mode: int
    mtime_ns: int
    clock: int
    #: A link to a store file this process did not write: check it while it is read.
    verify: bool = False


class DirInfo(NamedTuple):
    """A name that is a directory (a prefix of objects); mtime is the newest object's."""

    mtime_ns: int


def prepare_local_dirs(data_dir: Path) -> tuple[Path, Path]:
    """(spool, cache) under ``data_dir``, emptied: leftovers of a crashed mount are garbage."""
    spool, cache = data_dir / "spool", data_dir / "cache"
    for directory in (spool, cache):
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    return spool, cache



class ClusterView:
    """What the callbacks ask of the node. Every method runs in the node's trio thread."""

    def __init__(self, runtime: NodeRuntime, spool_dir: Path) -> None:
        self._rt = runtime
        self._spool = spool_dir

    @property
    def _dp(self) -> DataPlane:
        return self._rt.dataplane

    async def kind(self, name: str) -> TupleEntry | DirInfo | None:
        """The file's tuple, DirInfo for a directory (a non-empty prefix), or None."""
        try:
            entry: TupleEntry = await self._dp.stat(name)
            return entry
        except NotFound:
            pass
        items, _missing = await self._dp.listing(name + "/")
        if items:
            return DirInfo(max(int(i["mtime_ns"]) for i in items))
        return None

    async def listing(self, prefix: str) -> list[dict[str, Any]]:
        items, missing = await self._dp.listing(prefix)
        if missing:
            log.warning("listing of %r is incomplete: groups %s did not answer", prefix, missing)
        return list(items)

    async def complete_listing(self, prefix: str) -> list[dict[str, Any]]:
        """A listing that must not miss anything (rmdir, directory rename): EIO otherwise."""
        items, missing = await self._dp.listing(prefix)
        if missing:
            raise DataError(f"groups {missing} did not answer; cannot list {prefix!r} fully")
        return list(items)

    async def fetch(self, name: str, dest: Path, *, link_ok: bool) -> Fetched:
        """Put the current version of ``name`` into the new file ``dest``, verified.

        If this node's store holds the current version, that copy is linked (``link_ok``;
        checked while it is read unless this process wrote it, see ``StoredObject``) or
        copied and re-hashed; otherwise the bytes stream from the nearest live holder
        (``DataPlane.open_read`` verifies size and digest at the end) in ~1 MiB writes done
        in worker threads, so the trio loop never blocks on the disk.
        """
        obj = self._rt.store.get(name)
        if obj is not None and not obj.tombstone and obj.path is not None:
            found = await self._dp.locate(name)
            entry = found.entry
            if entry is None or entry.tombstone:
                raise NotFound(f"{name}: no such object")
            if obj.version >= entry.version and await trio.to_thread.run_sync(
                    _materialize, obj.path, dest, obj.checksum, link_ok):
                return Fetched(obj.size, obj.checksum, obj.mode, obj.mtime_ns, obj.version.clock,
                               verify=link_ok and not obj.written_here)
        try:
            return await self._fetch_streamed(name, dest)
        except TransferFailed as exc:  # e.g. the copy being read was replaced by a newer write
            log.info("%s; reading it again", exc.message)
            return await self._fetch_streamed(name, dest)

    async def _fetch_streamed(self, name: str, dest: Path) -> Fetched:
        """``fetch`` from the nearest live holder (this node's store included)."""
        meta, stream_of = await self._dp.open_read(name)
        # An async generator (DataPlane._stream): closing it releases the holder's connection.
        chunks = cast(AsyncGenerator[bytes, None], stream_of)
        fd = await trio.to_thread.run_sync(
            os.open, dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        ok = False
        try:
            pending: list[bytes] = []
            size = 0
            async with contextlib.aclosing(chunks) as stream:
                async for chunk in stream:
                    pending.append(chunk)
                    size += len(chunk)
                    if size >= FETCH_BATCH:
                        block, pending, size = b"".join(pending), [], 0
                        await trio.to_thread.run_sync(_write_all, fd, block)
            if pending:
                await trio.to_thread.run_sync(_write_all, fd, b"".join(pending))
            ok = True
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(os.close, fd)
                if not ok:
                    await trio.to_thread.run_sync(dest.unlink, True)
        return Fetched(meta.size, meta.checksum, meta.mode, meta.mtime_ns, meta.clock)

    async def insert(self, name: str, source: Path, size: int, checksum: bytes, mode: int,
                     mtime_ns: int) -> TupleEntry:
        """Insert a local file this mount wrote and will not write again (see
        ``DataPlane.insert``'s ``link_ok``: the spool copies itself before a later write)."""
        entry: TupleEntry = await self._dp.insert(name, source, size, checksum, mode, mtime_ns,
                                                  link_ok=True)
        return entry

    async def delete(self, name: str) -> None:
        await self._dp.delete(name)

    async def rewrite(self, name: str, mode: int | None, mtime_ns: int | None) -> None:
        """Store the current content again with new metadata (chmod, utimens). Not stamped
        again above a newer version that overtakes it (``overwrite=False``): that would store
        the old content over another writer's; it fails instead (EIO), as a race lost."""
        tmp = self._spool / f"meta-{secrets.token_hex(8)}"
        try:
            meta = await self.fetch(name, tmp, link_ok=True)
            await self._dp.insert(name, tmp, meta.size, meta.checksum,
                                  meta.mode if mode is None else mode,
                                  meta.mtime_ns if mtime_ns is None else mtime_ns,
                                  link_ok=True, overwrite=False)
        finally:
            await trio.to_thread.run_sync(tmp.unlink, True)

    async def truncate(self, name: str, length: int) -> None:
        """Cut (or zero-extend, sparsely) the stored object to ``length`` bytes (made from the
        current content unless ``length`` is 0: not stamped again over a newer version)."""
        entry: TupleEntry = await self._dp.stat(name)
        tmp = self._spool / f"trunc-{secrets.token_hex(8)}"
        try:
            if length == 0:
                await trio.to_thread.run_sync(tmp.touch)
            else:
                await self.fetch(name, tmp, link_ok=False)
            checksum = await trio.to_thread.run_sync(_truncate_and_hash, tmp, length)
            await self._dp.insert(name, tmp, length, checksum, entry.mode, time.time_ns(),
                                  link_ok=True, overwrite=length == 0)
        finally:
            await trio.to_thread.run_sync(tmp.unlink, True)

    async def move_file(self, old: str, new: str) -> None:
        """Rename one object: copy it (content and metadata) under ``new``, then delete ``old``
        if it is still the version copied. A write to ``old`` through another mount that
        landed after the copy stays (as if it came after the rename) instead of being
        deleted with the copied version; the window left is the delete's own few ms."""
        tmp = self._spool / f"mv-{secrets.token_hex(8)}"
        try:
            meta = await self.fetch(old, tmp, link_ok=True)
            await self.insert(new, tmp, meta.size, meta.checksum, meta.mode, meta.mtime_ns)
        finally:
            await trio.to_thread.run_sync(tmp.unlink, True)
        try:
            await self._dp.delete(old, only_clock=meta.clock)
        except Changed as exc:
            log.info("rename of %s: %s", old, exc.message)

    async def move_tree(self, old: str, new: str) -> None:
        """Rename a directory: every object under ``old/`` moves under ``new/``."""
        for item in await self.complete_listing(old + "/"):
            await self.move_file(item["name"], new + item["name"][len(old):])

    def usage(self) -> tuple[int, int, int]:
        return self._rt.store.usage()

    def group_of(self, name: str) -> int:
        group: int = self._rt.node.group_of(name)
        return group

    def root_xattrs(self) -> dict[str, bytes]:
        node = self._rt.node
        status = self._rt.status()
        members = "".join(
            json.dumps({"id": row["id"], "address": row["address"], "group": row["group"],
                        "state": row["state"], "heartbeat": row["heartbeat"],
                        "role": row["role"]}) + "\n"
            for row in status["members"])
        contacts: dict[str, list[dict[str, Any]]] = {}
        for group, ids in sorted(node.contacts.items()):
            rows = []
            for nid in ids:
                m = node.members.get(nid)
                if m is not None:
                    rows.append({"id": nid.hex(), "address": f"{m.host}:{m.port}",
                                 "state": m.status.value,
                                 "rtt_ms": None if m.rtt is None else round(m.rtt * 1000, 2)})
            contacts[str(group)] = rows
        values = {"node_id": node.node_id.hex(), "group": str(node.group),
                  "k": str(self._rt.settings.core.k), "members": members,
                  "contacts": json.dumps(contacts, indent=1) + "\n"}
        return _paged({XATTR_PREFIX + key: value.encode() for key, value in values.items()})

    async def file_xattrs(self, name: str) -> dict[str, bytes]:
        """The file's placement facts; {} for a directory (it has none)."""
        found = await self._dp.locate(name)
        entry = found.entry
        if entry is None or entry.tombstone:
            return {}
        node = self._rt.node
        addresses = {h.node_id: f"{h.host}:{h.port}" for h in found.holders}
        addresses[node.node_id] = f"{node.host}:{node.port}"
        for nid in entry.holders:
            m = node.members.get(nid)
            if nid not in addresses and m is not None:
                addresses[nid] = f"{m.host}:{m.port}"
        holders = [{"id": nid.hex(), "address": addresses.get(nid)} for nid in entry.holders]
        values = {"group": str(node.group_of(name)),
                  "version": f"{entry.version.clock}:{entry.version.writer.hex()}",
                  "holders": json.dumps(holders) + "\n",
                  "checksum": entry.checksum.hex()}
        return _paged({XATTR_PREFIX + key: value.encode() for key, value in values.items()})


def _truncate_and_hash(path: Path, length: int) -> bytes:
    with open(path, "r+b") as fh:
        fh.truncate(length)
    return file_digest(path)


def _paged(values: dict[str, bytes]) -> dict[str, bytes]:
    """Values over 64 KiB become NAME.0, NAME.1, ... split at line ends (where possible)."""
    out: dict[str, bytes] = {}
    for key, value in values.items():
        if len(value) <= XATTR_MAX:
            out[key] = value
            continue
        page, index = b"", 0
        for line in value.splitlines(keepends=True):
            while len(line) > XATTR_MAX:  # one line longer than a page: cut it
                if page:
                    out[f"{key}.{index}"], page, index = page, b"", index + 1
                out[f"{key}.{index}"], line, index = line[:XATTR_MAX], line[XATTR_MAX:], index + 1
            if len(page) + len(line) > XATTR_MAX:
                out[f"{key}.{index}"], page, index = page, b"", index + 1
            page += line
        if page:
            out[f"{key}.{index}"] = page
    return out
