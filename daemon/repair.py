"""Repair: copies a node makes so every object of its group keeps r live holders, and local
copies it drops once the group has moved past them.

The core (``KelipsNode.repair_tasks``) plans the copies -- exactly one member drives each --
and this runs them: a small record of the log is sent whole, as a primary would; a file is
sent with sendfile; a target that refuses is replaced by the next spare.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import trio

from daemon.core.messages import MemberEntry, TupleEntry
from daemon.logs import fields, short_id
from daemon.peers import PeerError
from daemon.wire import record_to_json, version_query

if TYPE_CHECKING:
    from daemon.dataplane import DataPlane

log = logging.getLogger("kelipsfs.data")

#: Seconds between periodic repair checks (a failure wakes the loop at once).
REPAIR_PERIOD = 1.0
#: Seconds between passes that drop local copies the group has moved past.
RECONCILE_PERIOD = 10.0
#: Objects looked at between two turns of the event loop.
RECONCILE_BATCH = 256


class Repairer:
    """Runs the repair tasks the core plans (see the module docstring)."""

    def __init__(self, dataplane: DataPlane) -> None:
        self._dp = dataplane
        self._wake = trio.Event()
        self._next = 0.0

    def wake(self) -> None:
        self._wake.set()

    def tick(self, now: float) -> None:
        """Wake the repair loop once a ``REPAIR_PERIOD``. Called by the runtime's timer loop
        at every wakeup it makes anyway (at least every gossip interval), so the periodic
        repair check costs no wakeup of its own; a failure wakes the loop at once. A check due
        within a quarter period runs now: the wakeups come a little after their deadlines,
        and a strict comparison would put every other check off by a whole gossip interval."""
        if now + 0.25 * REPAIR_PERIOD >= self._next:
            self._next = now + REPAIR_PERIOD
            self._wake.set()

    async def loop(self) -> None:
        next_reconcile = self._dp.rt.now() + RECONCILE_PERIOD
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            for task in self._dp.node.repair_tasks(self._dp.rt.now()):
                try:
                    await self._repair(task.entry, list(task.targets), list(task.spares))
                except Exception:  # background work: one bad task must not stop the node
                    log.exception("repair of %s failed", task.entry.name)
            if self._dp.rt.now() >= next_reconcile:
                next_reconcile = self._dp.rt.now() + RECONCILE_PERIOD
                await self.reconcile()

    async def reconcile(self) -> None:
        """Drop local copies the group has moved past: an older version than the group's
        tuple that no longer names this node (it came back with old data), and tombstones
        whose tuple has expired."""
        if not self._dp.node.synced:
            return
        now_ns = time.time_ns()
        ttl_ns = int(self._dp.node.config.tombstone_ttl * 1e9)
        for done, obj in enumerate(self._dp.rt.store.objects()):
            if done % RECONCILE_BATCH == RECONCILE_BATCH - 1:
                await trio.lowlevel.checkpoint()  # a large store: let requests in between
            if self._dp.rt.store.get(obj.name) is not obj:
                continue  # changed since the pass began: the next pass sees what it is now
            if self._dp.node.group_of(obj.name) != self._dp.node.group:
                continue
            current = self._dp.node.tuples.get(obj.name)
            if current is None:
                if obj.tombstone and now_ns - obj.mtime_ns > ttl_ns:
                    await self._dp.rt.store.drop(obj.name, version=obj.version)
                continue
            if current.version > obj.version and self._dp.node.node_id not in current.holders:
                if current.tombstone:
                    await self._dp.rt.store.delete(obj.name, current.version,
                                               mtime_ns=current.mtime_ns)
                else:
                    await self._dp.rt.store.drop(obj.name, version=obj.version)
                log.info("dropped stale copy of %s", obj.name)

    async def _repair(self, entry: TupleEntry, targets: list[MemberEntry],
                      spares: list[MemberEntry]) -> None:
        """Copy to ``targets``; each one that refuses is replaced by the next spare."""
        obj = self._dp.rt.store.get(entry.name)
        if obj is None or obj.tombstone or obj.version != entry.version or (
                obj.path is None and obj.log is None):
            return
        logged = self._dp.rt.store.read_small(obj, obj.size) if obj.log is not None else None
        added: list[bytes] = []
        needed = len(targets)
        for target in targets + spares:
            if len(added) == needed:
                break
            try:
                if logged is not None:  # a small record of the log: sent whole, as a primary
                    answer, _ = await self._dp.peers.call_json(
                        "POST", target.address, "/v1/records",
                        doc={"records": [record_to_json(entry, logged)]})
                    if answer.get("newer"):
                        continue
                elif obj.path is not None:
                    await self._dp.peers.put_file(target.address, "/v1/replica/" + entry.name,
                                              version_query(entry.version, entry.mode,
                                                             entry.mtime_ns, entry.size,
                                                             entry.attrs),
                                              obj.path, entry.checksum, entry.size)
                else:
                    return  # its logged content no longer matches its digest: not copied
                added.append(target.node_id)
            except PeerError as exc:
                log.warning("repair copy of %s to %s:%d failed: %s", entry.name, target.host,
                            target.port, exc,
                            extra=fields(event="repair_copy_failed", name=entry.name,
                                         target=f"{target.host}:{target.port}"))
            except FileNotFoundError:
                # Overwritten or deleted since the task was planned: the copy to make is no
                # longer this one, and the next round plans from the new tuple.
                log.info("repair of %s skipped: the local copy changed meanwhile", entry.name)
                break
        if not added:
            return
        updated = self._dp.node.repair_done(self._dp.rt.now(), entry, tuple(added))
        self._dp.rt.metrics.inc("kelips_repairs_total", len(added))
        log.info("repaired %s: %d new cop%s", entry.name, len(added),
                 "y" if len(added) == 1 else "ies",
                 extra=fields(event="repair_done", name=entry.name,
                              targets=[short_id(node_id) for node_id in added],
                              version=entry.version.clock))
        holders = [m.entry() for m in self._dp.node.own_alive() if m.node_id in updated.holders]
        await self._dp.writes.publish(updated, holders)
