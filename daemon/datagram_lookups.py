"""One-datagram lookups: asking a contact or holder for a name's tuple (and a small object's
bytes inline) in one UDP datagram each way, and answering such requests.

The runtime's UDP loop hands this every lookup datagram it authenticated; the data path asks
through ``ask``. What to answer is the core's decision (``KelipsNode.answer_lookup_request``);
here are the waiting, the hedging between targets, and the bytes read from the store.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import trio

from daemon.core import codec
from daemon.core.config import AUTH_TRAILER
from daemon.core.messages import LookupReply, LookupRequest, Outgoing
from daemon.names import NameError_, validate_name
from daemon.settings import format_address

if TYPE_CHECKING:
    from daemon.runtime import NodeRuntime

Address = tuple[str, int]
#: One-datagram lookups waiting for their reply at once; beyond this, lookups use HTTP.
MAX_PENDING_LOOKUPS = 1024


class _Waiter:
    """One lookup waiting for a reply from any of the addresses it asked (hedging)."""

    __slots__ = ("event", "reply", "source")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.reply: LookupReply | None = None
        self.source: Address | None = None


class DatagramLookups:
    """The lookups of one node in flight, and its answers to others' (module docstring)."""

    def __init__(self, runtime: NodeRuntime) -> None:
        self._rt = runtime
        # request id -> (address asked, waiter): replies from elsewhere or for unknown ids are
        # dropped. Bounded by MAX_PENDING_LOOKUPS; entries leave when their lookup ends.
        self._pending: dict[int, tuple[Address, _Waiter]] = {}

    async def answer(self, dest: Address, request: LookupRequest) -> None:
        """Answer a LookupRequest from the core's tuple, with the bytes inline when the core
        says so and the local copy is exactly that version, intact, and fits the datagram."""
        try:
            validate_name(request.name)
        except NameError_:
            self._rt.reject("malformed", "dropped a lookup for an invalid name", dest)
            return
        obj = self._rt.store.get(request.name)
        held = obj.version if obj is not None and not obj.tombstone else None
        action = self._rt.node.answer_lookup_request(request, dest, held)
        if action.forward is not None:
            self._rt.metrics.inc("kelips_lookup_datagrams_answered_total", how="forwarded")
            await self._rt.send_datagram(action.forward)
            return
        assert action.reply is not None
        out = action.reply
        reply = out.message
        assert isinstance(reply, LookupReply)
        room = codec.LOOKUP_DATAGRAM_MAX - AUTH_TRAILER
        attach = action.attach
        if attach is not None and obj is not None and obj.version == attach.version:
            data = self._rt.store.read_small(obj, codec.INLINE_MAX)
            if data is not None:
                inlined = dataclasses.replace(reply, inline=data)
                if codec.message_size(inlined) <= room:
                    reply = inlined
        if codec.message_size(reply) > room:
            self._rt.ratelog.warn("lookup_size", "lookup reply too big for a datagram",
                               name=request.name[:200], peer=format_address(dest))
            return
        self._rt.metrics.inc("kelips_lookup_datagrams_answered_total",
                         how="inline" if reply.inline is not None else "tuple")
        await self._rt.send_datagram(Outgoing(out.dest, reply))

    def deliver(self, source: Address, reply: LookupReply) -> None:
        """Wake the lookup waiting for this reply. Dropped (and counted as "unexpected"): an
        unknown or finished request id, or a reply from another address than the one asked
        unless it is marked forwarded (a holder the asked contact passed the request to: its
        address is not known in advance). Ids are random 64-bit and used once, and every
        datagram is authenticated, so a forwarded reply still needs the cluster key and the
        id of a lookup in flight."""
        pending = self._pending.get(reply.request_id)
        if pending is None:
            self._rt.reject("unexpected", "dropped a lookup reply nobody waits for", source)
            return
        asked, waiter = pending
        if asked != source and not reply.forwarded:
            self._rt.reject("unexpected", "dropped a lookup reply from another node than the one "
                                       "asked", source)
            return
        del self._pending[reply.request_id]
        if waiter.reply is None:
            waiter.reply, waiter.source = reply, source
            waiter.event.set()

    async def ask(self, targets: list[tuple[Address, float]], name: str,
                         want_inline: bool) -> tuple[LookupReply, Address] | None:
        """Ask ``targets`` (address, timeout) one after the other for ``name``, hedging: each
        is given its timeout, then the next is asked while earlier ones may still answer.

        Returns the first useful reply and who sent it, or None when nobody answered in time
        (or too many lookups are already waiting): the caller falls back to HTTP. A reply that
        says "not my group" does not count; the next target is asked at once.
        """
        waiter = _Waiter()
        ids: list[int] = []
        try:
            for dest, timeout in targets:
                if len(self._pending) >= MAX_PENDING_LOOKUPS:
                    self._rt.metrics.inc("kelips_lookup_datagrams_total", result="busy")
                    return None
                rid = self._rt.rng.getrandbits(64)
                while rid in self._pending:
                    rid = self._rt.rng.getrandbits(64)
                self._pending[rid] = (dest, waiter)
                ids.append(rid)
                await self._rt.send_datagram(Outgoing(dest, LookupRequest(rid, name, want_inline)))
                with trio.move_on_after(timeout) as scope:
                    while True:
                        await waiter.event.wait()
                        assert waiter.reply is not None and waiter.source is not None
                        if not waiter.reply.wrong_group:
                            self._rt.metrics.inc("kelips_lookup_datagrams_total", result="answered")
                            return waiter.reply, waiter.source
                        waiter.reply = waiter.source = None  # a stale contact: next one
                        waiter.event = trio.Event()
                        break
                if scope.cancelled_caught:
                    self._rt.metrics.inc("kelips_lookup_datagrams_total", result="timeout")
            return None
        finally:
            for rid in ids:
                self._pending.pop(rid, None)

    def timeout_for(self, node_id: bytes) -> float:
        """How long to wait for a lookup reply from a member: 3 RTT within [50 ms, 500 ms].
        A node never measured (a spare) is expected at the own group's median RTT."""
        m = self._rt.node.members.get(node_id)
        if m is not None:
            rtt = m.rtt if m.rtt is not None else 0.1
        else:
            rtt = self._rt.node.typical_rtt() or 0.1
        return min(0.5, max(0.05, 3 * rtt))
