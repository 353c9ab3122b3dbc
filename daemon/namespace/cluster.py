"""The namespace's records on the cluster: ``daemon.namespace.vfs.Records`` for a node.

Reads come from where Kelips keeps tuples (``DataPlane.find``): a record of this node's own
group from its own tuple table (announced to every member before the write that made it
returns; a name not heard of is asked of the members that would hold it, in case that
announce was lost, unless this node is one of them), another group's by one lookup datagram
to a contact of that group; a directory's entries from one member of the directory's group.
Operations go to the inode's primary (``daemon.namespace.primary``): the first of its
holders that answers.
"""

from __future__ import annotations

import errno
import logging
import stat
from typing import TYPE_CHECKING

import trio

from daemon.core.inodes import Entry, FsError, Inode, entry_from_record
from daemon.core.keys import data_name, entry_name, entry_prefix, inode_name
from daemon.core.messages import MemberEntry, TupleEntry
from daemon.data_errors import DataError, NotFound, Unavailable
from daemon.namespace import ops
from daemon.namespace.ops import Op, Result
from daemon.namespace.primary import NotPrimary
from daemon.peers import PeerError
from daemon.store_layout import StoreError
from daemon.wire import tuple_from_json

if TYPE_CHECKING:
    from daemon.runtime import NodeRuntime

log = logging.getLogger("kelipsfs.namespace")


class ClusterRecords:
    """The records of the namespace, read and changed through this node."""

    def __init__(self, runtime: NodeRuntime) -> None:
        self.rt = runtime

    async def record(self, name: str) -> TupleEntry | None:
        """The newest tuple of ``name`` this node can learn (tombstones included): from its
        own tuples in its own group (a name it has not heard of is asked of the members that
        would hold it, in case the announce of a write that just happened was lost, unless
        it is one of them), else through a contact of the name's group."""
        node = self.rt.node
        if node.group_of(name) == node.group:
            held = node.tuples.get(name)
            if held is not None:
                return held
        return await self.rt.dataplane.find(name)

    async def inode(self, ino: int) -> Inode | None:
        found = await self.bare_inode(ino)
        if found is None or not stat.S_ISREG(found.mode):
            return found
        return found.join(await self.record(data_name(ino)))

    async def bare_inode(self, ino: int) -> Inode | None:
        t = await self.record(inode_name(ino))
        if t is None or t.tombstone:
            return None
        try:
            return Inode.from_record(ino, t)
        except ValueError:
            log.warning("inode record %s is malformed; treated as missing", t.name)
            return None

    async def entry(self, directory: int, name: str) -> Entry | None:
        t = await self.record(entry_name(directory, name))
        return entry_from_record(t) if t is not None else None

    async def entries(self, directory: int) -> list[Entry]:
        node = self.rt.node
        prefix = entry_prefix(directory)
        if node.group_of(prefix) == node.group:
            tuples = node.tuples.entries(directory)
        else:
            doc = await self.rt.dataplane.ask_group(prefix, "/v1/entries",
                                                    {"dir": directory})
            tuples = [tuple_from_json(t) for t in doc["entries"]]
        found = (entry_from_record(t) for t in tuples)
        return sorted((e for e in found if e is not None), key=lambda e: e.name)

    async def small_content(self, name: str) -> bytes:
        try:
            meta, stream = await self.rt.dataplane.open_read(name)
            data = b"".join([chunk async for chunk in stream])
        except NotFound as exc:
            raise FsError(errno.ENOENT, exc.message) from exc
        except DataError as exc:
            raise FsError(errno.EIO, exc.message) from exc
        if len(data) != meta.size:
            raise FsError(errno.EIO, f"{name}: short content")
        return data

    def placed_with(self, directory: int, ino: int) -> bool:
        """Same group and same first holder (known for this node's own group only)."""
        node = self.rt.node
        key, home = inode_name(ino), inode_name(directory)
        if node.group_of(key) != node.group or node.group_of(home) != node.group:
            return False
        ours, theirs = node.placement(key), node.placement(home)
        return bool(ours) and bool(theirs) and ours[0].node_id == theirs[0].node_id

    def primary_here(self, ino: int) -> bool | None:
        node = self.rt.node
        key = inode_name(ino)
        if node.group_of(key) != node.group:
            return None
        holders = node.placement(key)
        return bool(holders) and holders[0].node_id == node.node_id

    async def sync(self, ino: int) -> None:
        """Have every live holder of ``ino``'s placement make its logged records durable
        (the records of a namespace change are durable on their holders within a second
        anyway, as a local filesystem's journal commits: this is fsync's barrier)."""
        dp = self.rt.dataplane
        try:
            holders, _ = await dp.placement(inode_name(ino))
        except DataError as exc:
            raise FsError(errno.EIO, exc.message) from exc
        synced: list[bytes] = []
        errors: list[str] = []

        async def sync_on(holder: MemberEntry) -> None:
            try:
                if holder.node_id == self.rt.node.node_id:
                    await self.rt.store.sync()
                else:
                    await dp.peers.call_json("POST", holder.address, "/v1/records",
                                             doc={"records": [], "sync": True})
                synced.append(holder.node_id)
            except (PeerError, StoreError) as exc:
                errors.append(f"{holder.host}:{holder.port}: {exc}")

        async with trio.open_nursery() as nursery:
            for holder in holders:
                nursery.start_soon(sync_on, holder)
        if len(synced) < min(len(holders), self.rt.settings.write_quorum or 1):
            raise FsError(errno.EIO, f"inode {ino:x} synced on {len(synced)} of "
                                     f"{len(holders)} holders: {'; '.join(errors)}")

    async def apply(self, op: Op) -> Result:
        """Run ``op`` at the inode's primary: its holders in placement order, the first that
        answers (this node itself when it is that holder)."""
        dp = self.rt.dataplane
        node = self.rt.node
        try:
            holders, _ = await dp.placement(inode_name(op.key))
        except DataError as exc:
            raise FsError(errno.EIO, exc.message) from exc
        errors: list[str] = []
        for holder in holders:
            if holder.node_id == node.node_id:
                try:
                    result, written = await self.rt.primary.apply(op)
                except (NotPrimary, Unavailable) as exc:
                    errors.append(f"here: {exc.message}")
                    continue
                except DataError as exc:
                    raise FsError(errno.EIO, exc.message) from exc
                return Result(result.inode, result.entry, tuple(written))
            try:
                doc, _ = await dp.peers.call_json("POST", holder.address, "/v1/ns/op",
                                                  doc=ops.to_json(op))
            except PeerError as exc:
                errors.append(f"{holder.host}:{holder.port}: {exc}")
                if exc.status in (None, 421, 503):
                    continue
                raise FsError(errno.EIO, str(exc)) from exc
            if doc.get("errno"):
                raise FsError(int(doc["errno"]), str(doc.get("message", "")))
            now = self.rt.now()
            written = [tuple_from_json(t) for t in doc.get("tuples", [])]
            for t in written:
                node.merge_tuple(now, t)  # read-your-writes in this group
            result = ops.result_from_json(doc["result"])
            return Result(result.inode, result.entry, tuple(written))
        raise FsError(errno.EIO, f"no holder of inode {op.key:x} could apply {op.kind}: "
                                 f"{'; '.join(errors) or 'none known'}")
