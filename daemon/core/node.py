"""The Kelips node as a pure state machine: (time, message) in, messages to send out.

Nothing here touches a socket, a clock or global randomness: every entry point takes ``now``
(seconds on the driver's monotonic clock) and randomness comes from the injected
``random.Random``. The trio daemon and the simulator are two drivers of this one class.

Driver contract:
- call ``tick(now)`` no later than ``next_deadline()``; send what it returns;
- feed every decoded envelope to ``receive(now, envelope)``; send what it returns;
- drain ``drain_events()`` for failures, joins and refusals (repair, metrics, logs);
- use ``plan_lookup`` / ``answer_lookup`` / ``answer_lookup_request`` / ``plan_insert`` /
  ``placement`` for the data path
  and ``record_write`` / ``repair_tasks`` / ``repair_done`` to keep tuples and copies right.
"""

from __future__ import annotations

import bisect
import math
import random
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import NamedTuple

from . import codec, placement
from .config import AUTH_TRAILER, CoreConfig
from .ids import NodeId, cluster_tag, group_of_name, group_of_node
from .members import Graveyard, Member, Status
from .messages import (
    BEAT_PREFIX,
    DATAGRAM_TYPES,
    Ack,
    Address,
    Beat,
    Envelope,
    Gossip,
    Leave,
    LookupReply,
    LookupRequest,
    MemberEntry,
    Message,
    Outgoing,
    Refusal,
    Snapshot,
    SyncRequest,
    TupleEntry,
    Version,
)
from .tuples import HybridClock, TupleStore, make_version, with_holders

_HOT_ROUNDS = 3  # an entry changed within this many gossip rounds goes first in messages
_FRESH_SENDS = 3  # messages that carry a newly learned member's full entry
_PROBE_ENTRIES = 8  # own-group entries a probe carries to a foreign node (its candidates)
_SPARES = 3  # extra repair candidates offered beyond the copies needed
_DEPARTED_EVERY = 4  # rounds between probes of a forgotten member (partition healing)
_DEPARTED_MAX = 4  # one answer from the other side of a partition is enough
_DEPARTED_TTL = 3600.0
_RUMOR_SENDS = 3  # messages that carry a changed tuple (x fanout deliveries: e^-6 miss)
_FRESH_PER_MESSAGE = 4  # at most this many such entries in one message
_ROTATING_FULL = 2  # full own-group entries per message besides new members (heals gaps)
_SYNC_RETRY = 2.0  # seconds between join-sync attempts to the own group
_REPAIR_RETRY = 10.0  # seconds before an unfinished repair is planned again
_MAX_EXPLORING = 2
_CANDIDATES = 8
_SPARE_POOL = 16  # foreign members heard of beyond the contacts, one per group at most
_HOLDER_RTT_SLACK = 2.0  # a likely-holder contact is asked first if within 2x the nearest's RTT
_HOLDER_RTT_FLOOR = 0.001  # ... plus this (seconds): on a LAN every contact qualifies
_SPARE_FRESH_ROUNDS = 2  # a spare heard within this many gossip intervals may be asked first
# Contact budget (see _update_contact_budget): how fast the estimate of the own group's load
# above the average follows the acks' reports and the own group's estimates, how many
# reports before it is used, the entries a node above average stays below the average
# node's state (room for the estimate's noise), and the hysteresis before a trimmed node
# takes second contacts again.
_LOAD_WEIGHT = 1 / 8  # an ack's report (one foreign group: noisy)
_PEER_LOAD_WEIGHT = 1 / 2  # an own-group member's estimate (already an average)
_LOAD_MIN_REPORTS = 4
_STATE_MARGIN = 1
_BUDGET_MIN_GROUPS = 8  # fewer foreign groups: each contact matters, the state is all tuples
_CONTACT_REFILL = 2
_LOAD_SCALE = 16  # the wire carries load estimates in sixteenths of an entry (int16)


class Event(NamedTuple):
    """Something drivers may act on or count: kind is one of EVENT_KINDS."""

    kind: str
    node_id: NodeId
    at: float
    detail: str = ""


EVENT_KINDS = ("joined", "failed", "revived", "removed", "left", "contact_added",
               "contact_dropped", "refused", "synced")


@dataclass(frozen=True)
class LookupPlan:
    """Where to find a name: locally (own group) or by asking these contacts, nearest first."""

    name: str
    group: int
    local: bool
    entry: TupleEntry | None
    ask: tuple[MemberEntry, ...]


class _Spare(NamedTuple):
    """A foreign member kept beyond the contacts, and when it was last heard of."""

    entry: MemberEntry
    heard: float


@dataclass(frozen=True)
class LookupAnswer:
    """A contact's answer: the tuple and its live holders; when the contact does not know the
    name (yet: tuples spread by gossip), the members a write would have placed it on, so a
    just-written object is still found by asking them directly."""

    entry: TupleEntry | None
    holders: tuple[MemberEntry, ...]
    candidates: tuple[MemberEntry, ...] = ()


class LookupAction(NamedTuple):
    """The answer to a LookupRequest: a reply to send (to the asker), with the bytes of
    ``attach`` inline if the driver's copy is exactly that version; or the request forwarded
    to a holder (``forward``), which answers the asker itself."""

    reply: Outgoing | None
    attach: TupleEntry | None = None
    forward: Outgoing | None = None


@dataclass(frozen=True)
class RepairTask:
    """Copy ``entry``'s bytes from this node to ``targets``, then call repair_done.

    ``spares`` are the next candidates in placement order: when a target refuses (its disk
    is full, it just failed) the driver copies to a spare instead, so one full node cannot
    keep an object under-replicated forever.
    """

    entry: TupleEntry
    targets: tuple[MemberEntry, ...]
    spares: tuple[MemberEntry, ...] = ()


class _Probe:
    __slots__ = ("contact", "entry", "misses", "sent_at")

    def __init__(self, sent_at: float, contact: bool, entry: MemberEntry) -> None:
        self.sent_at = sent_at
        self.misses = 0
        self.contact = contact
        self.entry = entry


