"""The data path of a node: placement, locate, fetch and list; writes (``daemon.writes``)
and repair (``daemon.repair``) hang off it.

Placement, lookup planning and repair decisions come from the core (``KelipsNode``); this module
moves bytes between stores over signed HTTP and reports what happened back to the core.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Any, NamedTuple

import trio

from daemon.core import codec
from daemon.core.messages import LookupReply, MemberEntry, TupleEntry
from daemon.core.node import KelipsNode, LookupPlan
from daemon.data_errors import DataError, NotFound, TransferFailed, Unavailable
from daemon.digest import digest_async, digest_of, new_hasher
from daemon.peers import (
    BULK_MIN,
    PeerClient,
    PeerError,
    stream_of,
)
from daemon.repair import Repairer
from daemon.store_layout import StoredObject, StoreError
from daemon.wire import (
    entry_from_json,
    tuple_from_json,
)
from daemon.writes import Writes

if TYPE_CHECKING:
    from daemon.runtime import NodeRuntime

log = logging.getLogger("kelipsfs.data")

_HEDGE = 3  # members asked one after the other (each after the previous one's timeout)
_READ_BLOCK = 1 << 20  # bytes per block read from a holder's answer


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
        self.writes = Writes(self)

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

    async def read_part(self, name: str, offset: int, length: int, checksum: bytes,
                        plan: tuple[Located, bytes | None] | None = None) -> bytes:
        """``length`` bytes of ``name`` from ``offset`` whose digest is ``checksum`` (one
        chunk of a run, which its manifest names with a digest of its own), from the first
        holder whose bytes match it. NotFound when no holder has the object."""
        found, data = plan if plan is not None else await self.read_plan(name)
        entry = found.entry
        if entry is None or entry.tombstone:
            raise NotFound(f"{name}: no such object")
        if data is not None:  # (the whole object came with the lookup)
            part = data[offset:offset + length]
            if len(part) == length and await digest_async(part) == checksum:
                return part
        errors: list[str] = []
        missing = 0
        for holder in found.holders:
            try:
                part = await self._part_from(holder, entry, offset, length, checksum)
            except NotFound as exc:
                missing += 1
                errors.append(f"{holder.host}:{holder.port}: {exc}")
                continue
            except (PeerError, OSError, StoreError) as exc:
                errors.append(f"{holder.host}:{holder.port}: {exc}")
                continue
            if holder.node_id == self.node.node_id:
                return part  # (checked as it was read)
            if len(part) == length and await digest_async(part) == checksum:
                return part
            errors.append(f"{holder.host}:{holder.port}: bytes {offset}+{length} do not match "
                          "their digest")
        if found.holders and missing == len(found.holders):
            raise NotFound(f"{name}: no holder has it")
        raise Unavailable(f"{name}: no live holder gave bytes {offset}+{length}: "
                          f"{'; '.join(errors) or 'none known'}")

    async def _part_from(self, holder: MemberEntry, entry: TupleEntry, offset: int,
                         length: int, checksum: bytes) -> bytes:
        """The part from ``holder``: checked against ``checksum`` when it is this node (in
        the thread that reads it), as it comes otherwise (the caller checks it)."""
        if holder.node_id == self.node.node_id:
            obj = self.rt.store.get(entry.name)
            if obj is None or obj.tombstone or obj.version.clock < entry.version.clock:
                raise NotFound("local copy missing or older")
            if offset + length > obj.size:
                raise NotFound("local copy is shorter")
            return await self.rt.store.read_range(obj, offset, length, checksum)
        query = {"min_clock": entry.version.clock, "offset": offset, "length": length}
        async with self.peers.stream("GET", holder.address, "/v1/replica/" + entry.name,
                                     query, bulk_size=0 if length >= BULK_MIN else None
                                     ) as response:
            if response.status_code == 404:
                raise NotFound("holder has no such version")
            if response.status_code != 200:
                raise PeerError(f"status {response.status_code}", response.status_code)
            return b"".join([block async for block in _guarded(
                response.aiter_bytes(_READ_BLOCK))])

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
        return meta, _guarded(response.aiter_bytes(_READ_BLOCK))

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



def _listing(t: TupleEntry) -> dict[str, Any]:
    return {"name": t.name, "size": t.size, "mode": t.mode, "mtime_ns": t.mtime_ns,
            "clock": t.version.clock}
