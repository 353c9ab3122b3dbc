"""Objects stored by a version that named files by their path become files of the namespace.

Before the namespace, a file ``a/b/c.txt`` was one object named ``a/b/c.txt`` and an empty
directory a marker object ``a/.kelipsfs-dir``: *legacy* objects, named neither as records of
the namespace nor as raw objects (``daemon.core.keys.is_legacy``), so a copy repair made
of one on another node is one too.
After an upgrade each node converts the legacy objects it is the first live holder of: it
makes the missing directories, a new inode with the object's mode and mtime, stores the bytes
as that inode's content (from its own copy: no transfer), binds the name, and then deletes
the legacy object from the cluster (its other copies go with the tombstone). A crash between
two steps only repeats them at the next pass; a name that already holds a file with the same
content counts as converted. A name a user has bound to something else since the upgrade
keeps what the user put there: the legacy object is the older write, and it is dropped.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from typing import TYPE_CHECKING

import trio

from daemon.core.inodes import FsError
from daemon.core.keys import ROOT_INO, data_name
from daemon.data_errors import DataError, NotFound
from daemon.logs import fields
from daemon.namespace.cluster import ClusterRecords
from daemon.namespace.ops import Op
from daemon.namespace.vfs import Caller, Namespace
from daemon.store_layout import StoredObject

if TYPE_CHECKING:
    from daemon.runtime import NodeRuntime

log = logging.getLogger("kelipsfs.migrate")

#: The object that kept an empty directory in existence before the namespace.
DIR_MARKER = ".kelipsfs-dir"
#: Seconds between looks for legacy objects (one pass converts all this node should).
PASS_INTERVAL = 2.0


async def migrate_loop(rt: NodeRuntime) -> None:
    """Convert the legacy objects this node should, whenever it holds some: at start, and
    when repair brings it a copy of one (the node that held it may have died first)."""
    converter = Converter(rt)
    announced = False
    while True:
        if rt.store.legacy() and rt.node.synced:
            if not announced:
                log.info("converting objects stored by an earlier version into files of the "
                         "namespace", extra=fields(event="migration_started",
                                                   objects=len(rt.store.legacy())))
                announced = True
            if not await converter.run_pass():
                log.info("conversion done", extra=fields(event="migration_done",
                                                         converted=converter.converted))
                announced = False
        await trio.sleep(PASS_INTERVAL)


class Converter:
    def __init__(self, rt: NodeRuntime) -> None:
        self.rt = rt
        self.ns = Namespace(ClusterRecords(rt))
        self.owner = Caller(os.getuid(), os.getgid())
        self.converted = 0

    async def run_pass(self) -> int:
        """Convert what this node should; the number of legacy objects still here."""
        for obj in self.rt.store.legacy():
            if not self._mine(obj):
                continue
            try:
                await self.convert(obj)
                self.converted += 1
            except (FsError, DataError, OSError) as exc:
                log.warning("could not convert %r yet: %s", obj.name, exc)
        return len(self.rt.store.legacy())

    def _mine(self, obj: StoredObject) -> bool:
        """The first live holder of the legacy tuple converts (as the first repairs)."""
        node = self.rt.node
        entry = node.tuples.get(obj.name)
        if entry is None or entry.version != obj.version:
            return entry is None  # not heard of in the group: its holders are gone but us
        alive = {m.node_id for m in node.own_alive()} | {node.node_id}
        live = [h for h in entry.holders if h in alive]
        return not live or min(live) == node.node_id

    async def convert(self, obj: StoredObject) -> None:
        await self.ns.ensure_root(self.owner)
        parts = obj.name.split("/")
        directory = await self._directories(parts[:-1], obj.mode)
        leaf = parts[-1]
        if leaf != DIR_MARKER:
            await self._file(directory, leaf, obj)
        try:
            await self.rt.dataplane.writes.delete(obj.name, only_clock=obj.version.clock)
        except NotFound:
            pass
        except DataError as exc:
            log.info("legacy object %r converted; its deletion waits: %s", obj.name, exc)
            return
        await self.rt.store.drop(obj.name, version=obj.version)

    async def _directories(self, parts: list[str], mode: int) -> int:
        current = ROOT_INO
        for part in parts:
            try:
                found = await self.ns.lookup(current, part)
            except FsError as exc:
                if exc.errno != errno.ENOENT:
                    raise
                try:
                    found = await self.ns.mkdir(current, part, 0o755, self.owner)
                except FsError as again:
                    if again.errno != errno.EEXIST:
                        raise
                    found = await self.ns.lookup(current, part)
            if not found.is_dir:
                raise FsError(errno.ENOTDIR, f"{part!r} is a file now; {parts} cannot be made")
            current = found.ino
        return current

    async def _file(self, directory: int, leaf: str, obj: StoredObject) -> None:
        existing = await self.ns.records.entry(directory, leaf)
        if existing is not None:
            found = await self.ns.records.inode(existing.ino)
            same = None
            if found is not None and found.content is not None:
                same = await self.rt.dataplane.find(data_name(found.ino))
            if same is None or same.checksum != obj.checksum:
                log.warning("%r was written again since the upgrade; the older copy stored "
                            "before it is dropped", obj.name)
            return
        assert obj.path is not None
        ino = self.ns.new_ino()
        await self.ns.records.apply(Op("make_inode", ino, {
            "ino": ino, "mode": stat.S_IFREG | (obj.mode & 0o7777), "uid": self.owner.uid,
            "gid": self.owner.gid, "rdev": 0, "parent": directory}))
        try:
            await self.rt.dataplane.writes.insert(data_name(ino), obj.path, obj.size,
                                                  obj.checksum, 0, obj.mtime_ns)
            await self.ns.records.apply(Op("add_entry", directory, {
                "directory": directory, "name": leaf, "child": ino, "kind": stat.S_IFREG}))
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.ns.drop_links(ino, 1)
            raise