class KelipsNode:
    """One node's protocol state: own-group view, contacts, file tuples, failure detector."""

    def __init__(self, config: CoreConfig, node_id: NodeId, address: Address, incarnation: int,
                 rng: random.Random, now: float) -> None:
        self.config = config
        self.node_id = node_id
        self.host, self.port = address
        self.incarnation = incarnation
        self.heartbeat = 0
        self.group = group_of_node(node_id, config.k)
        self.rng = rng
        self.tag = cluster_tag(config.cluster_id)
        self.members: dict[NodeId, Member] = {}
        self.contacts: dict[int, list[NodeId]] = {}
        self.graveyard = Graveyard()
        self.tuples = TupleStore(_RUMOR_SENDS)
        self.clock = HybridClock()
        self.dropped = 0  # messages refused (wrong cluster or k)
        self.synced = True  # False while a join still needs a snapshot from the own group
        # ``knows_absence`` holds only once the own group's view has settled: t_fail after the
        # last change of it (or the join), a snapshot of a member's tuples pulled since.
        self._settled = False
        self._settle_at = now + config.t_fail
        self._settle_asked: tuple[NodeId, float] | None = None
        self._events: list[Event] = []
        gi = config.gossip_interval
        self._next_heartbeat = now + config.heartbeat_interval
        self._next_gossip = now + rng.uniform(0, gi)
        self._next_scan = now + config.heartbeat_interval
        self._next_anti_entropy = now + rng.uniform(0.5, 1.0) * config.anti_entropy_interval
        self._next_sync = now
        self._changed: OrderedDict[NodeId, float] = OrderedDict()
        self._own_alive: list[Member] | None = None
        self._cum_weights: list[float] = []
        self._weights_at = -1e18
        self._own_cursor = 0
        self._contact_list: list[NodeId] | None = None
        self._contact_cursor = 0
        self._probe_cursor = -1
        self._probes: dict[NodeId, _Probe] = {}
        self._candidates: deque[MemberEntry] = deque(maxlen=_CANDIDATES)
        # Foreign members heard of lately beyond the contacts, per group: asked when every
        # contact of a group is dead and not yet replaced (after a crash of several nodes,
        # the failure detector needs t_fail before a contact's place is free again).
        # A pool of constant size, not one per group: the state stays 3*sqrt(N) + F/k + O(1).
        self._spares: OrderedDict[int, _Spare] = OrderedDict()  # group -> latest heard
        self._repairing: dict[str, float] = {}
        self._tuple_watcher: Callable[[TupleEntry], None] | None = None
        # What the next repair check looks at: every tuple after a membership change, else
        # only the names merged since (a check stays O(changes), not O(tuples)).
        self._repair_all = False
        self._repair_names: set[str] = set()
        self._last_group_gossip = now  # when gossip from the own group last arrived
        self._by_prefix: dict[bytes, Member] = {}  # beat prefix -> own-group member
        self._ambiguous: set[bytes] = set()  # prefixes shared by two members (rare)
        self._fresh: OrderedDict[NodeId, int] = OrderedDict()  # new members: full-entry sends left
        # Members forgotten lately, probed now and then: after a partition longer than t_fail
        # both sides have failed each other, and without this nothing would ever cross again.
        self._departed: OrderedDict[NodeId, tuple[MemberEntry, float]] = OrderedDict()
        # Own-group members back from a partition (or a false failure): one side of each pair
        # pushes a full snapshot at once, so the tuples written apart meet within a gossip round
        # instead of waiting for the next anti-entropy (up to a minute).
        self._resync: set[NodeId] = set()
        self._rounds = 0
        # How many entries the own group (members + tuples) holds above the groups that
        # answered our probes (moving average); and the contacts we allow ourselves.
        self._load_excess = 0.0
        self._load_reports = 0
        self._load_known = False
        self._contact_cap = self._full_contacts()
        budget = config.max_datagram - AUTH_TRAILER - codec.GOSSIP_OVERHEAD
        if budget < codec.MEMBER_SIZE * 4:
            raise ValueError("max_datagram leaves no room for member entries")
        self._budget = budget

    # --- identity and introspection ------------------------------------------------------------

    def entry(self) -> MemberEntry:
        return MemberEntry(self.node_id, self.host, self.port, self.incarnation, self.heartbeat)

    @property
    def address(self) -> Address:
        return (self.host, self.port)

    def envelope(self, message: Message) -> Envelope:
        return Envelope(self.tag, self.config.k, message)

    @property
    def has_events(self) -> bool:
        return bool(self._events)

    def drain_events(self) -> list[Event]:
        events, self._events = self._events, []
        return events

    def own_alive(self) -> list[Member]:
        """Live members of the own group, excluding this node."""
        if self._own_alive is None:
            self._own_alive = [m for m in self.members.values() if m.own and m.alive]
        return self._own_alive

    def live_contacts(self, group: int) -> list[Member]:
        out = []
        for nid in self.contacts.get(group, ()):
            m = self.members.get(nid)
            if m is not None and m.alive:
                out.append(m)
        return out

    def state_entries(self) -> int:
        """Entries of soft state that grow with N and F: members (alive or failed), contacts,
        tuples, graves and forgotten members. The two fixed-size caches of foreign addresses
        (``_CANDIDATES`` contact candidates, ``_SPARE_POOL`` lookup spares: 24 at most) are
        left out and stated beside every state figure."""
        return len(self.members) + len(self.tuples) + len(self.graveyard) + len(self._departed)

    def contact_budget(self) -> int:
        """Contacts this node allows itself now: ``contacts_per_group`` in every foreign group,
        minus the second (third...) contacts given up while its group is heavier than average."""
        return self._contact_cap

    def group_size(self) -> int:
        """Live members of the own group, this node included: what it tells a node that
        weighs its candidate ids by group size (``daemon.core.balance``)."""
        return len(self.own_alive()) + 1

    def estimated_size(self) -> int:
        """N estimate: own group size times k (groups are equal in expectation)."""
        return self.group_size() * self.config.k

    def next_deadline(self) -> float:
        return min(self._next_heartbeat, self._next_gossip, self._next_scan)

    # --- time ---------------------------------------------------------------------------------

    def tick(self, now: float) -> list[Outgoing]:
        """Advance timers: heartbeat, failure detection, probes, gossip, anti-entropy."""
        out: list[Outgoing] = []
        cfg = self.config
        if now >= self._next_heartbeat:
            self.heartbeat += 1
            self._next_heartbeat = max(self._next_heartbeat + cfg.heartbeat_interval,
                                       now + 0.5 * cfg.heartbeat_interval)
        if now >= self._next_scan:
            self._scan(now)
            self._update_contact_budget(now)
            self._next_scan = now + 0.5 * cfg.heartbeat_interval
        if now >= self._next_gossip:
            self._next_gossip = max(self._next_gossip + cfg.gossip_interval,
                                    now + 0.5 * cfg.gossip_interval)
            self._expire_probes(now, out)
            self._gossip_round(now, out)
        if self._resync:
            self._send_resyncs(out)
        self._settle(now, out)
        if not self.synced and now >= self._next_sync:
            self._next_sync = now + _SYNC_RETRY
            self._send_sync(now, out)
        elif now >= self._next_anti_entropy:
            self._next_anti_entropy = now + cfg.anti_entropy_interval * self.rng.uniform(0.8, 1.2)
            self._send_sync(now, out)
        return out

    def _scan(self, now: float) -> None:
        """Failure detection over the own group: t_fail marks failed, t_cleanup forgets."""
        cfg = self.config
        t_fail, t_cleanup = cfg.t_fail, cfg.t_cleanup
        gone: list[Member] = []
        for m in self.members.values():
            if not m.own:
                continue
            silent = now - m.last_heard
            if m.status is Status.ALIVE:
                if silent > t_fail:
                    m.status = Status.FAILED
                    m.failed_at = now
                    self._membership_changed(now)
                    self._events.append(Event("failed", m.node_id, now))
            elif silent > t_cleanup:
                gone.append(m)
        for m in gone:
            self._remove_member(m.node_id)
            self._departed[m.node_id] = (m.entry(), now + _DEPARTED_TTL)
            self._departed.move_to_end(m.node_id)
            while len(self._departed) > _DEPARTED_MAX:
                self._departed.popitem(last=False)
            self.graveyard.bury(m.node_id, (m.incarnation, m.heartbeat), now + cfg.graveyard_ttl)
            self._events.append(Event("removed", m.node_id, now))
        self.graveyard.expire(now)
        for name in self.tuples.expire_tombstones(now, cfg.tombstone_ttl):
            self._repairing.pop(name, None)

    def _add_member(self, member: Member, rumor: bool = True) -> None:
        self.members[member.node_id] = member
        if member.own:
            prefix = member.node_id[:BEAT_PREFIX]
            other = self._by_prefix.get(prefix)
            if (other is not None and other is not member) or prefix in self._ambiguous:
                # Two members share a beat prefix: beats for it mean nothing; both travel
                # as full entries instead (see _build_own_message).
                self._ambiguous.add(prefix)
                self._by_prefix.pop(prefix, None)
            else:
                self._by_prefix[prefix] = member
            if rumor:
                self._fresh[member.node_id] = _FRESH_SENDS

    def _remove_member(self, node_id: NodeId) -> Member | None:
        member = self.members.pop(node_id, None)
        if member is not None and member.own:
            prefix = node_id[:BEAT_PREFIX]
            if self._by_prefix.get(prefix) is member:
                del self._by_prefix[prefix]
            self._fresh.pop(node_id, None)
        return member

    def _membership_changed(self, now: float) -> None:
        self._own_alive = None
        self._weights_at = -1e18
        self._repair_all = True
        self._unsettle(now)

    def _unsettle(self, now: float) -> None:
        """The own group's view changed (or this node joined): writers whose view differed
        may have placed names without this node, and their tuples reach it by gossip. Missing
        names are asked of their holders again until the view has been stable for t_fail and
        a member's snapshot has been pulled since (``_settle``)."""
        self._settled = False
        self._settle_at = now + self.config.t_fail
        self._settle_asked = None

    def _settle(self, now: float, out: list[Outgoing]) -> None:
        """Pull a member's snapshot once the view is stable (``_unsettle``); asked again of
        another member if no answer came within t_fail."""
        if self._settled or not self.synced or now < self._settle_at:
            return
        if self._settle_asked is not None and now - self._settle_asked[1] < self.config.t_fail:
            return
        pool = self.own_alive()
        if not pool:
            self._settled = True  # nobody else of the group: nobody else writes its names
            return
        target = self.rng.choice(pool)
        self._settle_asked = (target.node_id, now)
        snap = self.snapshot()
        out.append(Outgoing(target.address, SyncRequest(self.entry(), snap.members, snap.tuples,
                                                        snap.load_excess)))

    # --- gossip -------------------------------------------------------------------------------

    def _gossip_round(self, now: float, out: list[Outgoing]) -> None:
        cfg = self.config
        targets = self._pick_targets(now, cfg.fanout)
        if targets:
            members, tuples, beats = self._build_own_message(now)
            load = self._load_field()
            # Spatial weighting sends less to far members; one that hears nothing for two
            # rounds asks its targets to answer with gossip, so no view goes stale.
            pull = now - self._last_group_gossip > 2 * cfg.gossip_interval
            for target in targets:
                want_ack = target.rtt is None or self.rng.random() < cfg.rtt_refresh_probability
                msg = Gossip(self.entry(), _ms(now), want_ack, members, tuples, pull, beats,
                             load)
                if want_ack and target.node_id not in self._probes:
                    self._probes[target.node_id] = _Probe(now, False, target.entry())
                out.append(Outgoing(target.address, msg))
        contact = self._next_contact_to_probe()
        if contact is not None:
            self._probe(now, contact.entry(), True, out)
        self._rounds += 1
        if self._departed and self._rounds % _DEPARTED_EVERY == 0:
            nid, (entry, expires) = next(iter(self._departed.items()))
            del self._departed[nid]
            if expires > now and nid not in self.members:
                self._departed[nid] = (entry, expires)  # back of the queue
                self._probe(now, entry, False, out)
        if self._candidates and len([p for p in self._probes.values() if not p.contact
                                     and p.entry.node_id not in self.members]) < _MAX_EXPLORING \
                and self.rng.random() < cfg.explore_probability:
            candidate = self._candidates.popleft()
            if candidate.node_id not in self.members and candidate.node_id not in self._probes:
                self._probe(now, candidate, False, out)

    def _probe(self, now: float, target: MemberEntry, contact: bool, out: list[Outgoing]) -> None:
        """A gossip with our group's freshest entries that asks for an ack (liveness + RTT)."""
        picked = self._select_own(now, _PROBE_ENTRIES, {self.node_id})
        members = tuple(m.entry() for m in picked)
        out.append(Outgoing(target.address, Gossip(self.entry(), _ms(now), True, members, ())))
        probe = self._probes.get(target.node_id)
        if probe is None:
            self._probes[target.node_id] = _Probe(now, contact, target)
        else:
            probe.sent_at = now

    def _expire_probes(self, now: float, out: list[Outgoing]) -> None:
        cfg = self.config
        for nid, probe in list(self._probes.items()):
            m = self.members.get(nid)
            timeout = cfg.probe_timeout
            if m is not None and m.rtt is not None:
                timeout = max(timeout, 4 * m.rtt)
            if now - probe.sent_at < timeout:
                continue
            if not probe.contact or m is None or m.own:
                del self._probes[nid]  # RTT refreshes and explorations are best effort
                continue
            probe.misses += 1
            if probe.misses >= cfg.probe_misses:
                del self._probes[nid]
                self._drop_contact(m, now)
            else:
                self._probe(now, probe.entry, True, out)  # retry at once: loss is not death

    def _pick_targets(self, now: float, fanout: int) -> list[Member]:
        """Spatial gossip: own-group targets weighted toward low RTT, some uniform."""
        pool = self.own_alive()
        if not pool:
            return []
        if len(pool) <= fanout:
            return list(pool)
        if now - self._weights_at > 5.0:
            self._recompute_weights(pool, now)
        chosen: list[Member] = []
        seen: set[int] = set()
        rng = self.rng
        cfg = self.config
        total = self._cum_weights[-1]
        attempts = 0
        while len(chosen) < fanout and attempts < 8 * fanout:
            attempts += 1
            if rng.random() < cfg.uniform_share:
                i = rng.randrange(len(pool))
            else:
                i = bisect.bisect_left(self._cum_weights, rng.random() * total)
                i = min(i, len(pool) - 1)
            if i not in seen:
                seen.add(i)
                chosen.append(pool[i])
        return chosen

    def _recompute_weights(self, pool: list[Member], now: float) -> None:
        cfg = self.config
        floor, exponent = cfg.rtt_floor, cfg.rtt_exponent
        known = [m.rtt for m in pool if m.rtt is not None]
        default_rtt = sorted(known)[len(known) // 2] if known else floor
        acc = 0.0
        cum = []
        for m in pool:
            rtt = m.rtt if m.rtt is not None else default_rtt
            acc += (floor / max(rtt, floor)) ** exponent
            cum.append(acc)
        self._cum_weights = cum
        self._weights_at = now

    def _build_own_message(self, now: float) -> tuple[tuple[MemberEntry, ...],
                                                      tuple[TupleEntry, ...],
                                                      tuple[Beat, ...]]:
        """This round's body for own-group targets, filled to the datagram budget.

        Heartbeats come first -- a burst of writes must never starve the failure detector --
        but leave ``tuple_share`` of the budget to hot tuples when there are any; then
        foreign (contact) entries, full entries of new members, and cold tuples in whatever
        room is left.
        """
        cfg = self.config
        budget = self._budget
        full: list[MemberEntry] = []
        contact_ids = self._all_contacts()
        n = len(contact_ids)
        foreign_slots = min(n, int(self._budget * cfg.foreign_share) // codec.MEMBER_SIZE)
        for _ in range(n):
            if len(full) >= foreign_slots:
                break
            if self._contact_cursor >= n:
                self._contact_cursor = 0
            m = self.members.get(contact_ids[self._contact_cursor])
            self._contact_cursor += 1
            if m is not None and m.alive:
                full.append(m.entry())
        own_full = self._fresh_entries(_FRESH_PER_MESSAGE)
        if self._ambiguous:
            taken = {e.node_id for e in own_full}
            own_full.extend(m.entry() for m in self.own_alive()
                            if m.node_id[:BEAT_PREFIX] in self._ambiguous
                            and m.node_id not in taken)
        full.extend(own_full)
        budget -= codec.MEMBER_SIZE * len(full)
        # Room for changed tuples: what they need, up to tuple_share (more for one long name).
        hot_reserve = 0
        if self.tuples.hot_count:
            hot_reserve = min(budget, self.tuples.hot_bytes(int(self._budget * cfg.tuple_share),
                                                            codec.tuple_size))
        skip = {e.node_id for e in own_full}
        skip.add(self.node_id)
        beat_slots = max(0, (budget - hot_reserve) // codec.BEAT_SIZE)
        beats = tuple(m.beat() for m in self._select_own(now, beat_slots, skip))
        budget -= codec.BEAT_SIZE * len(beats)
        tuples: list[TupleEntry] = []
        if self.tuples.hot_count:
            tuples = self.tuples.select_hot(budget, codec.tuple_size)
            budget -= sum(map(codec.tuple_size, tuples))
        if len(self.tuples) and budget > codec.TUPLE_FIXED_SIZE:
            tuples.extend(self.tuples.select_cold(budget, {t.name for t in tuples},
                                                  codec.tuple_size))
        return tuple(full), tuple(tuples), beats

    def _fresh_entries(self, limit: int) -> list[MemberEntry]:
        """Full entries of own-group members learned lately (rumor counted), plus a couple in
        rotation, so receivers that do not know a member yet learn its address."""
        chosen: list[MemberEntry] = []
        fresh = self._fresh
        for _ in range(len(fresh)):
            if len(chosen) >= limit:
                break
            nid, left = next(iter(fresh.items()))
            m = self.members.get(nid)
            if m is None or not m.alive:
                del fresh[nid]
                continue
            chosen.append(m.entry())
            if left <= 1:
                del fresh[nid]
            else:
                fresh[nid] = left - 1
                fresh.move_to_end(nid)
        taken = {e.node_id for e in chosen}
        taken.add(self.node_id)
        for m in self._select_own(-1.0, min(_ROTATING_FULL, max(0, limit - len(chosen))), taken):
            chosen.append(m.entry())
        return chosen

    def _select_own(self, now: float, slots: int, skip: set[NodeId]) -> list[Member]:
        """Own-group members: those whose heartbeat rose lately (freshest first, at most half
        the slots), then a rotation over the whole group for the rest.

        The cap matters: with only "freshest first", an entry that falls a little behind is
        never fresh at anyone and is never sent again -- rotation guarantees every member
        leaves every node at least once per len(group) / (slots / 2) rounds. ``now`` < 0
        means rotation only.
        """
        chosen: list[Member] = []
        if slots <= 0:
            return chosen
        taken = set(skip)
        members = self.members
        if now >= 0:
            window = now - _HOT_ROUNDS * self.config.gossip_interval
            changed = self._changed
            while changed:
                nid, at = next(iter(changed.items()))
                if at >= window:
                    break
                changed.popitem(last=False)
            hot_limit = max(1, slots // 2)
            for nid in reversed(changed):
                if len(chosen) >= hot_limit:
                    break
                m = members.get(nid)
                if m is not None and m.alive and nid not in taken:
                    chosen.append(m)
                    taken.add(nid)
        pool = self.own_alive()
        n = len(pool)
        for _ in range(n):
            if len(chosen) >= slots:
                break
            if self._own_cursor >= n:
                self._own_cursor = 0
            m = pool[self._own_cursor]
            self._own_cursor += 1
            if m.node_id not in taken:
                chosen.append(m)
                taken.add(m.node_id)
        return chosen

    def _all_contacts(self) -> list[NodeId]:
        if self._contact_list is None:
            self._contact_list = [nid for ids in self.contacts.values() for nid in ids]
        return self._contact_list

    def _next_contact_to_probe(self) -> Member | None:
        ids = self._all_contacts()
        if self._probe_cursor < 0 and ids:
            # Start the rotation anywhere: nodes that learned their contacts in the same order
            # must not all probe (and hear the load of) the same groups at the same time.
            self._probe_cursor = self.rng.randrange(len(ids))
        for _ in range(len(ids)):
            if self._probe_cursor >= len(ids):
                self._probe_cursor = 0
            nid = ids[self._probe_cursor]
            self._probe_cursor += 1
            m = self.members.get(nid)
            if m is not None and nid not in self._probes:
                return m
        return None

    # --- receiving ----------------------------------------------------------------------------

    def receive(self, now: float, envelope: Envelope) -> list[Outgoing]:
        """Apply one decoded message; returns the replies to send."""
        message = envelope.message
        if isinstance(message, Refusal):
            self._events.append(Event("refused", b"", now, message.reason))
            return []
        if envelope.cluster_tag != self.tag or envelope.k != self.config.k:
            self.dropped += 1
            if isinstance(message, SyncRequest):
                return [Outgoing(message.sender.address, Refusal(self._refusal_reason(envelope)))]
            if isinstance(message, Snapshot):
                self._events.append(Event("refused", message.sender.node_id, now,
                                          "snapshot from a node of another cluster or k"))
            return []
        if isinstance(message, Gossip):
            return self._on_gossip(now, message)
        if isinstance(message, Ack):
            self._on_ack(now, message)
            return []
        if isinstance(message, Leave):
            self._on_leave(now, message.sender)
            return []
        if isinstance(message, (LookupRequest, LookupReply)):
            return []  # the data path's: see answer_lookup_request
        self._merge_bulk(now, message.sender, message.members, message.tuples)
        if message.load_excess is not None \
                and group_of_node(message.sender.node_id, self.config.k) == self.group:
            self._observe_peer_load(message.load_excess)
        if self._load_known:
            self._update_contact_budget(now)  # a joiner trims before it gossips its contacts
        if isinstance(message, SyncRequest):
            return [Outgoing(message.sender.address, self.snapshot(message.sender.node_id))]
        if self._settle_asked is not None and self._settle_asked[0] == message.sender.node_id \
                and not self._settled:
            self._settled = True  # (merged above: every tuple that member had)
        if not self.synced and (
                group_of_node(message.sender.node_id, self.config.k) == self.group
                or not self.own_alive()):
            # A snapshot from our own group, or from a contact that knows nobody of it (then
            # we are the first of our group): the join has all there is to learn.
            self.mark_synced(now)
            self._events.append(Event("synced", message.sender.node_id, now))
        return []

    def _refusal_reason(self, envelope: Envelope) -> str:
        if envelope.cluster_tag != self.tag:
            return (f"join refused: the node belongs to another cluster (cluster_id differs from "
                    f"{self.config.cluster_id!r})")
        return (f"join refused: this cluster uses k={self.config.k} affinity groups, the joining "
                f"node has k={envelope.k}; start it with k={self.config.k}")

    def _on_gossip(self, now: float, msg: Gossip) -> list[Outgoing]:
        self._merge_entry(now, msg.sender)
        for entry in msg.members:
            self._merge_entry(now, entry)
        by_prefix = self._by_prefix
        for beat in msg.beats:
            m = by_prefix.get(beat.prefix)
            if m is not None and m.absorb_digest(beat, now):
                self._heard(m, now)
        for t in msg.tuples:
            self.merge_tuple(now, t)
        sender = self.members.get(msg.sender.node_id)
        own_sender = sender is not None and sender.own
        if own_sender:
            if msg.members or msg.beats:  # (an announce is not a gossip round)
                self._last_group_gossip = now
            if msg.load_excess is not None:
                self._observe_peer_load(msg.load_excess)
        out: list[Outgoing] = []
        if msg.want_ack:
            out.append(Outgoing(msg.sender.address, Ack(self.entry(), msg.ts_ms,
                                                        self.group_size(), len(self.tuples))))
        if msg.pull and own_sender:
            members, tuples, beats = self._build_own_message(now)
            reply = Gossip(self.entry(), _ms(now), False, members, tuples, False, beats,
                           self._load_field())
            out.append(Outgoing(msg.sender.address, reply))
        return out

    def _on_ack(self, now: float, msg: Ack) -> None:
        entry = msg.sender
        self._merge_entry(now, entry)
        sample = ((_ms(now) - msg.echo_ts_ms) & 0xFFFFFFFF) / 1000.0
        probe = self._probes.pop(entry.node_id, None)
        m = self.members.get(entry.node_id)
        group = m.group if m is not None else group_of_node(entry.node_id, self.config.k)
        if msg.group_members and self.synced and group != self.group:
            self._observe_load(msg.group_members + msg.group_tuples)
        if m is not None:
            if sample < 60.0:
                m.observe_rtt(sample)
            return
        if probe is not None and sample < 60.0:
            self._consider_closer_contact(now, entry, sample)

    def _on_leave(self, now: float, entry: MemberEntry) -> None:
        m = self.members.get(entry.node_id)
        if m is None or (entry.incarnation, entry.heartbeat) < (m.incarnation, m.heartbeat):
            return
        m.absorb(entry, now)  # gossip older than the Leave must not revive the member
        if m.own:
            if m.alive:
                m.status = Status.FAILED
                m.failed_at = now
                m.last_heard = min(m.last_heard, now - self.config.t_fail)
                self._membership_changed(now)
                self._events.append(Event("left", m.node_id, now))
        else:
            self._drop_contact(m, now, bury=True)

    def _merge_bulk(self, now: float, sender: MemberEntry, members: tuple[MemberEntry, ...],
                    tuples: tuple[TupleEntry, ...]) -> None:
        self._merge_entry(now, sender)
        for entry in members:
            self._merge_entry(now, entry, rumor=False)
        for t in tuples:
            self.merge_tuple(now, t)

    def _merge_entry(self, now: float, entry: MemberEntry, rumor: bool = True) -> None:
        """Merge one gossiped member entry: monotone in (incarnation, heartbeat).

        A member learned from gossip is news worth spreading (``rumor``); one learned from a
        snapshot is already known to the snapshot's group and is not re-broadcast."""
        nid = entry.node_id
        m = self.members.get(nid)
        if m is not None:
            incarnation = m.incarnation
            if m.absorb(entry, now):
                self._heard(m, now)
                if m.own and m.incarnation != incarnation:
                    self._fresh[nid] = _FRESH_SENDS  # a new life: beats cannot carry it
            return
        if nid == self.node_id:
            if (entry.incarnation, entry.heartbeat) > (self.incarnation, self.heartbeat):
                # Someone remembers a later life of ours (we restarted without our state):
                # move to a higher incarnation so our fresh heartbeats are believed again.
                self.incarnation = entry.incarnation + 1
                self.heartbeat = 0
            return
        if self.graveyard.blocks(entry):
            return
        group = group_of_node(nid, self.config.k)
        if group == self.group:
            self.graveyard.forget(nid)
            if self._departed.pop(nid, None) is not None:
                self._note_return(nid)
            self._add_member(Member(entry, group, True, now), rumor)
            self._changed[nid] = now
            self._membership_changed(now)
            self._events.append(Event("joined", nid, now))
            return
        contacts = self.contacts.get(group)
        if contacts is None:
            contacts = self.contacts[group] = []
        if self._room_for_contact(contacts):
            self.graveyard.forget(nid)
            self._add_contact(Member(entry, group, False, now), now)
        else:
            self._keep_spare(group, entry, now)
            if len(self._candidates) < _CANDIDATES or self.rng.random() < 0.1:
                self._candidates.append(entry)

    def _heard(self, m: Member, now: float) -> None:
        """A member's liveness rose: it is fresh news, and a failed member is alive again."""
        if m.own:
            self._changed[m.node_id] = now
            self._changed.move_to_end(m.node_id)
        if m.status is Status.FAILED:
            m.status = Status.ALIVE
            if m.own:
                self._note_return(m.node_id)
            self._membership_changed(now)
            self._events.append(Event("revived", m.node_id, now))

    def _consider_closer_contact(self, now: float, entry: MemberEntry, rtt: float) -> None:
        """An explored foreign node answered: make it a contact if clearly closer than the worst."""
        group = group_of_node(entry.node_id, self.config.k)
        if group == self.group or self.graveyard.blocks(entry):
            return
        contacts = self.contacts.setdefault(group, [])
        if self._room_for_contact(contacts):
            worst = None
        else:
            current = [self.members[nid] for nid in contacts]
            worst = max(current, key=lambda c: c.rtt if c.rtt is not None else float("inf"))
            if worst.rtt is not None and worst.rtt <= rtt * 1.2:
                return
            self._drop_contact(worst, now, bury=False)
        member = Member(entry, group, False, now)
        member.observe_rtt(rtt)
        self._add_contact(member, now)

    def _add_contact(self, member: Member, now: float) -> None:
        """Make a member of a foreign group a contact (the caller checked the room)."""
        self._forget_spare(member.group, member.node_id)
        self._add_member(member)
        self.contacts.setdefault(member.group, []).append(member.node_id)
        self._contact_list = None
        self._events.append(Event("contact_added", member.node_id, now))

    # --- contact budget -----------------------------------------------------------------------

    def _full_contacts(self) -> int:
        return self.config.contacts_per_group * (self.config.k - 1)

    def _room_for_contact(self, contacts: list[NodeId]) -> bool:
        """May this group's contact list grow? Its first contact always (every group must stay
        one hop away); more up to ``contacts_per_group`` while the budget allows."""
        if not contacts:
            return True
        if len(contacts) >= self.config.contacts_per_group:
            return False
        cap = self._contact_cap
        if cap < self._full_contacts():
            cap -= _CONTACT_REFILL  # trimmed lately: no flapping around the cap
        return len(self._all_contacts()) < cap

    def _observe_load(self, foreign: int) -> None:
        """A node of another group reported its group's members + tuples: fold the difference
        to our own group's at this moment into the moving estimate of how far above average
        we are."""
        own = self.group_size() + len(self.tuples)
        self._load_reports += 1
        weight = max(_LOAD_WEIGHT, 1.0 / self._load_reports)
        self._load_excess += weight * ((own - foreign) - self._load_excess)
        if self._load_reports >= _LOAD_MIN_REPORTS:
            self._load_known = True

    def _observe_peer_load(self, sixteenths: int) -> None:
        """An own-group member's estimate of the same excess: average with it. One report is
        one foreign group, whose load is as uneven as ours; averaged over the group's members
        the estimate is as good as ~n_g times the reports, so no member trims on noise."""
        peer = sixteenths / _LOAD_SCALE
        if not self._load_known:
            self._load_excess = peer
            self._load_known = True
        else:
            self._load_excess += _PEER_LOAD_WEIGHT * (peer - self._load_excess)

    def _load_field(self) -> int | None:
        if not self._load_known:
            return None
        return max(-32767, min(32767, round(self._load_excess * _LOAD_SCALE)))

    def _update_contact_budget(self, now: float) -> None:
        """Keep this node's state at most the average node's: (N/k - 1) + c(k - 1) + F/k.

        Names and ids are hashed onto groups, so some groups hold more members and, above
        all, more file tuples than the average (the fullest of 100 groups has ~3 standard
        deviations more), and every member of such a group would keep that excess on top of
        c contacts in every other group. Instead, a node whose group is heavier gives up as
        many second contacts as its excess, its failed members, graves and forgotten members,
        plus ``_STATE_MARGIN``: the farthest first, kept as lookup spares. One contact per
        group always stays, so lookups keep their one hop. A cluster of fewer than
        ``_BUDGET_MIN_GROUPS`` + 1 groups trims nothing: there each contact is a large share of
        a node's reach, and its state is nearly all tuples.

        The excess is a moving estimate: every ack reports the load of its sender's group
        (``Ack.group_members`` / ``group_tuples``: the contact probed every round answers one),
        compared with the own group's counts at the same moment -- so a write burst that fills
        every group alike trims nothing -- and averaged with the estimates of the own group's
        members carried by their gossip (``Gossip.load_excess``), which takes the noise of
        single reports out. Re-computed at every scan; hysteresis of ``_CONTACT_REFILL``.
        """
        full = self._full_contacts()
        trim = 0
        if self._load_known and self.config.k - 1 >= _BUDGET_MIN_GROUPS:
            contacts = len(self._all_contacts())
            failed_own = len(self.members) - len(self.own_alive()) - contacts
            extras = failed_own + len(self.graveyard) + len(self._departed)
            above = self._load_excess + extras
            trim = round(above + _STATE_MARGIN) if above > 0 else 0
        k = self.config.k
        # Two contacts stay in at least half the groups: enough for the tuple excess of the
        # fullest of ~sqrt(N) groups, while a small cluster, whose state is nearly all tuples,
        # does not give up its redundancy for a few entries.
        self._contact_cap = max(full - (full - (k - 1)) // 2, full - trim)
        excess = len(self._all_contacts()) - self._contact_cap
        if excess <= 0:
            return
        doubled = [self.members[nid] for ids in self.contacts.values() if len(ids) > 1
                   for nid in ids]
        doubled.sort(key=lambda m: m.rtt if m.rtt is not None else math.inf, reverse=True)
        for m in doubled:
            if excess <= 0:
                break
            if len(self.contacts[m.group]) > 1:
                self._drop_contact(m, now, bury=False)
                self._keep_spare(m.group, m.entry(), now)  # alive: asked if the other dies
                excess -= 1

    def _drop_contact(self, m: Member, now: float, bury: bool = True) -> None:
        """Stop using a contact (unreachable or replaced by a closer one); keep its place free."""
        contacts = self.contacts.get(m.group, [])
        if m.node_id in contacts:
            contacts.remove(m.node_id)
        self._forget_spare(m.group, m.node_id)
        self._remove_member(m.node_id)
        self._probes.pop(m.node_id, None)
        self._contact_list = None
        if bury:
            self.graveyard.bury(m.node_id, (m.incarnation, m.heartbeat),
                                now + self.config.graveyard_ttl)
        self._events.append(Event("contact_dropped", m.node_id, now))
        if bury and not contacts and m.group in self.contacts:
            # The group's last contact is gone: its spare takes the place at once, rather
            # than the group staying unreachable until gossip names another of its members.
            kept = self._spares.pop(m.group, None)
            spare = kept.entry if kept is not None else None
            if spare is not None and not self.graveyard.blocks(spare) \
                    and spare.node_id not in self.members:
                self._add_contact(Member(spare, m.group, False, now), now)

    def _keep_spare(self, group: int, entry: MemberEntry, now: float) -> None:
        """Remember a member of ``group`` beyond its contacts, heard of at ``now``. When the
        pool is full the oldest spare of a group that has all its contacts goes first: a group
        left with one contact (by the budget, or by a failure) needs its spare most."""
        self._spares[group] = _Spare(entry, now)
        self._spares.move_to_end(group)
        if len(self._spares) > _SPARE_POOL:
            full = self.config.contacts_per_group
            victim = next((g for g in self._spares
                           if len(self.contacts.get(g, ())) >= full), None)
            if victim is None:
                self._spares.popitem(last=False)
            else:
                del self._spares[victim]

    def _forget_spare(self, group: int, node_id: NodeId) -> None:
        spare = self._spares.get(group)
        if spare is not None and spare.entry.node_id == node_id:
            del self._spares[group]

    def report_unreachable(self, now: float, node_id: NodeId) -> None:
        """The driver could not reach a node over a stream: a contact is replaced at once.

        Own-group members are left to the heartbeat detector (one refused connection is not
        proof of death, and the detector's verdict must be the same on every member).
        """
        m = self.members.get(node_id)
        if m is not None and not m.own:
            self._drop_contact(m, now)

    def record_rtt(self, node_id: NodeId, rtt: float) -> None:
        """An RTT measured by the driver (e.g. an HTTP exchange) feeds the same estimate."""
        m = self.members.get(node_id)
        if m is not None and 0 <= rtt < 60.0:
            m.observe_rtt(rtt)

    # --- join, leave, snapshots ---------------------------------------------------------------

    def mark_synced(self, now: float) -> None:
        """The join has all there is to learn (a snapshot of the own group, or nobody else)."""
        self.synced = True
        self._unsettle(now)

    def join_request(self) -> SyncRequest:
        """What a new node sends to a live member (or a bootstrap-provided one) to join."""
        self.synced = False
        return SyncRequest(self.entry(), (), ())

    def leave_messages(self) -> list[Outgoing]:
        """Tell every live own-group member (and contacts) that this node leaves on purpose."""
        msg = Leave(self.entry())
        return [Outgoing(m.address, msg) for m in self.members.values() if m.alive]

    def snapshot(self, for_node: NodeId | None = None) -> Snapshot:
        """Own group (alive), contacts and, for a member of the own group, all tuples."""
        members = tuple(m.entry() for m in self.members.values() if m.alive)
        same_group = for_node is None or group_of_node(for_node, self.config.k) == self.group
        tuples = tuple(self.tuples) if same_group else ()
        return Snapshot(self.entry(), members, tuples, self._load_field() if same_group else None)

    def _note_return(self, nid: NodeId) -> None:
        """A member we had failed or forgotten is back; the lower id of the pair reconciles."""
        if self.node_id < nid:
            self._resync.add(nid)

    def _send_resyncs(self, out: list[Outgoing]) -> None:
        snap = self.snapshot()
        for nid in sorted(self._resync):
            m = self.members.get(nid)
            if m is not None and m.alive:
                out.append(Outgoing(m.address, SyncRequest(self.entry(), snap.members,
                                                           snap.tuples, snap.load_excess)))
        self._resync.clear()

    def _send_sync(self, now: float, out: list[Outgoing]) -> None:
        pool = self.own_alive()
        if not pool:
            if not self.synced:
                # Nobody of our group is known yet: ask a contact, whose snapshot carries the
                # contacts it has in our group; if there are none we are the group's first.
                contacts = [m for m in self.members.values() if not m.own and m.alive]
                if not contacts:
                    self.mark_synced(now)
                    return
                target = self.rng.choice(contacts)
                out.append(Outgoing(target.address, SyncRequest(self.entry(), (), ())))
            return
        target = min(pool, key=lambda m: m.rtt if m.rtt is not None else 1e9) \
            if not self.synced else self.rng.choice(pool)
        snap = self.snapshot()
        out.append(Outgoing(target.address, SyncRequest(self.entry(), snap.members, snap.tuples,
                                                        snap.load_excess)))

    # --- data path planning -------------------------------------------------------------------

    def group_of(self, name: str) -> int:
        return group_of_name(name, self.config.k)

    def plan_lookup(self, name: str, now: float | None = None) -> LookupPlan:
        """Own group: the local tuple. Else the contacts to ask, nearest first -- except that
        the contact most likely to hold the object goes first when it is not much farther --
        then the group's members last heard of by gossip (spares), for when every contact
        is dead and not replaced yet.

        Holders are the top r of the group's live members by rendezvous weight, so among our
        contacts the one with the highest weight holds the object whenever any of them does
        (with 2 contacts in a group of 7 and r = 3: 5 times in 7). Asking it first lets it
        answer with the object inline: one exchange instead of two.

        The spare widens that choice where it is safe: when it was heard of within
        ``_SPARE_FRESH_ROUNDS`` gossip intervals (gossip carries only members its sender
        believes alive) and a member we never measured is expected within the same RTT slack
        of the nearest contact as a likely-holder contact (``typical_rtt``: true on a LAN,
        rarely across a wide area), a spare that outranks the contacts goes first. With 2
        contacts and a spare in a group of 5 and r = 3 one of the three always holds the
        object; in a group of 8, all but 10 times in 56 (2 contacts alone: all but 10 times
        in 28). Without ``now`` the spare's age is unknown and it goes last: the plans of
        questions any member answers alike (placement, the tuple over HTTP) are made so.
        """
        group = self.group_of(name)
        if group == self.group:
            return LookupPlan(name, group, True, self.tuples.get(name), ())
        ask = sorted(self.live_contacts(group), key=_by_rtt)
        if len(ask) > 1:
            by_id = {m.node_id: m for m in ask}
            likely = by_id[placement.rank(name, by_id)[0]]
            nearest = ask[0].rtt
            if likely is not ask[0] and likely.rtt is not None and nearest is not None \
                    and likely.rtt <= _HOLDER_RTT_SLACK * nearest + _HOLDER_RTT_FLOOR:
                ask.remove(likely)
                ask.insert(0, likely)
        entries = [m.entry() for m in ask]
        asked = {e.node_id for e in entries}
        kept = self._spares.get(group)
        if kept is None or kept.entry.node_id in asked or self.graveyard.blocks(kept.entry):
            return LookupPlan(name, group, False, None, tuple(entries))
        spare = kept.entry
        if ask and now is not None and self._spare_outranks(name, spare, ask, now - kept.heard):
            entries.insert(0, spare)
        else:
            entries.append(spare)
        return LookupPlan(name, group, False, None, tuple(entries))

    def _spare_outranks(self, name: str, spare: MemberEntry, contacts: list[Member],
                        age: float) -> bool:
        """Ask the spare first? It is fresh (heard of ``age`` seconds ago), it ranks above
        every live contact for ``name``, and it is probably not much farther than the nearest
        contact (see ``plan_lookup``)."""
        if age > _SPARE_FRESH_ROUNDS * self.config.gossip_interval:
            return False
        ids = [spare.node_id, *(m.node_id for m in contacts)]
        if placement.rank(name, ids)[0] != spare.node_id:
            return False
        typical = self.typical_rtt()
        nearest = min((m.rtt for m in contacts if m.rtt is not None), default=None)
        return typical is not None and nearest is not None \
            and typical <= _HOLDER_RTT_SLACK * nearest + _HOLDER_RTT_FLOOR

    def typical_rtt(self) -> float | None:
        """The median RTT to the own group's members: where a node is placed has nothing to
        do with its id, so this is the distance to expect of a member we never measured (a
        spare). Contacts are chosen for being near, so theirs are lower unless every node is
        about as near as any other (a LAN)."""
        rtts = sorted(m.rtt for m in self.own_alive() if m.rtt is not None)
        return rtts[len(rtts) // 2] if rtts else None

    def answer_lookup(self, name: str) -> LookupAnswer:
        """What this node tells a requester about a name of its own group."""
        t = self.tuples.get(name)
        if t is None:
            return LookupAnswer(None, (), tuple(self.placement(name)))
        return LookupAnswer(t, tuple(self.live_holders(t)))

    def answer_lookup_request(self, request: LookupRequest, source: Address,
                              held: Version | None = None) -> LookupAction:
        """What to do with a one-datagram lookup that arrived from ``source``.

        ``held`` is the version of the name this node's store holds (the driver knows its
        store; the core does not). Bytes go inline only when asked for, when they are of the
        version this node's tuple says is current (never an older copy, and never a newer
        one that is not acknowledged yet) and when they fit ``codec.INLINE_MAX``; the driver
        must still check that the bytes it reads are that version and fit the datagram.

        A node asked for a small object it does not hold forwards the request to the nearest
        live holder, which answers the asker directly: 3 messages instead of a reply and a
        second exchange (4). A forwarded request is never forwarded again, so a request
        travels at most two hops; if the holder is gone, the asker's timeout sends it to its
        next contact.
        """
        dest = request.reply_to or source
        forwarded = request.reply_to is not None
        if self.group_of(request.name) != self.group:
            reply = LookupReply(request.request_id, None, (), (), None, True, forwarded)
            return LookupAction(Outgoing(dest, reply))
        answer = self.answer_lookup(request.name)
        limit = codec.MAX_LOOKUP_MEMBERS
        reply = LookupReply(request.request_id, answer.entry, answer.holders[:limit],
                            answer.candidates[:limit], forwarded=forwarded)
        t = answer.entry
        small = (request.want_inline and t is not None and not t.tombstone
                 and t.size <= codec.INLINE_MAX)
        if small and t is not None and held == t.version:
            return LookupAction(Outgoing(dest, reply), t)
        if small and not forwarded:
            holder = next((h for h in answer.holders if h.node_id != self.node_id), None)
            if holder is not None:
                relay = LookupRequest(request.request_id, request.name, True, source)
                return LookupAction(None, None, Outgoing(holder.address, relay))
        return LookupAction(Outgoing(dest, reply))

    def live_holders(self, t: TupleEntry) -> list[MemberEntry]:
        """The tuple's holders that this node believes alive, nearest first."""
        holders: list[Member] = []
        me: MemberEntry | None = None
        for nid in t.holders:
            if nid == self.node_id:
                me = self.entry()
                continue
            m = self.members.get(nid)
            if m is not None and m.alive:
                holders.append(m)
        holders.sort(key=_by_rtt)
        entries = [m.entry() for m in holders]
        return ([me] if me is not None else []) + entries

    def fetch_order(self, holders: tuple[MemberEntry, ...]) -> list[MemberEntry]:
        """Order holders named by a contact by this node's own RTT knowledge (unknown last)."""
        def key(entry: MemberEntry) -> float:
            if entry.node_id == self.node_id:
                return -1.0
            m = self.members.get(entry.node_id)
            return m.rtt if m is not None and m.rtt is not None else 1e9
        return sorted(holders, key=key)

    def placement(self, name: str, exclude: frozenset[NodeId] = frozenset()) -> list[MemberEntry]:
        """The r live members of the own group that should hold ``name`` (rendezvous order)."""
        by_id = {m.node_id: m.entry() for m in self.own_alive()}
        by_id[self.node_id] = self.entry()
        for nid in exclude:
            by_id.pop(nid, None)
        ranked = placement.choose(name, by_id, self.config.replication)
        return [by_id[nid] for nid in ranked]

    def placed_here(self, name: str) -> bool:
        """Whether this node is one of the r members that should hold ``name`` now. A copy
        kept here when it is not (a member that ranks higher joined) is a leftover: the next
        write of the name goes to the new placement, and only gossip would tell this node."""
        return any(e.node_id == self.node_id for e in self.placement(name))

    def knows_absence(self, name: str, now: float) -> bool:
        """Whether a name of the own group missing from this node's tuples does not exist.

        True when this node is one of the name's holders and the group's view has settled
        (``_unsettle``): every write of a name reaches its holders before it is acknowledged
        (they publish its tuple as they store it), and a holder that failed to store it is
        announced the corrected tuple. So a holder's tuples are as authoritative for a missing
        name as for a present one, and a lookup need not ask the other holders. Not while the
        view changes: a writer that did not know of this node yet (or still counted a failed
        member) placed names without it, and only gossip or a snapshot brings their tuples.
        """
        return (self.synced and self._settled and self.group_of(name) == self.group
                and self.placed_here(name))

    def plan_insert(self, name: str) -> LookupPlan:
        """Own group: the holders are computed here; else ask a contact for ``placement``."""
        return self.plan_lookup(name)

    def new_version(self, wall_ms: int) -> Version:
        return make_version(self.clock, wall_ms, self.node_id)

    def observe_version(self, clock: int) -> None:
        """A holder keeps a version stamped ``clock`` (it refused an older one): every
        version stamped here from now on is above it."""
        self.clock.observe(clock)

    # --- tuples and repair --------------------------------------------------------------------

    def watch_tuples(self, watcher: Callable[[TupleEntry], None] | None) -> None:
        """Have ``watcher`` called with every tuple that changes this node's state, whatever
        brought it (a write here, an announce, gossip, a sync): a mount drops what the
        kernel cached of it. None stops watching."""
        self._tuple_watcher = watcher

    def merge_tuple(self, now: float, t: TupleEntry) -> bool:
        """Merge a tuple of the own group (others are ignored); True if it changed state."""
        if group_of_name(t.name, self.config.k) != self.group:
            return False
        self.clock.observe(t.version.clock)
        if self.tuples.merge(t, now):
            if not self._repair_all:
                self._repair_names.add(t.name)
            if self._tuple_watcher is not None:
                self._tuple_watcher(t)
            return True
        return False

    def record_write(self, now: float, t: TupleEntry) -> bool:
        """A holder stored (fsynced) the bytes of ``t``: publish the tuple to the group."""
        return self.merge_tuple(now, t)

    def announce(self, now: float, *written: TupleEntry) -> list[Outgoing]:
        """Tuples just written or deleted, pushed at once to every live member of the own
        group that is not one of their holders (gossip datagrams carrying only them, as
        few as fit).

        Why: the write was told to its holders only; every other member learns it by gossip,
        a round or more later, and meanwhile answers a stat or a listing from its old tuple
        (a file just created missing from ``ls`` on another mount, one just removed still
        there). Pushed before the writer acknowledges, it reaches them in one datagram's
        delivery instead of gossip rounds; a lost one is covered by the gossip. The holders
        a tuple names published it as they stored it (or are told it by the writer). Nothing
        for another group's tuple or for one too large for a datagram (a very long name):
        gossip alone spreads those.
        """
        sendable = [t for t in written if group_of_name(t.name, self.config.k) == self.group
                    and codec.tuple_size(t) <= self._budget]  # (the budget counts the sender)
        if not sendable:
            return []
        out = []
        for m in self.own_alive():
            batch: list[TupleEntry] = []
            used = 0
            for t in sendable:
                if m.node_id in t.holders:
                    continue
                size = codec.tuple_size(t)
                if batch and used + size > self._budget:
                    out.append(Outgoing(m.address, Gossip(self.entry(), _ms(now), False, (),
                                                          tuple(batch))))
                    batch, used = [], 0
                batch.append(t)
                used += size
            if batch:
                out.append(Outgoing(m.address, Gossip(self.entry(), _ms(now), False, (),
                                                      tuple(batch))))
        return out

    def repair_tasks(self, now: float) -> list[RepairTask]:
        """Copies this node must make: tuples with fewer than r live holders where this node
        is the lowest-id live holder (so exactly one member drives each repair)."""
        if not self._repair_all and not self._repair_names and not self._repairing:
            return []
        candidates: Iterable[TupleEntry | None]
        if self._repair_all:
            candidates = list(self.tuples)
        else:
            names = self._repair_names | self._repairing.keys()
            candidates = [self.tuples.get(name) for name in names]
        self._repair_all = False
        self._repair_names = set()
        r = self.config.replication
        alive_ids = {m.node_id for m in self.own_alive()}
        alive_ids.add(self.node_id)
        tasks: list[RepairTask] = []
        for t in candidates:
            if t is None or t.tombstone:
                continue
            live = [h for h in t.holders if h in alive_ids]
            if len(live) >= r or len(live) >= len(alive_ids) or not live:
                continue
            if min(live) != self.node_id:
                continue
            due = self._repairing.get(t.name)
            if due is not None and due > now:
                continue
            ranked = placement.rank(t.name, alive_ids - set(live))
            needed = r - len(live)
            if not ranked:
                continue
            self._repairing[t.name] = now + _REPAIR_RETRY
            entries = tuple(self.members[nid].entry() for nid in ranked[:needed + _SPARES])
            tasks.append(RepairTask(t, entries[:needed], entries[needed:]))
        return tasks

    def repair_done(self, now: float, t: TupleEntry, added: tuple[NodeId, ...]) -> TupleEntry:
        """Record that ``added`` now hold ``t``'s bytes: a new holder epoch of the same version."""
        self._repairing.pop(t.name, None)
        current = self.tuples.get(t.name)
        if current is None or current.version != t.version:
            return current if current is not None else t
        alive_ids = {m.node_id for m in self.own_alive()} | {self.node_id}
        live = [h for h in current.holders if h in alive_ids]
        updated = with_holders(current, tuple(dict.fromkeys(live + list(added))))
        self.merge_tuple(now, updated)
        return updated


def _ms(now: float) -> int:
    return int(now * 1000) & 0xFFFFFFFF


def _by_rtt(m: Member) -> float:
    return m.rtt if m.rtt is not None else 1e9


__all__ = ["DATAGRAM_TYPES", "Event", "KelipsNode", "LookupAction", "LookupAnswer", "LookupPlan",
           "RepairTask"]
