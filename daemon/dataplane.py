"""The data path of a node: insert, locate, fetch, delete, list, repair.

Placement, lookup planning and repair decisions come from the core (``KelipsNode``); this module
moves bytes between stores over signed HTTP and reports what happened back to the core.
An insert is acknowledged only when ``write_quorum`` holders (default: at least one, every
reachable one tried) have the bytes fsynced; the tuple naming them is then published, so a
tuple never names a holder that does not have the version.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import trio

from daemon.core import codec
from daemon.core.messages import LookupReply, MemberEntry, TupleEntry, Version
from daemon.core.node import KelipsNode, LookupPlan
from daemon.core.tuples import with_holders
from daemon.digest import digest_of, new_hasher
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
from daemon.repair import Repairer
from daemon.store import ChecksumMismatch, StaleVersion, StoredObject, StoreError, StoreFull
from daemon.wire import (
    entry_from_json,
    tuple_from_json,
    tuple_to_json,
    version_query,
)

if TYPE_CHECKING:
    from daemon.runtime import NodeRuntime

log = logging.getLogger("kelipsfs.data")

_HEDGE = 3  # members asked one after the other (each after the previous one's timeout)
_FAN_OUT_BLOCK = 1 << 20  # bytes per block teed to the holders of an upload
#: Attempts of an insert from a file or a delete whose holders keep a newer version each time
#: (each one stamped above the newest they named); more would mean writers overtaking it
#: without end.
INSERT_ATTEMPTS = 3


class DataError(Exception):
    """A data-path failure with an HTTP status and a message for the user."""

    status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotFound(DataError):
    status = 404


class Unavailable(DataError):
    status = 503


class TransferFailed(Unavailable):
    """A read broke on every holder of the version it started on (e.g. each copy was
    replaced by a newer write while it was read): reading the name again may succeed."""


class InsertFailed(DataError):
    """Fewer holders than the write quorum stored the bytes; ``full`` when a holder refused
    for lack of space (the mount turns that into ENOSPC, the HTTP API into 507)."""

    status = 503

    def __init__(self, message: str, full: bool = False) -> None:
        super().__init__(f"{message} (a holder's disk is full)" if full else message)
        self.full = full
        if full:
            self.status = 507


class Superseded(DataError):
    """No holder stored an upload because they hold a newer version of the name: another
    writer's, written meanwhile. Versions stamped by this node are above it from now on, so
    sending the same bytes again makes them the newest."""

    status = 409


class Changed(DataError):
    """A conditional delete found another version than the one it was for: not deleted."""

    status = 409


class ContentMismatch(DataError):
    """Every holder refused the upload's bytes: they do not match its size or digest."""

    status = 422


class Located:
    """Where a name lives: its tuple (None: no such object) and live holders, nearest first."""

    def __init__(self, entry: TupleEntry | None, holders: list[MemberEntry], hops: int) -> None:
        self.entry = entry
        self.holders = holders
        self.hops = hops


