"""Writes of the data path: insert (from a local file or a client's stream), publish, delete.

An insert is acknowledged only when ``write_quorum`` holders (default: at least one, every
reachable one tried) have the bytes fsynced; the tuple naming them is then published, so a
tuple never names a holder that does not have the version. A write overtaken on every holder
by a newer version is stamped above it and sent again (the write that finishes last stays).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from daemon.core.messages import MemberEntry, TupleEntry, Version
from daemon.core.node import KelipsNode
from daemon.core.tuples import with_holders
from daemon.data_errors import (
    Changed,
    ContentMismatch,
    InsertFailed,
    NotFound,
    Superseded,
    Unavailable,
)
from daemon.peers import (
    BULK_MIN,
    READ_IN_LOOP,
    LateDigest,
    PeerClient,
    PeerError,
    refusal,
    resolved,
    stream_of,
)
from daemon.quorum import background_for, corrections, until_enough
from daemon.store_layout import ChecksumMismatch, StaleVersion, StoreFull
from daemon.wire import tuple_to_json, version_query

if TYPE_CHECKING:
    from daemon.dataplane import DataPlane

log = logging.getLogger("kelipsfs.data")

_FAN_OUT_BLOCK = 1 << 20  # bytes per block teed to the holders of an upload
#: Attempts of an insert from a file or a delete whose holders keep a newer version each time
#: (each one stamped above the newest they named); more would mean writers overtaking it
#: without end.
INSERT_ATTEMPTS = 3


class Writes:
    """The writes of one node's data plane (placement and lookups are the plane's)."""

    def __init__(self, plane: DataPlane) -> None:
        self._plane = plane
        self.rt = plane.rt

    @property
    def node(self) -> KelipsNode:
        return self.rt.node

    @property
    def peers(self) -> PeerClient:
        return self._plane.peers

    # --- insert ------------------------------------------------------------------------------

    async def insert(self, name: str, source: Path | bytes, size: int, checksum: bytes,
                     mode: int, mtime_ns: int, *, link_ok: bool = False,
                     overwrite: bool = True, attrs: bytes = b"") -> TupleEntry:
        """Store ``source`` (a local file, or the bytes themselves) under ``name`` on the
        name's holders; returns the published tuple. ``checksum`` is the digest this process
        computed of ``source`` (this node's own copy of bytes is not hashed again; every
        other holder checks it).

        ``link_ok``: the caller computed ``checksum`` from the bytes it wrote and never writes
        ``source`` again, so this node's own copy (when it is a holder) may be a hard link to it
        (``ObjectStore.adopt_file``) instead of a copy.
        ``overwrite``: when a newer version overtakes this one on every holder, stamp it again
        above (new content: the write that finishes last stays). False for content made from
        an older version (a chmod, a truncate): Superseded instead, not stored over a write it
        never saw.
        """
        holders, _ = await self._plane.placement(name)
        if not holders:
            raise InsertFailed(f"{name}: no holder available in its group")
        once = functools.partial(self._insert_once, name, holders, source, size, checksum, mode,
                                 mtime_ns, link_ok, attrs)
        return await (until_not_overtaken(once) if overwrite else once())

    async def _insert_once(self, name: str, holders: list[MemberEntry], source: Path | bytes,
                           size: int, checksum: bytes, mode: int, mtime_ns: int, link_ok: bool,
                           attrs: bytes) -> TupleEntry:
        """One attempt of ``insert`` with a version stamped now. Superseded when no holder
        stored it because they hold a newer version (written concurrently, or stamped by a
        clock ahead of ours): the writer, which still has the bytes, tries again above it,
        so the write that finished last is the one that stays (what ``cp`` over a file
        promises), and no close reports a failure for a write that was only overtaken."""
        version = self.node.new_version(int(self.rt.wall() * 1000))
        stored: list[MemberEntry] = []
        errors: list[str] = []
        full: list[bool] = []
        newer: list[int] = []  # clocks of the newer versions holders refused ours for
        # Each holder publishes the tuple (naming every holder) as it stores the bytes, and
        # the first one announces it when this node is of another group: no second round.
        publishing = {"holders": ",".join(sorted(h.node_id.hex() for h in holders))}
        announcer = next((h.node_id for h in holders if h.node_id != self.node.node_id), None)
        if self.node.group_of(name) == self.node.group:
            announcer = None

        async def store_on(holder: MemberEntry) -> None:
            self.rt.metrics.inc("kelips_content_bytes_sent_total", size)
            try:
                if holder.node_id == self.node.node_id:
                    await self._store_here(name, version, mode, mtime_ns, source, size,
                                           checksum, link_ok, attrs)
                else:
                    query = version_query(version, mode, mtime_ns, size, attrs) | publishing
                    if holder.node_id == announcer:
                        query["announce"] = 1
                    await self.peers.put_file(holder.address, "/v1/replica/" + name, query,
                                              source, checksum, size)
                stored.append(holder)
            except Exception as exc:  # a peer or local store failure only removes that holder
                errors.append(f"{holder.host}:{holder.port}: {exc}")
                failed.append(holder.node_id)
                full.append(_out_of_space(exc))
                _note_newer(exc, newer)

        failed: list[bytes] = []
        acknowledged: list[TupleEntry] = []  # (the tuple returned, for ``late``)
        quorum = self.rt.settings.write_quorum or 1

        async def late() -> None:
            """The holders still storing at the acknowledgement are done: if one of them
            failed, the tuple names the ones that stored it."""
            if newer:
                self.node.observe_version(max(newer))
            for entry in corrections(acknowledged, stored):
                log.info("%s: not stored on every holder: %s", name, "; ".join(errors))
                await self.publish(entry, stored)

        jobs = [functools.partial(store_on, holder) for holder in holders]
        # Only bytes in memory or a small file are acknowledged at the quorum: every holder's
        # job reads a small file as it starts, so the caller may drop it; a large one is
        # streamed from it to the end.
        in_hand = isinstance(source, bytes) or size <= READ_IN_LOOP
        background = background_for(self.rt) if in_hand else None
        await until_enough(jobs, lambda: len(stored) >= quorum, background, late)
        self._overtaken(name, stored, newer)
        pending = [h for h in holders if h not in stored and h.node_id not in failed]
        entry = await self._acknowledge(name, version, holders, stored, errors, any(full),
                                        size, checksum, mode, mtime_ns, attrs,
                                        holders_published=True, pending=pending,
                                        acknowledged=acknowledged)
        return entry

    async def _store_here(self, name: str, version: Version, mode: int, mtime_ns: int,
                          source: Path | bytes, size: int, checksum: bytes, link_ok: bool,
                          attrs: bytes) -> None:
        """This node's own copy of an insert: the bytes, a link to the file (``link_ok``) or
        a copy of it."""
        store = self.rt.store
        if isinstance(source, bytes):  # (the caller hashed these very bytes: not again)
            await store.put(name, version, mode, mtime_ns, stream_of(source),
                            expected_checksum=checksum, expected_size=size, attrs=attrs,
                            trusted=True)
        elif link_ok:
            await store.adopt_file(name, version, mode, mtime_ns, source, size, checksum, attrs)
        else:
            await store.put_file(name, version, mode, mtime_ns, source,
                                 expected_checksum=checksum, expected_size=size, attrs=attrs)

    def _overtaken(self, name: str, stored: list[MemberEntry], newer: list[int]) -> None:
        """After an upload: versions stamped here from now on are above every newer version a
        holder refused ours for; Superseded if that is why no holder stored it."""
        if not newer:
            return
        self.node.observe_version(max(newer))
        if not stored:
            raise Superseded(f"{name}: a newer version is already stored on its holders "
                             "(written meanwhile by another writer); nothing was changed")

    async def insert_stream(self, name: str, chunks: AsyncIterator[bytes], size: int,
                            checksum: bytes | LateDigest, mode: int, mtime_ns: int,
                            attrs: bytes = b"") -> TupleEntry:
        """Store a client's upload on the name's holders while it arrives: the body is teed
        into every holder's upload (and the local store when this node is a holder), with
        bounded buffers so the slowest holder sets the pace and nothing piles up in memory.
        Each holder verifies size and digest before it commits, so a short or corrupt body
        is stored nowhere. A late checksum (the client's trailer) is passed on as one: each
        holder gets it, signed by this node, after the body."""
        holders, _ = await self._plane.placement(name)
        if not holders:
            raise InsertFailed(f"{name}: no holder available in its group")
        version = self.node.new_version(int(self.rt.wall() * 1000))
        stored: list[MemberEntry] = []
        errors: list[str] = []
        full: list[bool] = []
        senders: list[trio.MemorySendChannel[bytes]] = []
        refused: list[bool] = []  # per failed holder: it refused the bytes as not matching
        newer: list[int] = []  # clocks of the newer versions holders refused ours for
        late = isinstance(checksum, LateDigest)  # only a bulk connection carries its trailer

        async def store_on(holder: MemberEntry,
                           receive: trio.MemoryReceiveChannel[bytes]) -> None:
            async def body() -> AsyncIterator[bytes]:
                async with receive:
                    async for chunk in receive:
                        yield chunk

            try:
                if holder.node_id == self.node.node_id:
                    await self.rt.store.put(name, version, mode, mtime_ns, body(),
                                            expected_checksum=checksum, expected_size=size,
                                            attrs=attrs)
                else:
                    async with self.peers.stream(
                            "PUT", holder.address, "/v1/replica/" + name,
                            version_query(version, mode, mtime_ns, size, attrs), body=body(),
                            content_digest=checksum,
                            bulk_size=size if size >= BULK_MIN or late else None) as response:
                        reply = await response.aread()
                    if response.status_code != 200:
                        raise refusal(holder.address, reply, response.status_code)
                stored.append(holder)
            except Exception as exc:  # any holder failure only removes that holder
                errors.append(f"{holder.host}:{holder.port}: {exc}")
                full.append(_out_of_space(exc))
                refused.append(_not_matching(exc))
                _note_newer(exc, newer)
            finally:
                receive.close()

        async def fan_out(block: bytes) -> None:
            for send in list(senders):
                try:
                    await send.send(block)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    senders.remove(send)  # that holder gave up; the others go on

        async def feed() -> None:
            # Coalesce the server's small body chunks into large blocks: every block costs a
            # channel hop and a socket write per holder, so fewer, larger ones go faster.
            pending: list[bytes] = []
            pending_size = 0
            try:
                async for chunk in chunks:
                    pending.append(chunk)
                    pending_size += len(chunk)
                    if pending_size >= _FAN_OUT_BLOCK:
                        await fan_out(b"".join(pending))
                        pending, pending_size = [], 0
                        if not senders:
                            return
                if pending:
                    await fan_out(b"".join(pending))
            finally:
                for send in senders:
                    send.close()

        source_error: Exception | None = None
        async with trio.open_nursery() as nursery:
            for holder in holders:
                send, receive = trio.open_memory_channel[bytes](8)
                senders.append(send)
                nursery.start_soon(store_on, holder, receive)
            try:
                await feed()  # (fan_out absorbs holder failures: what it raises is the source's)
            except Exception as exc:
                source_error = exc  # raised below as it is, not wrapped in a group
        if source_error is not None:  # e.g. the client went away: every holder saw a short body
            raise source_error
        if isinstance(checksum, LateDigest) and checksum.error is not None:
            raise checksum.error  # its trailer was refused: the upload's fault, not the holders'
        if not stored and refused and all(refused):
            raise ContentMismatch(f"{name}: the body does not match its announced size or "
                                  f"digest; stored nowhere: {'; '.join(errors)}")
        # (The body is consumed: the client, which has it, may send it again; that attempt
        # is stamped above the version that overtook this one.)
        self._overtaken(name, stored, newer)
        return await self._acknowledge(name, version, holders, stored, errors, any(full), size,
                                       checksum, mode, mtime_ns, attrs)

    async def _acknowledge(self, name: str, version: Version, holders: list[MemberEntry],
                           stored: list[MemberEntry], errors: list[str], full: bool, size: int,
                           checksum: bytes | LateDigest, mode: int, mtime_ns: int, attrs: bytes,
                           *, holders_published: bool = False,
                           pending: Sequence[MemberEntry] = (),
                           acknowledged: list[TupleEntry] | None = None) -> TupleEntry:
        """Publish the tuple if the write quorum holds the bytes; else fail the insert.
        ``holders_published``: the holders published a tuple naming all ``holders`` as they
        stored the bytes (only a correction is sent, when some did not); ``pending``: those
        still storing (named in the tuple: a later correction drops one that fails). The
        tuple is appended to ``acknowledged`` before it is published."""
        quorum = self.rt.settings.write_quorum or 1
        if len(stored) < quorum:
            self.rt.metrics.inc("kelips_puts_total", result="failed")
            raise InsertFailed(f"{name}: stored on {len(stored)} of {len(holders)} holders, "
                               f"{quorum} required: {'; '.join(errors) or 'no holder'}", full)
        # A holder stored it: a late checksum resolved and matched there.
        entry = TupleEntry(name, version, 1, size, mode, mtime_ns, resolved(checksum),
                           tuple(sorted(h.node_id for h in holders)), False, attrs)
        named = [*stored, *pending]
        if not holders_published:
            entry = entry._replace(holders=tuple(sorted(h.node_id for h in stored)))
            told = stored
        elif len(named) == len(holders):
            told = []  # the holders published it as they stored it
        else:  # some did not: the ones that did (or still may), a higher holder epoch
            entry = with_holders(entry, tuple(h.node_id for h in named))
            told = named
        if acknowledged is not None:
            acknowledged.append(entry)
        await self.publish(entry, told)
        self.rt.metrics.inc("kelips_puts_total", result="ok")
        return entry

    async def publish_many(self, entries: list[TupleEntry], holders: list[MemberEntry]) -> None:
        """``publish`` for the records of one namespace operation: one request per holder."""
        now = self.rt.now()
        ours = bool(entries) and self.node.group_of(entries[0].name) == self.node.group
        if ours:
            for entry in entries:
                self.node.record_write(now, entry)
            await self.rt.dispatch(self.node.announce(now, *entries))
        others = [h for h in holders if h.node_id != self.node.node_id]
        if not others:
            return
        doc = {"tuples": [tuple_to_json(e) for e in entries]}

        async def tell(holder: MemberEntry, announce: bool) -> None:
            try:
                await self.peers.call_json("POST", holder.address, "/v1/tuple",
                                           {"announce": 1} if announce else None, doc=doc)
            except PeerError as exc:
                log.warning("could not publish %d records to %s:%d: %s", len(entries),
                            holder.host, holder.port, exc)

        async with trio.open_nursery() as nursery:
            for i, holder in enumerate(others):
                nursery.start_soon(tell, holder, not ours and i == 0)

    async def publish(self, entry: TupleEntry, holders: list[MemberEntry]) -> None:
        """Give the tuple to its holders (and to our own core when the group is ours), and
        have it announced to the whole group (``KelipsNode.announce``): by this node when the
        group is ours, else by the first holder told."""
        await self.publish_many([entry], holders)

    # --- delete ------------------------------------------------------------------------------

    async def delete(self, name: str, only_clock: int | None = None) -> TupleEntry:
        """Delete ``name``: a tombstone, stamped above the version found, on its holders.
        Holders that keep a newer version (written meanwhile, or by a clock ahead of ours)
        refuse it; when that is why none took it, the delete is stamped above that version
        and tried again, like an overwrite (``insert``): the operation that finished last
        is the one that stays.

        ``only_clock``: delete only that version; Changed if the name holds another one by
        now (a rename's copy is of that version: a write that came after it must stay)."""
        found = await self._plane.locate(name)
        entry = found.entry
        if entry is None or entry.tombstone:
            raise NotFound(f"{name}: no such object")
        if only_clock is not None and entry.version.clock != only_clock:
            raise Changed(f"{name}: written again since (version {entry.version.clock}, not "
                          f"{only_clock}); not deleted")
        self.node.observe_version(entry.version.clock)
        placed, _ = await self._plane.placement(name)
        targets = {h.node_id: h for h in [*found.holders, *placed]}
        return await until_not_overtaken(functools.partial(
            self._delete_once, name, entry, list(targets.values())))

    async def _delete_once(self, name: str, entry: TupleEntry, targets: list[MemberEntry]
                           ) -> TupleEntry:
        version = self.node.new_version(int(self.rt.wall() * 1000))
        tombstone = TupleEntry(name, version, 1, 0, entry.mode, time.time_ns(), b"",
                               tuple(sorted(h.node_id for h in targets)), True)
        done: list[MemberEntry] = []
        newer: list[int] = []

        async def drop_on(holder: MemberEntry) -> None:
            try:
                if holder.node_id == self.node.node_id:
                    await self.rt.store.delete(name, version)
                else:
                    await self.peers.call("DELETE", holder.address, "/v1/replica/" + name,
                                          {"clock": version.clock,
                                           "writer": version.writer.hex()})
                done.append(holder)
            except (PeerError, OSError, StaleVersion) as exc:
                log.warning("delete of %s on %s:%d failed: %s", name, holder.host,
                            holder.port, exc)
                _note_newer(exc, newer)

        async with trio.open_nursery() as nursery:
            for holder in targets:
                nursery.start_soon(drop_on, holder)
        self._overtaken(name, done, newer)
        if not done:
            raise Unavailable(f"{name}: no holder reachable to delete it")
        await self.publish(tombstone, done)
        return tombstone


async def until_not_overtaken(attempt: Callable[[], Awaitable[TupleEntry]]) -> TupleEntry:
    """Run a write or delete (``attempt`` stamps its version anew each time) again while it
    is Superseded: every holder kept a newer version, and the node now stamps above it.
    Unavailable after ``INSERT_ATTEMPTS``: newer writes kept overtaking it."""
    for tries in range(1, INSERT_ATTEMPTS + 1):
        try:
            return await attempt()
        except Superseded as exc:
            if tries == INSERT_ATTEMPTS:
                raise Unavailable(f"{exc.message}; gave up after {tries} attempts, each "
                                  "overtaken by a newer write") from exc
            log.info("%s; trying again above that version", exc.message)
    raise AssertionError("unreachable")


def _note_newer(exc: BaseException, newer: list[int]) -> None:
    """Keep the clock of the newer version a holder refused an upload for (ours or a peer's
    409), if that is why it refused."""
    if isinstance(exc, StaleVersion):
        newer.append(exc.held.clock)
    elif isinstance(exc, PeerError) and exc.status == 409 and exc.held_clock is not None:
        newer.append(exc.held_clock)


def _out_of_space(exc: BaseException) -> bool:
    """A holder refused for lack of space: our own store, or a peer answering 507."""
    return isinstance(exc, StoreFull) or (isinstance(exc, PeerError) and exc.status == 507)


def _not_matching(exc: BaseException) -> bool:
    """A holder refused the bytes as not matching: our own store, or a peer answering 422."""
    return isinstance(exc, ChecksumMismatch) or (isinstance(exc, PeerError)
                                                 and exc.status == 422)
