"""The trio driver of the protocol core: one process, one port (UDP gossip + HTTP).

It owns the sockets, the timers and the clock, and feeds the sans-I/O ``KelipsNode``:
datagrams in -> ``receive``; ``tick`` at ``next_deadline``; whatever the core returns goes out
as a signed datagram or a signed HTTP call. The data path (inserts, lookups, repair) lives in
``daemon.dataplane``, the HTTP endpoints in ``daemon.api``.
"""

from __future__ import annotations

import gc
import logging
import os
import random
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

from daemon.chunks import Chunks
from daemon.core import codec
from daemon.core.ids import group_of_node
from daemon.core.keys import CHUNK, is_metadata
from daemon.core.messages import (
    DATAGRAM_TYPES,
    Address,
    Envelope,
    LookupReply,
    LookupRequest,
    Outgoing,
    Refusal,
    Snapshot,
    SyncRequest,
)
from daemon.core.node import Event, KelipsNode
from daemon.datagram_lookups import DatagramLookups
from daemon.identity import Identity, balanced_node_id, has_identity, load_identity
from daemon.logs import fields, set_node, short_id
from daemon.metrics import Metrics
from daemon.peers import PeerClient, PeerError
from daemon.security import Authenticator, AuthError, load_key, open_cluster_key
from daemon.settings import NodeSettings, format_address
from daemon.store import ObjectStore
from daemon.wire import entry_from_json, entry_to_json

if TYPE_CHECKING:
    from daemon.dataplane import DataPlane
    from daemon.namespace.primary import Primary

log = logging.getLogger("kelipsfs.node")

JOIN_ATTEMPTS = 10
CENSUS_SEEDS = 3  # seeds tried at a first start to learn group sizes (balanced_node_id)
MAX_UDP = 65535
#: Seconds between the store's maintenance rounds: records logged meanwhile are made durable.
STORE_MAINTENANCE = 1.0
_LOOKUP_CODES = (7, 8)  # type bytes of LookupRequest / LookupReply (codec._TYPE_CODES)


class JoinRefused(Exception):
    """A live member refused this node (another k or cluster): the reason says which."""


class JoinFailed(Exception):
    """No seed could be reached."""


class _RateLimitedLog:
    """Log a class of events at most once per interval, counting what was suppressed.

    The line carries the caller's fields (``event`` defaults to the class; rejected packets
    give their reason and peer) and ``suppressed``: how many of the class went unlogged since
    the last line."""

    def __init__(self, interval: float = 10.0) -> None:
        self._interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warn(self, key: str, message: str, **values: object) -> None:
        now = time.monotonic()
        if now - self._last.get(key, -1e9) >= self._interval:
            extra = self._suppressed.pop(key, 0)
            if extra:
                values["suppressed"] = extra
            values.setdefault("event", key)
            log.warning("%s", message, extra=fields(**values))
            self._last[key] = now
        else:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1


def _freeze_startup_objects() -> None:
    """Move every object alive once the node is up out of the cyclic collector's sight.

    The modules, the app and the joined state are some 36,000 objects that live as long as
    the process; every full (oldest-generation) collection walked all of them again: 4-9 ms
    of CPU each, and 75-305 ms of wall time (a stall of every request the node serves) when
    50 nodes shared 2 cores during a write burst. Frozen, a full collection walks only what
    was made since. The cost is that garbage cycles among those startup objects are never
    collected, and there are few such objects: the process does not fork.
    """
    gc.collect()
    gc.freeze()


