"""The primary of an inode: the node that applies namespace operations on it, one at a time.

Every record about an inode is placed by ``i/<ino>`` (``daemon.core.keys``), so its r holders
hold all of them. A mount sends an operation (``daemon.namespace.ops.Op``) to the first live
holder in placement order -- the next one when that cannot be reached -- and that node:

1. takes the inode's lock (operations on one inode never interleave here; one that changes
   a second inode placed with it, such as a create, takes that inode's lock too);
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

import errno
import functools
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING

from daemon.core.inodes import FsError, Write
from daemon.core.keys import inode_name, placement_key
from daemon.core.messages import MemberEntry, TupleEntry
from daemon.core.tuples import with_holders
from daemon.data_errors import DataError, InsertFailed, Superseded, Unavailable
from daemon.namespace.memory import stamp_writes
from daemon.namespace.ops import Op, Result, locked_inodes, run
from daemon.peers import PeerError, stream_of
from daemon.quick_lock import QuickLocks
from daemon.quorum import background_for, corrections, until_enough
from daemon.store_layout import StaleVersion, StoreError
from daemon.wire import record_to_json
from daemon.writes import INSERT_ATTEMPTS

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
        self._locks: QuickLocks[int] = QuickLocks()

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
        async with self._locks.hold_all(locked_inodes(op)):
            for attempt in range(1, INSERT_ATTEMPTS + 1):
                wall = self.rt.wall()
                version = node.new_version(int(wall * 1000))
                outcome = run(op, _NodeView(self.rt), int(wall * 1e9), version.clock)
                written: list[TupleEntry] = []
                if not outcome.writes:
                    break
                placements = self._placements(key, holders, outcome.writes)
                try:
                    written = await self._commit(stamp_writes(outcome.writes, version, ()),
                                                 placements)
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

    def _placements(self, key: str, holders: list[MemberEntry], writes: list[Write]
                    ) -> dict[str, list[MemberEntry]]:
        """The holders of every placement key an operation writes. An operation may write
        records of another inode only where this node is that inode's primary too (a create
        of an inode placed with its directory): EAGAIN when the placement has moved since
        the asker chose it, and the asker makes the inode in a step of its own."""
        node = self.rt.node
        placements = {key: holders}
        for w in writes:
            other = placement_key(w.name)
            if other not in placements:
                placed = node.placement(other)
                if node.group_of(other) != node.group or not placed \
                        or placed[0].node_id != node.node_id:
                    raise FsError(errno.EAGAIN, f"{other} is no longer placed with {key}")
                placements[other] = placed
        return placements

    async def _commit(self, records: list[tuple[TupleEntry, bytes | None]],
                      placements: dict[str, list[MemberEntry]]) -> list[TupleEntry]:
        """Store ``records`` on their holders (a write quorum of each placement key's), then
        publish their tuples."""
        stored: list[MemberEntry] = []
        errors: list[str] = []
        failed: list[bytes] = []
        newer: list[int] = []
        acknowledged: list[TupleEntry] = []  # (the tuples returned, for ``late``)
        members: dict[bytes, MemberEntry] = {}
        given: dict[bytes, list[tuple[TupleEntry, bytes | None]]] = {}
        # Each tuple goes out naming every holder it is sent to, and the holders publish it
        # as they store it (no second round to tell them); only when some holder failed does
        # a corrected tuple (the ones that stored it, a higher holder epoch) follow.
        planned: dict[str, tuple[bytes, ...]] = {}
        sent: list[tuple[TupleEntry, bytes | None]] = []
        for t, content in records:
            key = placement_key(t.name)
            if key not in planned:
                planned[key] = tuple(sorted(h.node_id for h in placements[key]))
            t = t._replace(holders=planned[key])
            sent.append((t, content))
            for holder in placements[key]:
                members[holder.node_id] = holder
                given.setdefault(holder.node_id, []).append((t, content))

        async def store_on(holder: MemberEntry) -> None:
            mine = given[holder.node_id]
            try:
                if holder.node_id == self.rt.node.node_id:
                    held = await store_records(self.rt, mine)
                else:
                    doc = {"records": [record_to_json(t, c) for t, c in mine],
                           "publish": True}
                    answer, _ = await self.rt.dataplane.peers.call_json(
                        "POST", holder.address, "/v1/records", doc=doc)
                    held = [int(c) for c in answer.get("newer", [])]
                if held:
                    newer.extend(held)
                else:
                    stored.append(holder)
            except (PeerError, StoreError, OSError, ValueError, TypeError) as exc:
                errors.append(f"{holder.host}:{holder.port}: {exc}")
                failed.append(holder.node_id)

        quorum = self.rt.settings.write_quorum or 1

        def enough() -> bool:
            done = {h.node_id for h in stored}
            return bool(newer) or all(sum(1 for h in ids if h in done) >= quorum
                                      for ids in planned.values())

        async def late() -> None:
            """The holders still storing at the acknowledgement are done: correct the tuples
            if some of them failed."""
            if newer:
                self.rt.node.observe_version(max(newer))
            late_tuples = corrections(acknowledged, stored)
            if late_tuples:
                log.info("%d records of an operation were not stored on every holder: %s",
                         len(late_tuples), "; ".join(errors))
                await self.rt.dataplane.writes.publish_many(late_tuples, stored)

        jobs = [functools.partial(store_on, holder) for holder in members.values()]
        await until_enough(jobs, enough, background_for(self.rt), late)
        if newer:
            self.rt.node.observe_version(max(newer))
            raise Superseded("a holder keeps a newer version of a record of this operation")
        done = {h.node_id for h in stored}
        tuples: list[TupleEntry] = []
        corrected = False
        for t, _ in sent:
            ids = tuple(h for h in t.holders if h in done)
            if len(ids) < quorum:
                raise InsertFailed(f"stored on {len(ids)} of {len(t.holders)} holders, "
                                   f"{quorum} required: {'; '.join(errors) or 'no holder'}")
            if any(h in failed for h in t.holders):
                t = with_holders(t, tuple(h for h in t.holders if h not in failed))
                corrected = True
            tuples.append(t)
        acknowledged.extend(tuples)
        # This node's own tuples and the announce to the rest of the group, always; the
        # other holders only when what they published needs correcting.
        await self.rt.dataplane.writes.publish_many(tuples, stored if corrected else [])
        return tuples



async def store_records(rt: NodeRuntime, records: Iterable[tuple[TupleEntry, bytes | None]],
                        *, publish: bool = False) -> list[int]:
    """Store small records (content in hand; None: a tombstone) in this node's store; the
    clocks of newer versions held here that refused some of them (they stay). ``publish``:
    the tuples of those stored go to this node's tuples too (they name their holders)."""
    newer = []
    now = rt.now()
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
            continue
        if publish:
            rt.node.record_write(now, t)
    return newer


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


__all__ = ["FsError", "NotPrimary", "Primary", "store_records"]
