"""The primary of an inode: the node that applies namespace operations on it, one at a time.

Every record about an inode is placed by ``i/<ino>`` (``daemon.core.keys``), so its r holders
hold all of them. A mount sends an operation (``daemon.namespace.ops.Op``) to the first live
holder in placement order -- the next one when that cannot be reached -- and that node:

1. takes the inode's lock (operations on one inode never interleave here);
2. runs the operation's rule (``daemon.core.inodes``) on the records its group's tuples and
   its store say are current, and stamps what the rule writes with one new version;
3. stores those records on every holder it can reach -- itself included -- fsynced, and
   fails unless the write quorum stored them;
4. publishes their tuples (to the group at once, as any write) and answers.

A holder that is not first may act as primary when the first cannot be reached from the
asker, so two primaries are possible while a node is dying or the network is split. Each side
of a partition then keeps working, and when it heals the newest version of each record wins,
as for any object.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Iterable
from typing import TYPE_CHECKING, Any

import trio

from daemon.core.inodes import FsError
from daemon.core.keys import inode_name
from daemon.core.messages import MemberEntry, TupleEntry
from daemon.dataplane import INSERT_ATTEMPTS, DataError, InsertFailed, Superseded, Unavailable
from daemon.namespace.memory import stamp_writes
from daemon.namespace.ops import Op, Result, run
from daemon.peers import PeerError, stream_of
from daemon.store import StaleVersion, StoreError
from daemon.wire import tuple_from_json, tuple_to_json

if TYPE_CHECKING:
    from daemon.runtime import NodeRuntime

log = logging.getLogger("kelipsfs.namespace")


class NotPrimary(DataError):
    """This node does not hold the inode (the asker's view of the group is stale)."""

    status = 421


class Primary:
    """Applies namespace operations on the inodes this node holds (see the module docstring)."""

    def __init__(self, runtime: NodeRuntime) -> None:
        self.rt = runtime
        self._locks: dict[int, tuple[trio.Lock, int]] = {}

    async def apply(self, op: Op) -> tuple[Result, list[TupleEntry]]:
        """Apply ``op``; (its result, the tuples it wrote). FsError if the rule refuses."""
        node = self.rt.node
        key = inode_name(op.key)
        if node.group_of(key) != node.group:
            raise NotPrimary(f"inode {op.key:x} is not of this node's group")
        holders = node.placement(key)
        if all(h.node_id != node.node_id for h in holders):
            raise NotPrimary(f"inode {op.key:x} is not held here")
        if not node.synced:
            raise Unavailable("this node is still joining its group")
        async with self._locked(op.key):
            for attempt in range(1, INSERT_ATTEMPTS + 1):
                wall = self.rt.wall()
                version = node.new_version(int(wall * 1000))
                outcome = run(op, _NodeView(self.rt), int(wall * 1e9), version.clock)
                written: list[TupleEntry] = []
                if not outcome.writes:
                    break
                try:
                    written = await self._commit(stamp_writes(outcome.writes, version, ()),
                                                 holders)
                    break
                except Superseded as exc:
                    # A holder keeps a newer version of a record than this node's tuples
                    # say (another primary's while the network was split, or a clock
                    # ahead): this node now stamps above it, and the operation that
                    # finishes last is the one that stays, as for any write.
                    if attempt == INSERT_ATTEMPTS:
                        raise Unavailable(f"{exc.message}; gave up after {attempt} "
                                          "attempts") from exc
        return Result(outcome.inode, outcome.entry), written

    async def _commit(self, records: list[tuple[TupleEntry, bytes | None]],
                      holders: list[MemberEntry]) -> list[TupleEntry]:
        """Store ``records`` on ``holders`` (quorum), then publish their tuples."""
        stored: list[MemberEntry] = []
        errors: list[str] = []
        newer: list[int] = []

        async def store_on(holder: MemberEntry) -> None:
            try:
                if holder.node_id == self.rt.node.node_id:
                    held = await store_records(self.rt, records)
                else:
                    doc = {"records": [record_to_json(t, c) for t, c in records]}
                    answer, _ = await self.rt.dataplane.peers.call_json(
                        "POST", holder.address, "/v1/records", doc=doc)
                    held = [int(c) for c in answer.get("newer", [])]
                if held:
                    newer.extend(held)
                else:
                    stored.append(holder)
            except (PeerError, StoreError, OSError, ValueError, TypeError) as exc:
                errors.append(f"{holder.host}:{holder.port}: {exc}")

        async with trio.open_nursery() as nursery:
            for holder in holders:
                nursery.start_soon(store_on, holder)
        if newer:
            self.rt.node.observe_version(max(newer))
            raise Superseded("a holder keeps a newer version of a record of this operation")
        quorum = self.rt.settings.write_quorum or 1
        if len(stored) < quorum:
            raise InsertFailed(f"stored on {len(stored)} of {len(holders)} holders, {quorum} "
                               f"required: {'; '.join(errors) or 'no holder'}")
        ids = tuple(sorted(h.node_id for h in stored))
        tuples = [t._replace(holders=ids) for t, _ in records]
        await self.rt.dataplane.publish_many(tuples, stored)
        return tuples

    @contextlib.asynccontextmanager
    async def _locked(self, ino: int) -> AsyncIterator[None]:
        lock, users = self._locks.get(ino, (trio.Lock(), 0))
        self._locks[ino] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[ino]
            if users <= 1:
                del self._locks[ino]
            else:
                self._locks[ino] = (lock, users - 1)


async def store_records(rt: NodeRuntime, records: Iterable[tuple[TupleEntry, bytes | None]]
                        ) -> list[int]:
    """Store small records (content in hand; None: a tombstone) in this node's store; the
    clocks of newer versions held here that refused some of them (they stay)."""
    newer = []
    for t, content in records:
        try:
            if content is None:
                await rt.store.delete(t.name, t.version, mtime_ns=t.mtime_ns)
            else:
                await rt.store.put(t.name, t.version, t.mode, t.mtime_ns, stream_of(content),
                                   expected_checksum=t.checksum, expected_size=len(content),
                                   attrs=t.attrs)
        except StaleVersion as exc:
            log.info("%s: a newer version is already stored here; kept", t.name)
            newer.append(exc.held.clock)
    return newer


def record_to_json(t: TupleEntry, content: bytes | None) -> dict[str, Any]:
    return {"tuple": tuple_to_json(t), "content": None if content is None else content.hex()}


def record_from_json(doc: Any, limit: int) -> tuple[TupleEntry, bytes | None]:
    """A record sent by a primary (ValueError if malformed or over ``limit`` bytes)."""
    if not isinstance(doc, dict):
        raise ValueError("a record is an object")
    try:
        t = tuple_from_json(doc["tuple"])
    except (KeyError, TypeError) as exc:
        raise ValueError(f"malformed tuple: {exc}") from exc
    raw = doc.get("content")
    if raw is None:
        if not t.tombstone:
            raise ValueError(f"{t.name}: content missing")
        return t, None
    if not isinstance(raw, str) or len(raw) > 2 * limit:
        raise ValueError(f"{t.name}: content must be hex of at most {limit} bytes")
    return t, bytes.fromhex(raw)


class _NodeView:
    """``daemon.core.inodes.View`` over this node's group tuples and store."""

    def __init__(self, runtime: NodeRuntime) -> None:
        self._rt = runtime

    def record(self, name: str) -> TupleEntry | None:
        return self._rt.node.tuples.get(name)

    def entries(self, directory: int) -> Iterable[TupleEntry]:
        return self._rt.node.tuples.entries(directory)

    def content(self, name: str) -> bytes | None:
        obj = self._rt.store.get(name)
        current = self._rt.node.tuples.get(name)
        if obj is None or obj.tombstone or (current is not None
                                            and current.version != obj.version):
            return None
        return self._rt.store.read_small(obj, 2 << 20)


__all__ = ["FsError", "NotPrimary", "Primary", "record_from_json", "record_to_json",
           "store_records"]