class NodeRuntime:
    """A running kelipsfs node. ``run()`` until ``shutdown()``; leaves its group cleanly."""

    def __init__(self, settings: NodeSettings, wall: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.wall = wall
        self.metrics = Metrics()
        self.rng = random.Random(int.from_bytes(os.urandom(8), "big"))
        self.identity: Identity | None = None
        self._node: KelipsNode | None = None
        self._store: ObjectStore | None = None
        self._sock: trio.socket.SocketType | None = None
        self._nursery: trio.Nursery | None = None
        self._stop = trio.Event()
        self.ready = trio.Event()
        self.join_error: str | None = None
        self.ratelog = _RateLimitedLog()
        key = (load_key(settings.cluster_key_file) if settings.cluster_key_file is not None
               else open_cluster_key(settings.core.cluster_id))
        self.auth = Authenticator(key, settings.auth_window)
        self.peers: PeerClient | None = None
        self._dataplane: DataPlane | None = None
        self._primary: Primary | None = None
        self.started_at = time.time()
        self.lookups = DatagramLookups(self)
        self.chunks = Chunks(self)

    # --- accessors ----------------------------------------------------------------------------

    @property
    def node(self) -> KelipsNode:
        assert self._node is not None, "node not started"
        return self._node

    @property
    def dataplane(self) -> DataPlane:
        assert self._dataplane is not None, "node not started"
        return self._dataplane

    @property
    def primary(self) -> Primary:
        """Applies namespace operations on the inodes this node holds."""
        assert self._primary is not None, "node not started"
        return self._primary

    @property
    def store(self) -> ObjectStore:
        assert self._store is not None, "node not started"
        return self._store

    def now(self) -> float:
        return trio.current_time()

    def shutdown(self) -> None:
        self._stop.set()

    async def wait_stopped(self) -> None:
        """Until shutdown() is called (a signal, an unmount, a test)."""
        await self._stop.wait()

    # --- lifecycle ----------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        from daemon.api import build_app, serve_http
        from daemon.dataplane import DataPlane
        from daemon.namespace.migrate import migrate_loop
        from daemon.namespace.primary import Primary

        s = self.settings
        new_id = None if s.core.k == 1 or has_identity(s.data_dir) else await self._first_id()
        self.identity = load_identity(s.data_dir, self.rng, new_id)
        set_node(self.identity.node_id)
        self._store = await trio.to_thread.run_sync(ObjectStore, s.data_dir / "store")
        host, port = s.listen
        self._node = KelipsNode(s.core, self.identity.node_id, (host, port),
                                self.identity.incarnation, self.rng, self.now())
        self.peers = PeerClient(self.auth, s.http_timeout, self.wall)
        self._dataplane = dataplane = DataPlane(self)
        self._primary = Primary(self)
        self._register_gauges()
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            await sock.bind((host, port))
        except OSError as exc:
            sock.close()
            raise OSError(exc.errno, f"cannot bind UDP {host}:{port}: {exc.strerror}") from exc
        self._sock = sock
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await nursery.start(serve_http, build_app(self), s.listen)
                dataplane.publish_local_objects()
                nursery.start_soon(self._udp_loop)
                nursery.start_soon(self._timer_loop)
                nursery.start_soon(dataplane.repair.loop)
                nursery.start_soon(self._maintain_store)
                nursery.start_soon(self.chunks.loop)
                if s.bootstrap is not None:
                    nursery.start_soon(self._bootstrap_loop)
                await self._join()
                nursery.start_soon(migrate_loop, self)
                self.ready.set()
                _freeze_startup_objects()
                log.info("node up", extra=fields(
                    event="node_up", node_id=self.node.node_id.hex(),
                    address=format_address((host, port)), group=self.node.group, k=s.core.k,
                    incarnation=self.identity.incarnation))
                task_status.started()
                await self._stop.wait()
                await self._leave()
                nursery.cancel_scope.cancel()
        finally:
            sock.close()
            with trio.CancelScope(shield=True):
                await self.peers.aclose()

    async def _maintain_store(self) -> None:
        """Once a second: the record log made durable, and compacted when worth it."""
        while True:
            await trio.sleep(STORE_MAINTENANCE)
            try:
                await self.store.maintain()
            except Exception:  # background work: the next round tries again
                log.exception("store maintenance failed")

    async def _leave(self) -> None:
        """Tell the group we go, so nobody waits t_fail to notice."""
        with trio.CancelScope(shield=True):
            await self.store.sync()
        for out in self.node.leave_messages():
            await self.send_datagram(out)
        log.info("left the cluster", extra=fields(event="node_left"))

    # --- datagrams ----------------------------------------------------------------------------

    async def _udp_loop(self) -> None:
        assert self._sock is not None
        limit = self.settings.core.max_datagram
        while True:
            data, addr = await self._sock.recvfrom(MAX_UDP)
            self.metrics.inc("kelips_gossip_bytes_in_total", len(data))
            # Lookup datagrams may be larger than gossip (inline objects): the type byte is
            # peeked before the MAC check so that only they get the larger limit.
            big = limit < len(data) <= codec.LOOKUP_DATAGRAM_MAX and data[1] in _LOOKUP_CODES
            peer: Address = (addr[0], addr[1])
            if len(data) > limit and not big:
                self.reject("oversized", f"dropped a {len(data)}-byte datagram (limit {limit})",
                             peer)
                continue
            try:
                payload = self.auth.open(data, self.wall())
            except AuthError as exc:
                self.reject("auth", f"dropped an unauthenticated datagram: {exc}", peer)
                continue
            try:
                envelope = codec.decode(payload)
            except codec.DecodeError as exc:
                self.reject("malformed", f"dropped a malformed datagram: {exc}", peer)
                continue
            message = envelope.message
            if isinstance(message, (LookupRequest, LookupReply)):
                if envelope.cluster_tag != self.node.tag or envelope.k != self.node.config.k:
                    self.reject("foreign", "dropped a lookup of another cluster or k", peer)
                elif isinstance(message, LookupRequest):
                    await self.lookups.answer(peer, message)
                else:
                    self.lookups.deliver(peer, message)
                continue
            if not isinstance(message, DATAGRAM_TYPES):
                self.reject("malformed", "dropped a stream message sent as a datagram", peer)
                continue
            before = self.node.dropped
            await self.dispatch(self.node.receive(self.now(), envelope))
            if self.node.dropped > before:
                self.reject("foreign", "dropped a datagram of another cluster or k", peer)
            self._drain_events()


    def reject(self, reason: str, message: str, peer: Address) -> None:
        """Count a dropped datagram and log it (one line per reason per 10 s at most)."""
        self.metrics.inc("kelips_rejected_packets_total", reason=reason)
        self.ratelog.warn(f"rejected_{reason}", message, event="packet_rejected",
                           reason=reason, peer=format_address(peer))

    async def _timer_loop(self) -> None:
        while True:
            now = self.now()
            await self.dispatch(self.node.tick(now))
            self._drain_events()
            if self._dataplane is not None:
                self._dataplane.repair.tick(now)
            await trio.sleep_until(max(self.node.next_deadline(), now + 0.005))

    async def dispatch(self, outs: list[Outgoing]) -> None:
        for out in outs:
            if isinstance(out.message, DATAGRAM_TYPES):
                await self.send_datagram(out)
            elif isinstance(out.message, SyncRequest) and self._nursery is not None:
                self._nursery.start_soon(self._sync_with, out.dest, out.message)

    @property
    def background(self) -> trio.Nursery | None:
        """Where work that outlives a request runs (None before the node runs)."""
        return self._nursery

    async def send_datagram(self, out: Outgoing) -> None:
        assert self._sock is not None
        data = self.auth.seal(codec.encode(self.node.envelope(out.message)), self.wall())
        delay = self.settings.send_delay
        if delay > 0 and self._nursery is not None:
            self._nursery.start_soon(self._transmit, data, out.dest, delay)
            return
        await self._transmit(data, out.dest)

    async def _transmit(self, data: bytes, dest: tuple[str, int], delay: float = 0.0) -> None:
        """Send one sealed datagram, ``delay`` seconds late (the send_delay test setting)."""
        assert self._sock is not None
        if delay > 0:
            await trio.sleep(delay)
        try:
            await self._sock.sendto(data, dest)
        except OSError as exc:
            self.ratelog.warn("send_failed", f"gossip send failed: {exc}",
                               peer=format_address(dest))
            return
        self.metrics.inc("kelips_gossip_bytes_out_total", len(data))

    async def _sync_with(self, dest: tuple[str, int], message: SyncRequest) -> None:
        """Push-pull over HTTP (join, anti-entropy): the reply goes back into the core."""
        try:
            reply = await self.exchange(dest, message)
        except PeerError as exc:
            log.debug("sync failed: %s", exc, extra=fields(event="sync_failed",
                                                          peer=format_address(dest)))
            return
        await self.dispatch(self.node.receive(self.now(), reply))
        self._drain_events()

    async def exchange(self, dest: tuple[str, int], message: SyncRequest) -> Envelope:
        assert self.peers is not None
        body = codec.encode(self.node.envelope(message))
        response, rtt = await self.peers.call("POST", dest, "/v1/sync", body=body)
        try:
            reply = codec.decode(response.content)
        except codec.DecodeError as exc:
            raise PeerError(f"{dest[0]}:{dest[1]} sent a malformed snapshot: {exc}") from exc
        if not isinstance(reply.message, (Snapshot, Refusal)):
            raise PeerError(f"{dest[0]}:{dest[1]} answered a sync with {type(reply.message)}")
        if isinstance(reply.message, Snapshot):
            self.node.record_rtt(reply.message.sender.node_id, rtt)
        return reply

    def _drain_events(self) -> None:
        for event in self.node.drain_events():
            self._on_event(event)

    def _on_event(self, event: Event) -> None:
        self.metrics.inc("kelips_member_events_total", kind=event.kind)
        if event.kind in ("failed", "left"):
            self._log_member(logging.INFO, event, f"member {event.kind}")
            if self._dataplane is not None:
                self._dataplane.repair.wake()
        elif event.kind == "joined":
            self._log_member(logging.INFO, event, "member joined")
        elif event.kind == "revived":
            self._log_member(logging.INFO, event, "member is alive again")
        elif event.kind == "removed":
            self._log_member(logging.DEBUG, event, "member forgotten")
        elif event.kind == "refused":
            self.join_error = event.detail
            log.error("%s", event.detail, extra=fields(event="join_refused"))

    def _log_member(self, level: int, event: Event, message: str) -> None:
        """A membership change of the own group, with who: id, address (while known), group."""
        values: dict[str, object] = {"event": f"member_{event.kind}",
                                     "member": short_id(event.node_id),
                                     "group": group_of_node(event.node_id, self.node.config.k)}
        m = self.node.members.get(event.node_id)
        if m is not None:
            values["address"] = f"{m.host}:{m.port}"
        log.log(level, message, extra=fields(**values))

    # --- join and bootstrap -------------------------------------------------------------------

    async def _join(self) -> None:
        seeds = list(self.settings.join)
        if self.settings.bootstrap is not None:
            seeds.extend(await self._ask_bootstrap())
        seeds = [seed for seed in dict.fromkeys(seeds) if seed != self.node.address]
        if not seeds:
            if self.settings.join:
                raise JoinFailed("no seed to join through")
            self.node.mark_synced(self.now())
            log.info("starting a new cluster", extra=fields(event="cluster_started"))
            return
        last_error = "no answer"
        for attempt in range(JOIN_ATTEMPTS):
            for seed in seeds:
                try:
                    reply = await self.exchange(seed, self.node.join_request())
                except PeerError as exc:
                    last_error = str(exc)
                    continue
                if isinstance(reply.message, Refusal):
                    raise JoinRefused(reply.message.reason)
                await self.dispatch(self.node.receive(self.now(), reply))
                self._drain_events()
                if self.join_error is not None:
                    raise JoinRefused(self.join_error)
                log.info("joined the cluster", extra=fields(event="joined_cluster",
                                                            seed=format_address(seed)))
                return
            await trio.sleep(min(1.0 + attempt, 5.0))
        raise JoinFailed(f"could not reach any of {', '.join(f'{h}:{p}' for h, p in seeds)}: "
                         f"{last_error}")

    async def _ask_bootstrap(self) -> list[tuple[str, int]]:
        """Register with the introducer and return the live members it knows."""
        assert self.peers is not None and self.settings.bootstrap is not None
        try:
            doc, _ = await self.peers.call_json("POST", self.settings.bootstrap, "/v1/register",
                                                doc={"entry": entry_to_json(self.node.entry()),
                                                     "k": self.settings.core.k,
                                                     "cluster_id": self.settings.core.cluster_id})
            members = [entry_from_json(e) for e in doc.get("members", [])]
        except (PeerError, ValueError, TypeError, KeyError) as exc:
            self.ratelog.warn("bootstrap_unavailable", f"bootstrap service unavailable: {exc}",
                               peer=format_address(self.settings.bootstrap))
            return []
        return [m.address for m in members if m.node_id != self.node.node_id]

    async def _bootstrap_loop(self) -> None:
        while True:
            await trio.sleep(self.settings.bootstrap_refresh)
            await self._ask_bootstrap()

    async def _first_id(self) -> bytes:
        """No identity yet: the id whose group is smallest among a few random ones, asking
        the join addresses and the bootstrap's sample (``balanced_node_id``); a plain random
        id when none of them answers (the join then says why)."""
        s = self.settings
        peers = PeerClient(self.auth, s.http_timeout, self.wall)
        try:
            seeds = list(s.join)
            if s.bootstrap is not None:
                try:
                    doc, _ = await peers.call_json("GET", s.bootstrap, "/v1/members")
                    seeds.extend(entry_from_json(e).address for e in doc["members"])
                except (PeerError, ValueError, TypeError, KeyError):
                    pass

            async def status(address: Address) -> Any:
                try:
                    return (await peers.call_json("GET", address, "/v1/status"))[0]
                except PeerError:
                    return None

            seeds = [a for a in dict.fromkeys(seeds) if a != s.listen][:CENSUS_SEEDS]
            return await balanced_node_id(self.rng, s.core.k, seeds, status)
        finally:
            with trio.CancelScope(shield=True):
                await peers.aclose()

    # --- observability ------------------------------------------------------------------------

    def _register_gauges(self) -> None:
        def members() -> dict[tuple[tuple[str, str], ...], float]:
            own = [m for m in self.node.members.values() if m.own]
            alive = sum(1 for m in own if m.alive) + 1
            return {(("state", "alive"),): alive, (("state", "failed"),): len(own) + 1 - alive}

        def contacts() -> dict[tuple[tuple[str, str], ...], float]:
            return {(): sum(1 for m in self.node.members.values() if not m.own)}

        def objects() -> dict[tuple[tuple[str, str], ...], float]:
            return {(): self.store.usage()[0]}

        self.metrics.gauge("kelips_members", members)
        self.metrics.gauge("kelips_contacts", contacts)
        self.metrics.gauge("kelips_objects", objects)
        self.metrics.gauge("kelips_stored_chunks",
                           lambda: {(): len(self.store.names(CHUNK))})

    def status(self) -> dict[str, Any]:
        """The membership table and the node's view, as `kelipsfs status` shows it."""
        node = self.node
        now = self.now()
        held: dict[bytes, int] = {}
        for t in node.tuples:
            if not t.tombstone and not is_metadata(t.name):
                for h in t.holders:
                    held[h] = held.get(h, 0) + 1
        objects, used, free = self.store.usage()
        rows = [{"id": node.node_id.hex(), "address": f"{node.host}:{node.port}",
                 "group": node.group, "state": "alive", "heartbeat": node.heartbeat,
                 "incarnation": node.incarnation, "last_heard_s": 0.0, "rtt_ms": 0.0,
                 "objects": objects, "self": True, "role": "self"}]
        for m in sorted(node.members.values(), key=lambda m: (not m.own, m.group, m.node_id)):
            rows.append({"id": m.node_id.hex(), "address": f"{m.host}:{m.port}",
                         "group": m.group, "state": m.status.value, "heartbeat": m.heartbeat,
                         "incarnation": m.incarnation,
                         "last_heard_s": round(now - m.last_heard, 2),
                         "rtt_ms": None if m.rtt is None else round(m.rtt * 1000, 2),
                         "objects": held.get(m.node_id, 0), "self": False,
                         "role": "member" if m.own else "contact"})
        return {"node_id": node.node_id.hex(), "address": f"{node.host}:{node.port}",
                "group": node.group, "k": self.settings.core.k,
                "cluster_id": self.settings.core.cluster_id,
                "group_size": node.group_size(),
                "n_estimate": node.estimated_size(), "synced": node.synced,
                "contacts_per_group": {str(g): len(ids) for g, ids in
                                       sorted(node.contacts.items())},
                "contact_budget": node.contact_budget(),
                "tuples": len(node.tuples), "stored_bytes": used, "free_bytes": free,
                "members": rows}