class DataPlane:
    def __init__(self, runtime: NodeRuntime) -> None:
        self.rt = runtime
        self.repair = Repairer(self)

    @property
    def node(self) -> KelipsNode:
        return self.rt.node

    @property
    def peers(self) -> PeerClient:
        assert self.rt.peers is not None, "node not started"
        return self.rt.peers

    # --- startup ------------------------------------------------------------------------------

    def publish_local_objects(self) -> None:
        """A restarted holder re-announces what it holds; the group's higher versions win."""
        now = self.rt.now()
        for obj in self.rt.store.objects():
            if self.node.group_of(obj.name) != self.node.group:
                continue
            self.node.record_write(now, self._tuple_for(obj, (self.node.node_id,), 0))

    @staticmethod
    def _tuple_for(obj: StoredObject, holders: tuple[bytes, ...], seq: int) -> TupleEntry:
        return TupleEntry(obj.name, obj.version, seq, obj.size, obj.mode, obj.mtime_ns,
                          obj.checksum, tuple(sorted(holders)), obj.tombstone, obj.attrs)

    # --- placement and lookup -----------------------------------------------------------------

    async def _ask_contacts(self, plan: LookupPlan, path: str, query: dict[str, object]
                            ) -> tuple[Any, int]:
        """Ask the contacts of ``plan`` (a foreign group's) in order; (answer, hops).

        Placement and the tuple are what any member of the group answers alike, so these
        plans are made without a time: the measured contacts go first and the spare last (its
        head start is for the one-datagram lookup, where a holder answers with the bytes)."""
        if not plan.ask:
            raise Unavailable(f"no live member of group {plan.group} is known yet; the cluster "
                              f"may still be forming (k={self.node.config.k})")
        hops = 0
        last = ""
        for contact in plan.ask:
            hops += 1
            try:
                doc, rtt = await self.peers.call_json("GET", contact.address, path, query)
            except PeerError as exc:
                last = str(exc)
                if exc.status is None:
                    self.node.report_unreachable(self.rt.now(), contact.node_id)
                continue
            self.node.record_rtt(contact.node_id, rtt)
            return doc, hops
        raise Unavailable(f"no contact of group {plan.group} answered: {last}")

    async def placement(self, name: str) -> tuple[list[MemberEntry], int]:
        plan = self.node.plan_insert(name)
        if plan.local:
            return self.node.placement(name), 0
        doc, hops = await self._ask_contacts(plan, "/v1/placement", {"name": name})
        return [entry_from_json(e) for e in doc["holders"]], hops

    async def locate(self, name: str) -> Located:
        plan = self.node.plan_lookup(name)
        self.rt.metrics.inc("kelips_lookups_total", result="started")
        if plan.local:
            entry = plan.entry
            if entry is not None:
                return Located(entry, self.node.live_holders(entry), 0)
            # Not heard of yet here: a write that just happened elsewhere told its holders
            # first, and they are the members placement names.
            candidates = [e for e in self.node.placement(name) if e.node_id != self.node.node_id]
            entry, holders, hops = await self._ask_candidates(name, candidates)
            return Located(entry, holders, hops)
        doc, hops = await self._ask_contacts(plan, "/v1/lookup", {"name": name})
        entry = tuple_from_json(doc["tuple"]) if doc.get("tuple") else None
        holders = self.node.fetch_order(tuple(entry_from_json(e) for e in doc["holders"]))
        if entry is None:
            # The contact has not heard of the name yet (tuples spread by gossip): ask the
            # members a write would have chosen, which hold it if it was just written.
            entry, holders, more = await self._ask_candidates(
                name, [entry_from_json(e) for e in doc.get("candidates", [])])
            hops += more
        self.rt.metrics.inc("kelips_lookup_hops_total", hops)
        return Located(entry, holders, hops)

    async def _ask_candidates(self, name: str, candidates: list[MemberEntry]
                              ) -> tuple[TupleEntry | None, list[MemberEntry], int]:
        hops = 0
        for candidate in candidates:
            hops += 1
            try:
                local, _ = await self.peers.call_json("GET", candidate.address, "/v1/lookup",
                                                      {"name": name, "local": 1})
            except PeerError:
                continue
            if local.get("tuple"):
                entry = tuple_from_json(local["tuple"])
                self.node.merge_tuple(self.rt.now(), entry)
                holders = self.node.fetch_order(
                    tuple(entry_from_json(e) for e in local["holders"]))
                return entry, holders, hops
        return None, [], hops

    # --- one-datagram lookup --------------------------------------------------------------

    async def _ask_datagram(self, members: list[MemberEntry] | tuple[MemberEntry, ...],
                            name: str, want_inline: bool = True
                            ) -> tuple[LookupReply, MemberEntry | None] | None:
        """A hedged one-datagram lookup of ``name`` to ``members`` (not this node), in order;
        the reply and the member asked that sent it (None: a holder it forwarded to)."""
        asked = [m for m in members if m.node_id != self.node.node_id][:_HEDGE]
        if not asked:
            return None
        got = await self.rt.lookups.ask(
            [(m.address, self.rt.lookups.timeout_for(m.node_id)) for m in asked], name, want_inline)
        if got is None:
            return None
        reply, source = got
        member = next((m for m in asked if m.address == source), None)
        if reply.entry is not None:
            self.node.merge_tuple(self.rt.now(), reply.entry)  # own group only
        return reply, member

    @staticmethod
    def _inline(reply: LookupReply) -> bytes | None:
        """The reply's inline bytes if they are exactly its tuple's content, else None."""
        t, data = reply.entry, reply.inline
        if t is None or data is None or t.tombstone or len(data) != t.size \
                or digest_of(data) != t.checksum:
            return None
        return data

    async def _holder_datagram(self, entry: TupleEntry, holders: list[MemberEntry],
                               skip: bytes | None = None
                               ) -> tuple[TupleEntry, bytes | None, int]:
        """Ask the holders of a small object for it in one datagram each (hedged).

        A holder answers with its own tuple, which after an overwrite may be newer than the
        one we had (the writer tells the holders before it acknowledges): that one wins. Its
        bytes are used only if they are of a version at least ``entry``'s and match its
        checksum; else (entry, None) and the caller fetches over HTTP.
        """
        if entry.tombstone or entry.size > codec.INLINE_MAX:
            return entry, None, 0
        asked = [h for h in holders if h.node_id != skip]
        got = await self._ask_datagram(asked, entry.name)
        if got is None:
            return entry, None, min(len(asked), _HEDGE)
        reply = got[0]
        if reply.entry is None or reply.entry.version < entry.version:
            return entry, None, 1  # that holder is behind: HTTP asks for min_clock
        return reply.entry, self._inline(reply), 1

    async def _locate_fast(self, name: str, want_inline: bool = True
                           ) -> tuple[Located, bytes | None] | None:
        """Locate (and for small objects, fetch: ``want_inline``) ``name`` with lookup
        datagrams.

        None when no datagram was answered in time: the caller takes the HTTP path, which
        also reports dead contacts to the core. The bytes returned are verified against the
        newest tuple seen on the way.
        """
        node = self.node
        plan = node.plan_lookup(name, self.rt.now())
        if plan.local:
            entry = plan.entry
            if entry is None:
                if node.knows_absence(name, self.rt.now()):
                    return Located(None, [], 0), None
                candidates = [e for e in node.placement(name) if e.node_id != node.node_id]
                return await self._from_candidates(name, candidates, 0, want_inline)
            holders = node.live_holders(entry)
            if holders and holders[0].node_id == node.node_id and not node.placed_here(name):
                # Our copy is a leftover (the placement moved): an overwrite went to the new
                # placement and its tuple reaches us only by gossip, so the other holders
                # (who answer with their newest tuple) come first, our copy last.
                holders = holders[1:] + holders[:1]
            if not holders or entry.tombstone or not want_inline:
                return Located(entry, holders, 0), None  # (deleted, or no bytes wanted)
            if holders[0].node_id == node.node_id:  # held here: no network
                stored = self.rt.store.get(name)
                if (stored is None or stored.version != entry.version
                        or entry.size > codec.INLINE_MAX):
                    return Located(entry, holders, 0), None  # open_read streams what we hold
                # Small: read in the event loop (cheaper than a streamed read's thread hop),
                # digest checked. A copy that fails its check goes last; the others are asked.
                here = self.rt.store.read_small(stored, codec.INLINE_MAX)
                if here is not None or len(holders) == 1:
                    return Located(entry, holders, 0), here
                holders = holders[1:] + holders[:1]
            newest, data, hops = await self._holder_datagram(entry, holders)
            if newest is not entry:
                holders = node.fetch_order(tuple(node.live_holders(newest)) or tuple(holders))
            return Located(newest, holders, hops), data
        if not plan.ask:
            return None
        got = await self._ask_datagram(plan.ask, name, want_inline)
        if got is None:
            return None
        reply, contact = got
        hops = 1
        if reply.entry is None:
            if not reply.candidates:
                return Located(None, [], hops), None
            return await self._from_candidates(name, list(reply.candidates), hops, want_inline)
        entry = reply.entry
        holders = node.fetch_order(reply.holders)
        data = self._inline(reply)
        if data is None and want_inline:
            skip = contact.node_id if contact is not None else None
            entry, data, more = await self._holder_datagram(entry, holders, skip)
            hops += more
        elif reply.forwarded:
            hops += 1
        self.rt.metrics.inc("kelips_lookup_hops_total", hops)
        return Located(entry, holders, hops), data

    async def _from_candidates(self, name: str, candidates: list[MemberEntry], hops: int,
                               want_inline: bool = True
                               ) -> tuple[Located, bytes | None] | None:
        """The contact has not heard of ``name`` yet: ask the members a write would have
        chosen, one by one, until one knows it. None if none of them answered at all."""
        answered = False
        for candidate in candidates:
            if candidate.node_id == self.node.node_id:
                continue
            got = await self._ask_datagram([candidate], name, want_inline)
            hops += 1
            if got is None:
                continue
            answered = True
            reply = got[0]
            if reply.entry is not None:
                return (Located(reply.entry, self.node.fetch_order(reply.holders), hops),
                        self._inline(reply))
        return (Located(None, [], hops), None) if answered else None

    async def stat(self, name: str) -> TupleEntry:
        """The name's tuple (``find``); NotFound if it has none or it is deleted."""
        entry = await self.find(name)
        if entry is None or entry.tombstone:
            raise NotFound(f"{name}: no such object")
        return entry

    async def find(self, name: str) -> TupleEntry | None:
        """The name's newest tuple (a tombstone too): lookup datagrams (no content), HTTP if
        none was answered. A name this node has no tuple of is asked of its other holders
        (a write may have just happened there: a datagram each, not an HTTP request each),
        unless this node holds the name itself (``KelipsNode.knows_absence``)."""
        fast = await self._locate_fast(name, want_inline=False)
        found = fast[0] if fast is not None else await self.locate(name)
        return found.entry

    async def ask_group(self, name: str, path: str, query: dict[str, object]) -> Any:
        """A question only the members of ``name``'s group can answer (another group than
        this node's): asked of its contacts, nearest first."""
        return (await self._ask_contacts(self.node.plan_lookup(name), path, query))[0]

    # --- insert ------------------------------------------------------------------------------

    async def insert(self, name: str, source: Path, size: int, checksum: bytes, mode: int,
                     mtime_ns: int, *, link_ok: bool = False, overwrite: bool = True,
                     attrs: bytes = b"") -> TupleEntry:
        """Store ``source`` under ``name`` on the name's holders; returns the published tuple.

        ``link_ok``: the caller computed ``checksum`` from the bytes it wrote and never writes
        ``source`` again, so this node's own copy (when it is a holder) may be a hard link to it
        (``ObjectStore.adopt_file``) instead of a copy.
        ``overwrite``: when a newer version overtakes this one on every holder, stamp it again
        above (new content: the write that finishes last stays). False for content made from
        an older version (a chmod, a truncate): Superseded instead, not stored over a write it
        never saw.
        """
        holders, _ = await self.placement(name)
        if not holders:
            raise InsertFailed(f"{name}: no holder available in its group")
        once = functools.partial(self._insert_once, name, holders, source, size, checksum, mode,
                                 mtime_ns, link_ok, attrs)
        return await (_until_not_overtaken(once) if overwrite else once())

    async def _insert_once(self, name: str, holders: list[MemberEntry], source: Path, size: int,
                           checksum: bytes, mode: int, mtime_ns: int, link_ok: bool,
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
            try:
                if holder.node_id == self.node.node_id and link_ok:
                    await self.rt.store.adopt_file(name, version, mode, mtime_ns, source, size,
                                                   checksum, attrs)
                elif holder.node_id == self.node.node_id:
                    await self.rt.store.put_file(name, version, mode, mtime_ns, source,
                                                 expected_checksum=checksum, expected_size=size,
                                                 attrs=attrs)
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
        # Only a small file is acknowledged at the quorum: every holder's job reads it as it
        # starts, so the caller may drop it; a large one is streamed from it to the end.
        background = background_for(self.rt) if size <= READ_IN_LOOP else None
        await until_enough(jobs, lambda: len(stored) >= quorum, background, late)
        self._overtaken(name, stored, newer)
        pending = [h for h in holders if h not in stored and h.node_id not in failed]
        entry = await self._acknowledge(name, version, holders, stored, errors, any(full),
                                        size, checksum, mode, mtime_ns, attrs,
                                        holders_published=True, pending=pending,
                                        acknowledged=acknowledged)
        return entry

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
        holders, _ = await self.placement(name)
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
        doc = {"tuples": [tuple_to_json(e) for e in entries]}

        async def tell(holder: MemberEntry, announce: bool) -> None:
            try:
                await self.peers.call_json("POST", holder.address, "/v1/tuple",
                                           {"announce": 1} if announce else None, doc=doc)
            except PeerError as exc:
                log.warning("could not publish %d records to %s:%d: %s", len(entries),
                            holder.host, holder.port, exc)

        if not others:
            return
        async with trio.open_nursery() as nursery:
            for i, holder in enumerate(others):
                nursery.start_soon(tell, holder, not ours and i == 0)

    async def publish(self, entry: TupleEntry, holders: list[MemberEntry]) -> None:
        """Give the tuple to its holders (and to our own core when the group is ours), and
        have it announced to the whole group (``KelipsNode.announce``): by this node when the
        group is ours, else by the first holder told."""
        await self.publish_many([entry], holders)

    # --- read --------------------------------------------------------------------------------

    async def read_plan(self, name: str) -> tuple[Located, bytes | None]:
        """The lookup of a read: the tuple and live holders, and the content itself when it
        came inline in the lookup's answer (small objects)."""
        fast = await self._locate_fast(name)
        if fast is None:
            return await self.locate(name), None
        self.rt.metrics.inc("kelips_lookups_total", result="started")
        return fast

    async def open_read(self, name: str, plan: tuple[Located, bytes | None] | None = None
                        ) -> tuple[ObjectMeta, AsyncIterator[bytes]]:
        """Metadata and a stream of verified bytes of the newest version a holder has.

        The holder's own version wins over the tuple used to find it (a just-overwritten
        object is never served stale); if a holder fails mid-transfer the next one holding
        the same version resumes at the offset reached. ``plan``: the ``read_plan`` the
        caller already made (not looked up again).
        """
        found, data = plan if plan is not None else await self.read_plan(name)
        entry = found.entry
        if data is not None and entry is not None:
            self.rt.metrics.inc("kelips_lookups_total", result="ok")
            if found.hops:  # not a small copy read here: it came in a lookup datagram
                self.rt.metrics.inc("kelips_inline_reads_total")
            return (ObjectMeta(entry.size, entry.checksum, entry.mode, entry.mtime_ns,
                               entry.version.clock, False), stream_of(data))
        if entry is None or entry.tombstone:
            self.rt.metrics.inc("kelips_lookups_total", result="not_found")
            raise NotFound(f"{name}: no such object")
        errors: list[str] = []
        for i, holder in enumerate(found.holders):
            stack = AsyncExitStack()
            try:
                meta, chunks = await self._open_holder(stack, entry, holder, 0, None)
            except (PeerError, NotFound, OSError) as exc:
                await stack.aclose()
                errors.append(f"{holder.host}:{holder.port}: {exc}")
                continue
            if meta.tombstone:
                await stack.aclose()
                raise NotFound(f"{name}: no such object")
            self.rt.metrics.inc("kelips_lookups_total", result="ok")
            return meta, self._stream(entry, meta, stack, chunks, found.holders[i + 1:])
        raise Unavailable(f"{name}: no live holder answered: {'; '.join(errors) or 'none known'}")

    async def _stream(self, entry: TupleEntry, meta: ObjectMeta, stack: AsyncExitStack,
                      chunks: AsyncIterator[bytes], others: list[MemberEntry]
                      ) -> AsyncIterator[bytes]:
        sha = new_hasher()
        sent = 0
        errors: list[str] = []
        try:
            while True:
                try:
                    async for chunk in chunks:
                        sha.update(chunk)
                        sent += len(chunk)
                        yield chunk
                    break
                except (PeerError, OSError, StoreError) as exc:  # (our copy replaced: StoreError)
                    errors.append(str(exc))
                await stack.aclose()
                stack = AsyncExitStack()
                while others:
                    holder = others.pop(0)
                    try:
                        _, chunks = await self._open_holder(stack, entry, holder, sent, meta)
                        break
                    except (PeerError, NotFound, OSError) as exc:
                        await stack.aclose()
                        stack = AsyncExitStack()
                        errors.append(f"{holder.host}:{holder.port}: {exc}")
                else:
                    raise TransferFailed(f"{entry.name}: transfer failed on every holder: "
                                      f"{'; '.join(errors)}")
            if sent != meta.size or sha.digest() != meta.checksum:
                raise DataError(f"{entry.name}: content does not match its checksum")
        finally:
            await stack.aclose()

    async def _open_holder(self, stack: AsyncExitStack, entry: TupleEntry, holder: MemberEntry,
                           offset: int, same_as: ObjectMeta | None
                           ) -> tuple[ObjectMeta, AsyncIterator[bytes]]:
        """Open a holder's copy (at least ``entry``'s version; exactly ``same_as`` if given)."""
        min_clock = same_as.clock if same_as is not None else entry.version.clock
        if holder.node_id == self.node.node_id:
            obj = self.rt.store.get(entry.name)
            if obj is None or obj.version.clock < min_clock:
                raise NotFound("local copy missing or older")
            meta = ObjectMeta(obj.size, obj.checksum, obj.mode, obj.mtime_ns, obj.version.clock,
                              obj.tombstone)
            if same_as is not None and meta != same_as:
                raise NotFound("local copy is another version")
            if obj.tombstone:
                return meta, stream_of(b"")
            # _stream hashes everything it passes on: a second hash here would only cost.
            return meta, self.rt.store.read_chunks(obj, offset=offset, verify=False)
        query = {"min_clock": min_clock, "offset": offset}
        large = entry.size - offset >= BULK_MIN
        response = await stack.enter_async_context(
            self.peers.stream("GET", holder.address, "/v1/replica/" + entry.name, query,
                              bulk_size=0 if large else None))
        if response.status_code == 404:
            raise NotFound("holder has no such version")
        if response.status_code != 200:
            raise PeerError(f"status {response.status_code}", response.status_code)
        try:
            h = response.headers
            meta = ObjectMeta(int(h["x-kelips-size"]), bytes.fromhex(h["x-kelips-checksum"]),
                              int(h["x-kelips-mode"]), int(h["x-kelips-mtime-ns"]),
                              int(h["x-kelips-clock"]), False)
        except (KeyError, ValueError) as exc:
            raise PeerError(f"holder sent bad metadata: {exc}") from exc
        if same_as is not None and meta != same_as:
            raise NotFound("holder has another version")
        return meta, _guarded(response.aiter_bytes(_FAN_OUT_BLOCK))

    # --- delete ------------------------------------------------------------------------------

    async def delete(self, name: str, only_clock: int | None = None) -> TupleEntry:
        """Delete ``name``: a tombstone, stamped above the version found, on its holders.
        Holders that keep a newer version (written meanwhile, or by a clock ahead of ours)
        refuse it; when that is why none took it, the delete is stamped above that version
        and tried again, like an overwrite (``insert``): the operation that finished last
        is the one that stays.

        ``only_clock``: delete only that version; Changed if the name holds another one by
        now (a rename's copy is of that version: a write that came after it must stay)."""
        found = await self.locate(name)
        entry = found.entry
        if entry is None or entry.tombstone:
            raise NotFound(f"{name}: no such object")
        if only_clock is not None and entry.version.clock != only_clock:
            raise Changed(f"{name}: written again since (version {entry.version.clock}, not "
                          f"{only_clock}); not deleted")
        self.node.observe_version(entry.version.clock)
        placed, _ = await self.placement(name)
        targets = {h.node_id: h for h in [*found.holders, *placed]}
        return await _until_not_overtaken(functools.partial(
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

    # --- list --------------------------------------------------------------------------------

    def local_listing(self, prefix: str) -> list[dict[str, Any]]:
        return [_listing(t) for t in self.node.tuples
                if not t.tombstone and t.name.startswith(prefix)]

    async def listing(self, prefix: str) -> tuple[list[dict[str, Any]], list[int]]:
        """Names under a prefix from every group: one contact per group, in parallel."""
        merged: dict[str, dict[str, Any]] = {t["name"]: t for t in self.local_listing(prefix)}
        missing: list[int] = []
        k = self.node.config.k

        async def ask(group: int) -> None:
            contacts = sorted(self.node.live_contacts(group),
                              key=lambda m: m.rtt if m.rtt is not None else 1e9)
            for contact in contacts:
                try:
                    doc, _ = await self.peers.call_json("GET", contact.address, "/v1/list",
                                                        {"prefix": prefix})
                except PeerError:
                    continue
                for item in doc["objects"]:
                    old = merged.get(item["name"])
                    if old is None or item["clock"] > old["clock"]:
                        merged[item["name"]] = item
                return
            if contacts or self.node.contacts.get(group):
                missing.append(group)

        async with trio.open_nursery() as nursery:
            for group in range(k):
                if group != self.node.group:
                    nursery.start_soon(ask, group)
        return sorted(merged.values(), key=lambda d: d["name"]), sorted(missing)

class ObjectMeta(NamedTuple):
    """What a holder says about the copy it serves (HTTP headers or the local store)."""

    size: int
    checksum: bytes
    mode: int
    mtime_ns: int
    clock: int
    tombstone: bool


async def _guarded(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Stream errors (httpx or bulk) become PeerError, so the reader falls back to the next
    holder."""
    try:
        async for chunk in chunks:
            yield chunk
    except Exception as exc:
        if isinstance(exc, PeerError):
            raise
        raise PeerError(f"transfer broke: {type(exc).__name__}") from exc


async def _until_not_overtaken(attempt: Callable[[], Awaitable[TupleEntry]]) -> TupleEntry:
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


def _listing(t: TupleEntry) -> dict[str, Any]:
    return {"name": t.name, "size": t.size, "mode": t.mode, "mtime_ns": t.mtime_ns,
            "clock": t.version.clock}
