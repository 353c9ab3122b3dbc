"""The KelipsNode state machine driven directly: join, refusal, failure detection, leave,
gossip size and rotation, snapshots, lookups, placement, repair and contacts.

A tiny in-memory driver (``Net``) plays the daemon: it ticks nodes at ``next_deadline()``,
delivers every Outgoing message at once (zero latency) to the node at its address after a trip
through the real codec, and can stop nodes or cut links. Nothing here touches a socket or a clock.
"""

from __future__ import annotations

import random
from collections import defaultdict, deque
from collections.abc import Callable, Iterable

import pytest

from daemon.core import codec, placement
from daemon.core.config import AUTH_TRAILER, CoreConfig
from daemon.core.ids import NodeId, group_of_name, group_of_node, new_node_id
from daemon.core.members import Status
from daemon.core.messages import (
    BEAT_PREFIX,
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
from daemon.core.node import Event, KelipsNode

# --- driver ----------------------------------------------------------------------------------

_ID_RNG = random.Random(20240601)


def find_id(k: int, group: int | None = None, avoid: Iterable[int] = ()) -> NodeId:
    """A random node id in ``group`` (or in any group not in ``avoid``)."""
    avoid = set(avoid)
    while True:
        nid = new_node_id(_ID_RNG)
        g = group_of_node(nid, k)
        if (group is None or g == group) and g not in avoid:
            return nid


def find_name(k: int, group: int, prefix: str = "/obj") -> str:
    for i in range(100_000):
        name = f"{prefix}-{i}"
        if group_of_name(name, k) == group:
            return name
    raise AssertionError("no name found")


_ADDR_SEQ = iter(range(1, 1_000_000))


def next_address() -> Address:
    i = next(_ADDR_SEQ)
    return (f"10.{i // 60000}.{i // 250 % 240}.{i % 250 + 1}", 7000 + i % 1000)


def make_node(cfg: CoreConfig, node_id: NodeId | None = None, *, group: int | None = None,
              now: float = 0.0, seed: int | None = None, incarnation: int = 1) -> KelipsNode:
    if node_id is None:
        node_id = find_id(cfg.k, group)
    rng = random.Random(seed if seed is not None else int.from_bytes(node_id[:4], "big"))
    return KelipsNode(cfg, node_id, next_address(), incarnation, rng, now)


def wire(src: KelipsNode, message: Message) -> Envelope:
    """What the receiver of ``message`` from ``src`` decodes (through the real codec)."""
    return codec.decode(codec.encode(src.envelope(message)))


class Net:
    """Zero-latency delivery between nodes by address; stopped nodes neither tick nor receive."""

    def __init__(self, *nodes: KelipsNode) -> None:
        self.nodes: dict[Address, KelipsNode] = {}
        self.now = 0.0
        self.down: set[Address] = set()
        self.cut: set[tuple[Address, Address]] = set()  # (src, dest) pairs that lose everything
        self.sent: list[tuple[float, NodeId, Outgoing]] = []
        self.events: dict[NodeId, list[Event]] = defaultdict(list)
        self.last_bump: dict[NodeId, float] = {}
        self.queue: deque[tuple[KelipsNode, Outgoing]] = deque()
        for n in nodes:
            self.add(n)

    def add(self, node: KelipsNode) -> None:
        self.nodes[node.address] = node

    def post(self, src: KelipsNode, outs: Iterable[Outgoing]) -> None:
        for out in outs:
            self.queue.append((src, out))

    def flush(self) -> None:
        while self.queue:
            src, out = self.queue.popleft()
            self.sent.append((self.now, src.node_id, out))
            dst = self.nodes.get(out.dest)
            if dst is None or out.dest in self.down or (src.address, out.dest) in self.cut:
                continue
            self.post(dst, dst.receive(self.now, wire(src, out.message)))
        for n in self.nodes.values():
            self.events[n.node_id].extend(n.drain_events())

    def send(self, src: KelipsNode, dest: KelipsNode, message: Message) -> None:
        self.post(src, [Outgoing(dest.address, message)])
        self.flush()

    def run_until(self, end: float) -> None:
        while True:
            live = [n for a, n in self.nodes.items() if a not in self.down]
            if not live:
                break
            t = min(n.next_deadline() for n in live)
            if t > end:
                break
            self.now = max(self.now, t)
            for n in live:
                if n.next_deadline() <= self.now:
                    before = n.heartbeat
                    self.post(n, n.tick(self.now))
                    if n.heartbeat != before:
                        self.last_bump[n.node_id] = self.now
            self.flush()
        self.now = max(self.now, end)

    def stop(self, node: KelipsNode) -> None:
        self.down.add(node.address)

    def partition(self, side_a: Iterable[KelipsNode], side_b: Iterable[KelipsNode]) -> None:
        a, b = list(side_a), list(side_b)
        for x in a:
            for y in b:
                self.cut.add((x.address, y.address))
                self.cut.add((y.address, x.address))

    def heal(self) -> None:
        self.cut.clear()

    def of_kind(self, node: KelipsNode, kind: str, about: KelipsNode | None = None) -> list[Event]:
        return [e for e in self.events[node.node_id]
                if e.kind == kind and (about is None or e.node_id == about.node_id)]

    def sent_by(self, node: KelipsNode, since: float = -1.0,
                after: int = 0) -> list[tuple[float, Outgoing]]:
        """What ``node`` sent at ``since`` or later, among the messages from position ``after``
        of the log on (``len(net.sent)`` taken at a moment: what came after it, even at the
        same instant)."""
        return [(t, o) for t, nid, o in self.sent[after:] if nid == node.node_id and t >= since]


def own_ids(node: KelipsNode) -> set[NodeId]:
    return {m.node_id for m in node.own_alive()}


def join(net: Net, new: KelipsNode, via: KelipsNode) -> None:
    net.send(new, via, new.join_request())


def converge(net: Net, nodes: list[KelipsNode], until: float) -> None:
    """Join every node through the first, run, and check that the group view is complete."""
    for n in nodes[1:]:
        join(net, n, nodes[0])
    net.run_until(until)
    everyone = {n.node_id for n in nodes}
    for n in nodes:
        assert own_ids(n) == everyone - {n.node_id}


def fake_entry(i: int, k: int = 1, group: int | None = None, hb: int = 1) -> MemberEntry:
    return MemberEntry(find_id(k, group), f"172.16.{i // 250}.{i % 250 + 1}", 9000 + i, 1, hb)


def tuple_for(name: str, holders: Iterable[NodeId], clock: int = 1 << 30,
              writer: NodeId = b"\x07" * 20) -> TupleEntry:
    return TupleEntry(name, Version(clock, writer), 0, 4096, 0o644, 1_700_000_000_000_000_000,
                      bytes(32), tuple(sorted(holders)), False)


# --- join ------------------------------------------------------------------------------------


def test_join_same_group() -> None:
    cfg = CoreConfig(k=2)
    a = make_node(cfg, group=0)
    b = make_node(cfg, group=0)
    net = Net(a, b)
    reply = a.receive(0.0, wire(b, b.join_request()))
    assert len(reply) == 1 and reply[0].dest == b.address
    assert isinstance(reply[0].message, Snapshot)
    assert not b.synced
    net.post(a, reply)
    net.flush()
    assert b.synced
    assert net.of_kind(b, "synced", a)
    net.run_until(6.0)
    for x, y in ((a, b), (b, a)):
        m = x.members[y.node_id]
        assert m.own and m.alive
        assert own_ids(x) == {y.node_id}
        assert net.of_kind(x, "joined", y)
        assert m.heartbeat >= y.heartbeat - 1 >= 3  # heartbeats flow both ways
    assert not a.contacts.get(1) and not b.contacts.get(1)


def test_join_different_groups_makes_each_the_others_contact() -> None:
    cfg = CoreConfig(k=2)
    a = make_node(cfg, group=0)
    b = make_node(cfg, group=1)
    net = Net(a, b)
    join(net, b, a)
    net.run_until(10.0)
    assert a.contacts[1] == [b.node_id]
    assert b.contacts[0] == [a.node_id]
    for x, y in ((a, b), (b, a)):
        m = x.members[y.node_id]
        assert not m.own and m.alive
        assert m.rtt is not None  # probes were answered
        assert net.of_kind(x, "contact_added", y)
        assert not net.of_kind(x, "contact_dropped")
        assert x.own_alive() == []
        assert [m.node_id for m in x.live_contacts(y.group)] == [y.node_id]


def test_lone_node_of_its_group_stops_retrying_sync_after_asking_a_contact() -> None:
    # The joiner's group is empty: the contact's snapshot holds nobody of it, so the joiner is
    # the group's first and should count as synced instead of sending a full SyncRequest to
    # its contact every two seconds for as long as it stays alone.
    cfg = CoreConfig(k=2)
    a = make_node(cfg, group=0)
    b = make_node(cfg, group=1)
    net = Net(a, b)
    join(net, b, a)
    net.run_until(25.0)
    syncs = [o for _, o in net.sent_by(b) if isinstance(o.message, SyncRequest)]
    assert len(syncs) <= 2, f"{len(syncs)} SyncRequests sent by a node alone in its group"
    assert b.synced


def test_three_nodes_join_through_one_and_learn_each_other() -> None:
    cfg = CoreConfig(k=1)
    nodes = [make_node(cfg) for _ in range(3)]
    net = Net(*nodes)
    converge(net, nodes, 10.0)
    for n in nodes:
        assert len(net.of_kind(n, "joined")) == 2


# --- refusal ---------------------------------------------------------------------------------


def _members_state(node: KelipsNode) -> dict[NodeId, tuple[object, ...]]:
    return {nid: (m.entry(), m.status, m.last_heard, m.rtt, m.own)
            for nid, m in node.members.items()}


def _full_state(node: KelipsNode) -> tuple[object, ...]:
    return (_members_state(node), {g: list(c) for g, c in node.contacts.items()},
            sorted(node.tuples, key=lambda t: t.name), node.incarnation, node.heartbeat,
            len(node.graveyard))


@pytest.mark.parametrize(
    ("other", "needles"),
    [
        ({"k": 5}, ["k=4", "k=5"]),
        ({"cluster_id": "someone-else"}, ["cluster"]),
    ],
)
def test_join_with_wrong_k_or_cluster_is_refused(other: dict[str, object],
                                                 needles: list[str]) -> None:
    cfg = CoreConfig(k=4)
    a = make_node(cfg)
    peer = make_node(cfg)
    a.receive(0.0, wire(peer, Gossip(peer.entry(), 0, False, (), ())))
    a.drain_events()
    before = _full_state(a)
    stranger = make_node(cfg.with_changes(**other))
    out = a.receive(1.0, wire(stranger, stranger.join_request()))
    assert len(out) == 1
    dest, refusal = out[0]
    assert dest == stranger.address
    assert isinstance(refusal, Refusal)
    for needle in needles:
        assert needle in refusal.reason
    assert _full_state(a) == before
    assert stranger.node_id not in a.members
    assert a.dropped == 1
    assert a.drain_events() == []
    assert stranger.receive(1.0, wire(a, refusal)) == []
    events = stranger.drain_events()
    assert [e.kind for e in events] == ["refused"]
    assert events[0].detail == refusal.reason
    assert stranger.members == {}


def test_datagrams_from_another_cluster_are_dropped() -> None:
    cfg = CoreConfig(k=1)
    a = make_node(cfg)
    stranger = make_node(cfg.with_changes(cluster_id="other"))
    before = _full_state(a)
    assert a.receive(0.0, wire(stranger, Gossip(stranger.entry(), 0, True, (), ()))) == []
    assert a.receive(0.0, wire(stranger, Ack(stranger.entry(), 0))) == []
    assert a.receive(0.0, wire(stranger, Leave(stranger.entry()))) == []
    assert _full_state(a) == before
    assert a.dropped == 3
    assert a.receive(0.0, wire(stranger, Snapshot(stranger.entry(), (), ()))) == []
    assert _full_state(a) == before
    assert [e.kind for e in a.drain_events()] == ["refused"]


# --- failure detection -----------------------------------------------------------------------


def _mentions(message: Message, node: KelipsNode) -> bool:
    if isinstance(message, (Gossip, SyncRequest, Snapshot)):
        if any(e.node_id == node.node_id for e in message.members):
            return True
        if message.sender.node_id == node.node_id:
            return True
    if isinstance(message, Gossip):
        return any(b.prefix == node.node_id[:BEAT_PREFIX] for b in message.beats)
    return False


def _liveness_of(message: Message, node_id: NodeId) -> list[tuple[int, int]]:
    """Every (incarnation, heartbeat) of ``node_id`` that ``message`` carries."""
    entries: list[MemberEntry] = []
    if isinstance(message, (Gossip, SyncRequest, Snapshot)):
        entries = [message.sender, *message.members]
    elif isinstance(message, (Ack, Leave)):
        entries = [message.sender]
    found = [e.liveness for e in entries if e.node_id == node_id]
    if isinstance(message, Gossip):
        found += [(b.incarnation, b.heartbeat) for b in message.beats
                  if b.prefix == node_id[:BEAT_PREFIX]]
    return found


def _last_rise(net: Net, receiver: KelipsNode, subject: KelipsNode) -> float:
    """When ``receiver`` was last delivered a higher liveness of ``subject`` (from the log)."""
    best: tuple[int, int] = (-1, -1)
    at = -1.0
    for t, _src, out in net.sent:
        if out.dest != receiver.address or out.dest in net.down:
            continue
        for liveness in _liveness_of(out.message, subject.node_id):
            if liveness > best:
                best, at = liveness, t
    return at


def test_failure_detection_removal_and_graveyard() -> None:
    cfg = CoreConfig(k=1)
    gi = cfg.gossip_interval
    a, b, c = (make_node(cfg) for _ in range(3))
    net = Net(a, b, c)
    converge(net, [a, b, c], 10.0)
    t_stop = net.now
    net.stop(c)

    net.run_until(t_stop + cfg.t_fail + 4 * gi)
    failed_at: dict[NodeId, float] = {}
    heard_at: dict[NodeId, float] = {}
    last_known: dict[NodeId, MemberEntry] = {}
    for x in (a, b):
        failed = net.of_kind(x, "failed", c)
        assert len(failed) == 1, f"{x.node_id.hex()[:6]} did not declare c failed"
        at = failed[0].at
        heard = _last_rise(net, x, c)
        assert heard <= t_stop
        assert at - heard > cfg.t_fail  # not before t_fail of silence ...
        assert at - heard <= cfg.t_fail + 2 * gi  # ... and promptly after
        assert at - t_stop <= cfg.t_fail + 4 * gi
        assert x.members[c.node_id].status is Status.FAILED
        assert c.node_id not in own_ids(x)
        failed_at[x.node_id], heard_at[x.node_id] = at, heard
        last_known[x.node_id] = x.members[c.node_id].entry()
        assert not net.of_kind(x, "failed", a if x is b else b)  # no false positive

    net.run_until(t_stop + cfg.t_cleanup + 4 * gi)
    for x in (a, b):
        removed = net.of_kind(x, "removed", c)
        assert len(removed) == 1
        assert removed[0].at - heard_at[x.node_id] > cfg.t_cleanup
        assert removed[0].at - heard_at[x.node_id] <= cfg.t_cleanup + 2 * gi
        assert c.node_id not in x.members
        assert c.node_id in x.graveyard
        # after its failure, c is not mentioned by x, and not targeted until it is forgotten;
        # then only the rare departed-member probe (partition healing) goes to it
        for at, out in net.sent_by(x, since=failed_at[x.node_id]):
            assert not _mentions(out.message, c)
            if out.dest == c.address:
                assert at >= removed[0].at
                _assert_departed_probe(out.message)
        assert own_ids(x) == {(b if x is a else a).node_id}

    # stale gossip (the last entry x heard) cannot bring c back, by any path
    now = net.now
    assert now < min(e.at for x in (a, b) for e in net.of_kind(x, "removed")) + cfg.graveyard_ttl
    for x, relay in ((a, b), (b, a)):
        stale_entry = last_known[x.node_id]
        older = stale_entry._replace(heartbeat=max(0, stale_entry.heartbeat - 1))
        stale = [
            Gossip(relay.entry(), 0, False, (stale_entry,), ()),
            Gossip(relay.entry(), 0, False, (older,), ()),
            Gossip(relay.entry(), 0, False, (), (), beats=(_beat(stale_entry),)),
            Snapshot(relay.entry(), (stale_entry,), ()),
            SyncRequest(relay.entry(), (stale_entry,), ()),
            Gossip(stale_entry, 0, False, (), ()),
            Ack(stale_entry, 0),
        ]
        for message in stale:
            x.receive(now, wire(relay, message))
        assert c.node_id not in x.members
        assert not [e for e in x.drain_events() if e.node_id == c.node_id]

    # a higher heartbeat brings it back at a ...
    fresher = last_known[a.node_id]._replace(heartbeat=last_known[a.node_id].heartbeat + 1)
    a.receive(now, wire(b, Gossip(b.entry(), 0, False, (fresher,), ())))
    assert a.members[c.node_id].alive and c.node_id in own_ids(a)
    assert [e.kind for e in a.drain_events() if e.node_id == c.node_id] == ["joined"]
    assert c.node_id not in a.graveyard
    # ... and a higher incarnation (with a lower heartbeat) at b
    reborn = last_known[b.node_id]._replace(
        incarnation=last_known[b.node_id].incarnation + 1, heartbeat=0)
    b.receive(now, wire(a, Snapshot(a.entry(), (reborn,), ())))
    assert b.members[c.node_id].alive and c.node_id in own_ids(b)
    assert b.members[c.node_id].entry() == reborn


def _beat(entry: MemberEntry) -> Beat:
    return Beat(entry.node_id[:BEAT_PREFIX], entry.incarnation & 0xFF, entry.heartbeat & 0xFFFF)


def test_failed_member_revives_only_on_fresher_liveness() -> None:
    cfg = CoreConfig(k=1)
    a, b, c = (make_node(cfg) for _ in range(3))
    net = Net(a, b, c)
    converge(net, [a, b, c], 8.0)
    net.stop(c)
    net.run_until(net.now + cfg.t_fail + 2.0)
    assert a.members[c.node_id].status is Status.FAILED
    known = a.members[c.node_id].entry()
    now = net.now
    a.receive(now, wire(b, Gossip(b.entry(), 0, False, (known,), ())))
    a.receive(now, wire(b, Gossip(b.entry(), 0, False, (), (), beats=(_beat(known),))))
    assert a.members[c.node_id].status is Status.FAILED
    assert a.drain_events() == []
    fresher = known._replace(heartbeat=known.heartbeat + 1)
    a.receive(now, wire(b, Gossip(b.entry(), 0, False, (), (), beats=(_beat(fresher),))))
    assert a.members[c.node_id].alive
    assert c.node_id in own_ids(a)
    assert [e.kind for e in a.drain_events() if e.node_id == c.node_id] == ["revived"]


def test_partition_longer_than_t_fail_heals() -> None:
    # c is cut off from a and b (all keep running) for longer than t_fail, so both sides
    # declare the other failed; once the network heals the group must become whole again
    # without anyone restarting.
    cfg = CoreConfig(k=1)
    a, b, c = (make_node(cfg) for _ in range(3))
    net = Net(a, b, c)
    converge(net, [a, b, c], 10.0)
    net.partition([a, b], [c])
    net.run_until(net.now + cfg.t_fail + 3.0)
    assert c.node_id not in own_ids(a)
    assert own_ids(c) == set()
    net.heal()
    healed = net.now
    net.run_until(healed + 2 * cfg.anti_entropy_interval)
    everyone = {a.node_id, b.node_id, c.node_id}
    for n in (a, b, c):
        assert own_ids(n) == everyone - {n.node_id}, "the group did not re-merge after the heal"


def test_tuples_written_apart_meet_soon_after_the_heal() -> None:
    # Writes on both sides of a partition: once the sides see each other again, one of each
    # returning pair pushes its snapshot, so neither side waits for anti-entropy (an hour here).
    cfg = CoreConfig(k=1, anti_entropy_interval=3600.0)
    a, b, c = (make_node(cfg) for _ in range(3))
    net = Net(a, b, c)
    converge(net, [a, b, c], 10.0)
    net.partition([a, b], [c])
    net.run_until(net.now + cfg.t_cleanup + 3.0)
    # many: the slow rotation of cold tuples through gossip would take minutes to carry them
    names = {f"/{side}{i}" for side in ("left", "right") for i in range(300)}
    for i in range(300):
        a.record_write(net.now, tuple_for(f"/left{i}", [a.node_id], clock=10 + i))
        c.record_write(net.now, tuple_for(f"/right{i}", [c.node_id], clock=10 + i))
    net.run_until(net.now + 30.0)  # the rumours die out while the sides are apart
    net.heal()
    net.run_until(net.now + 10.0)
    for n in (a, b, c):
        assert {t.name for t in n.tuples} == names


# --- leave -----------------------------------------------------------------------------------


def test_leave_marks_failed_at_once() -> None:
    cfg = CoreConfig(k=1)
    a, b, c = (make_node(cfg) for _ in range(3))
    net = Net(a, b, c)
    converge(net, [a, b, c], 8.0)
    outs = c.leave_messages()
    assert sorted(o.dest for o in outs) == sorted([a.address, b.address])
    assert all(isinstance(o.message, Leave) for o in outs)
    net.stop(c)
    sent_before_leave = len(net.sent)  # by position: a gossip of this instant may precede it
    net.post(c, outs)
    left_at = net.now
    net.flush()
    for x in (a, b):
        assert [e.kind for e in net.of_kind(x, "left", c)] == ["left"]
        assert x.members[c.node_id].status is Status.FAILED
        assert c.node_id not in own_ids(x)
        assert not net.of_kind(x, "failed", c)
    net.run_until(left_at + cfg.t_cleanup - cfg.t_fail + 2.0)
    for x in (a, b):
        assert net.of_kind(x, "removed", c)
        assert c.node_id not in x.members
        assert not net.of_kind(x, "failed", c)
        assert not net.of_kind(x, "revived", c)
        for _, out in net.sent_by(x, after=sent_before_leave):
            assert not _mentions(out.message, c)
            if out.dest == c.address:
                _assert_departed_probe(out.message)


def _assert_departed_probe(message: object) -> None:
    """The only traffic to a forgotten member: an ack-requesting probe carrying no tuples or
    beats (it is how the two sides of a healed partition find each other again)."""
    assert isinstance(message, Gossip)
    assert message.want_ack and not message.tuples and not message.beats


def test_gossip_in_flight_with_the_leaves_liveness_does_not_undo_a_leave() -> None:
    cfg = CoreConfig(k=1)
    a, b, c = (make_node(cfg) for _ in range(3))
    net = Net(a, b, c)
    converge(net, [a, b, c], 8.0)
    net.stop(c)
    c.heartbeat += 1  # c's heartbeat rose just before it left; no gossip has carried it yet
    now = net.now
    leave = c.leave_messages()[0].message
    a.receive(now, wire(c, leave))
    assert a.members[c.node_id].status is Status.FAILED
    # c's last gossip, sent before the Leave but delivered after it, and b relaying that
    # heartbeat, carry the very liveness of the Leave: nothing newer than the Leave itself
    a.receive(now, wire(c, Gossip(c.entry(), 0, False, (), ())))
    a.receive(now, wire(b, Gossip(b.entry(), 0, False, (), (), beats=(_beat(c.entry()),))))
    assert a.members[c.node_id].status is Status.FAILED
    assert [e.kind for e in a.drain_events() if e.node_id == c.node_id] == ["left"]


def test_stale_leave_from_an_older_incarnation_is_ignored() -> None:
    cfg = CoreConfig(k=1)
    a = make_node(cfg)
    c = make_node(cfg, incarnation=2)
    a.receive(0.0, wire(c, Gossip(c.entry(), 0, False, (), ())))
    old_life = c.entry()._replace(incarnation=1, heartbeat=50)
    a.receive(0.5, wire(c, Leave(old_life)))
    assert a.members[c.node_id].alive
    assert [e.kind for e in a.drain_events()] == ["joined"]


def test_node_moves_to_higher_incarnation_when_others_remember_a_later_life() -> None:
    cfg = CoreConfig(k=1)
    a = make_node(cfg, incarnation=1)
    b = make_node(cfg)
    remembered = a.entry()._replace(incarnation=5, heartbeat=9)
    a.receive(0.0, wire(b, Gossip(b.entry(), 0, False, (remembered,), ())))
    assert a.incarnation == 6 and a.heartbeat == 0
    assert a.entry().liveness > remembered.liveness
    assert a.node_id not in a.members


# --- gossip size bound and rotation ----------------------------------------------------------


def _big_group_node(cfg: CoreConfig, n_members: int, n_tuples: int, name_len: int = 20,
                    ) -> tuple[KelipsNode, list[MemberEntry]]:
    node = make_node(cfg)
    entries = [fake_entry(i) for i in range(n_members)]
    node.receive(0.0, node.envelope(Snapshot(entries[0], tuple(entries[1:]), ())))
    assert len(node.own_alive()) == n_members
    ids = [e.node_id for e in entries]
    for i in range(n_tuples):
        name = f"/data/d{i % 7}/" + f"f{i:04d}".rjust(name_len, "x")
        node.record_write(0.0, tuple_for(name, [node.node_id, *ids[i % 50:i % 50 + 2]]))
    node.drain_events()
    return node, entries


def _rounds(node: KelipsNode, n: int,
            before_tick: Callable[[float], None] | None = None) -> list[list[Gossip]]:
    rounds: list[list[Gossip]] = []
    while len(rounds) < n:
        now = node.next_deadline()
        if before_tick is not None:
            before_tick(now)
        gossip = [o.message for o in node.tick(now) if isinstance(o.message, Gossip)]
        if gossip:
            rounds.append(gossip)
    return rounds


@pytest.mark.parametrize(("max_datagram", "name_len"), [(1200, 20), (1200, 150), (512, 60)])
def test_gossip_fits_the_datagram_and_rotates_over_the_group(max_datagram: int,
                                                           name_len: int) -> None:
    cfg = CoreConfig(k=1, max_datagram=max_datagram, t_fail=10_000.0)
    node, entries = _big_group_node(cfg, 300, 200, name_len)
    by_prefix = {e.node_id[:BEAT_PREFIX]: e.node_id for e in entries}
    everyone = {e.node_id for e in entries}
    n = len(everyone)
    rounds = _rounds(node, 2 * n)
    for window in (rounds[:n], rounds[n:]):
        seen: set[NodeId] = set()
        for messages in window:
            for msg in messages:
                size = len(codec.encode(node.envelope(msg)))
                assert size == codec.message_size(msg)
                assert size + AUTH_TRAILER <= cfg.max_datagram
                seen.update(e.node_id for e in msg.members)
                seen.update(by_prefix[b.prefix] for b in msg.beats)
        assert seen == everyone, f"{len(everyone - seen)} members never sent in {n} rounds"


@pytest.mark.parametrize(("max_datagram", "name_len"), [(1200, 20), (1200, 150), (512, 60)])
def test_every_written_tuple_is_gossiped_in_a_large_group(max_datagram: int,
                                                         name_len: int) -> None:
    # 200 fresh writes (3 holders, paths of name_len + 9 bytes) in a 300-member group: each
    # change must leave in some gossip message, not wait for anti-entropy.
    cfg = CoreConfig(k=1, max_datagram=max_datagram, t_fail=10_000.0)
    node, _ = _big_group_node(cfg, 300, 200, name_len)
    sent: set[str] = set()
    for messages in _rounds(node, 600):
        for msg in messages:
            assert len(codec.encode(node.envelope(msg))) + AUTH_TRAILER <= cfg.max_datagram
            sent.update(t.name for t in msg.tuples)
    missing = set(node.tuples.names()) - sent
    assert not missing, f"{len(missing)} of {len(node.tuples)} written tuples never gossiped"


def test_rotation_survives_a_group_whose_heartbeats_all_keep_rising() -> None:
    cfg = CoreConfig(k=1, t_fail=10_000.0)
    node, entries = _big_group_node(cfg, 300, 0)
    by_prefix = {e.node_id[:BEAT_PREFIX]: e.node_id for e in entries}
    state = {"hb": 1}

    def bump(now: float) -> None:
        state["hb"] += 1
        fresh = tuple(e._replace(heartbeat=state["hb"]) for e in entries)
        node.receive(now, node.envelope(Snapshot(fresh[0], fresh[1:], ())))

    rounds = _rounds(node, len(entries), bump)
    seen: set[NodeId] = set()
    for messages in rounds:
        for msg in messages:
            assert len(codec.encode(node.envelope(msg))) + AUTH_TRAILER <= cfg.max_datagram
            seen.update(e.node_id for e in msg.members)
            seen.update(by_prefix[b.prefix] for b in msg.beats)
    assert seen == {e.node_id for e in entries}


def test_oversized_tuple_does_not_starve_other_tuples_of_gossip() -> None:
    # A tuple too big for the tuple share of a datagram (long path) is written first; the
    # changes written after it must still be gossiped in a large group.
    cfg = CoreConfig(k=1, t_fail=10_000.0)
    node, _ = _big_group_node(cfg, 100, 0)
    node.record_write(0.0, tuple_for("/" + "deep/" * 120 + "file", [node.node_id]))
    small = [f"/small-{i}" for i in range(20)]
    for name in small:
        node.record_write(0.0, tuple_for(name, [node.node_id]))
    sent: set[str] = set()
    for messages in _rounds(node, 100):
        for msg in messages:
            assert len(codec.encode(node.envelope(msg))) + AUTH_TRAILER <= cfg.max_datagram
            sent.update(t.name for t in msg.tuples)
    assert set(small) <= sent, f"{len(set(small) - sent)} of {len(small)} tuples never gossiped"


# --- receive applies exactly what the message says -------------------------------------------


def test_receive_changes_only_what_the_message_carries() -> None:
    cfg = CoreConfig(k=2, contacts_per_group=2)
    a = make_node(cfg, group=0)
    b = make_node(cfg, group=0)
    other = make_node(cfg, group=0)
    x = make_node(cfg, group=1)
    for peer in (b, other, x):
        a.receive(0.0, wire(peer, Gossip(peer.entry(), 0, False, (), ())))
    own_name, foreign_name = find_name(2, 0), find_name(2, 1)
    a.record_write(0.0, tuple_for(find_name(2, 0, "/kept"), [a.node_id]))
    a.drain_events()
    before = _full_state(a)

    # a corrupt datagram never reaches receive: decoding fails first and nothing changes
    good = codec.encode(b.envelope(Gossip(b.entry(), 0, False, (), ())))
    for bad in (good[:-1], good + b"\x00", bytes([codec.PROTOCOL_VERSION + 1]) + good[1:]):
        with pytest.raises(codec.DecodeError):
            a.receive(1.0, codec.decode(bad))
    assert _full_state(a) == before

    b.heartbeat += 3
    d = fake_entry(1, k=2, group=0)
    stale_x = x.entry()._replace(heartbeat=0, host="10.99.99.99")
    own_t = tuple_for(own_name, [b.node_id])
    foreign_t = tuple_for(foreign_name, [x.node_id])
    out = a.receive(2.0, wire(b, Gossip(b.entry(), 2000, False, (d, stale_x), (own_t, foreign_t))))
    assert out == []
    after = _members_state(a)
    old = before[0]
    assert isinstance(old, dict)
    assert after[b.node_id][0] == b.entry() and after[b.node_id][2] == 2.0
    assert after[d.node_id][0] == d and after[d.node_id][4] is True
    assert after[x.node_id] == old[x.node_id]
    assert after[other.node_id] == old[other.node_id]
    assert set(after) == set(old) | {d.node_id}
    assert a.tuples.get(own_name) == own_t
    assert a.tuples.get(foreign_name) is None
    assert len(a.tuples) == 2
    assert a.contacts == before[1]
    assert [e.kind for e in a.drain_events()] == ["joined"]


def test_a_written_tuple_is_announced_to_the_whole_group_at_once() -> None:
    """``announce``: one datagram per live own-group member carrying only the new tuple, and
    its receiver knows the tuple at once; nothing for a foreign name or one too long for a
    datagram. An announce is not a gossip round: it does not stop the receiver's pull."""
    cfg = CoreConfig(k=2)
    nodes = [make_node(cfg, group=0) for _ in range(4)]
    net = Net(*nodes)
    converge(net, nodes, 8.0)
    writer, reader = nodes[0], nodes[1]
    name = find_name(2, 0, "/announced")
    t = tuple_for(name, [writer.node_id])
    writer.record_write(net.now, t)
    out = writer.announce(net.now, t)
    assert sorted(o.dest for o in out) == sorted(n.address for n in nodes[1:])
    for o in out:
        assert isinstance(o.message, Gossip) and o.message.tuples == (t,)
        assert o.message.members == () and o.message.beats == ()
        assert len(codec.encode(writer.envelope(o.message))) + AUTH_TRAILER <= cfg.max_datagram
    quiet_since = reader._last_group_gossip
    reader.receive(net.now + 0.01, wire(writer, out[0].message))
    assert reader.tuples.get(name) == t
    assert reader._last_group_gossip == quiet_since
    assert writer.announce(net.now, tuple_for(find_name(2, 1), [writer.node_id])) == []
    # the longest name that fits the datagram is announced; one byte more is left to gossip
    room = cfg.max_datagram - AUTH_TRAILER - codec.GOSSIP_OVERHEAD
    length = room - codec.tuple_size(tuple_for("", [writer.node_id]))
    for size, announced in ((length, True), (length + 1, False)):
        name = next(n for n in (f"/{i:06d}".ljust(size, "x") for i in range(10_000))
                    if group_of_name(n, 2) == 0)
        sent = writer.announce(net.now, tuple_for(name, [writer.node_id]))
        assert bool(sent) == announced
        if announced:
            assert len(codec.encode(writer.envelope(sent[0].message))) + AUTH_TRAILER \
                == cfg.max_datagram


def test_announce_skips_the_holders_and_packs_the_tuples_of_one_write() -> None:
    """The holders a tuple names stored it (and published it) themselves: the announce goes
    to the other members only, with every tuple of one operation in as few datagrams as fit."""
    cfg = CoreConfig(k=1, replication=2)
    nodes = [make_node(cfg) for _ in range(4)]
    net = Net(*nodes)
    converge(net, nodes, 8.0)
    writer, holder = nodes[0], nodes[1]
    written = [tuple_for(f"/op{i}", [writer.node_id, holder.node_id]) for i in range(3)]
    out = writer.announce(net.now, *written)
    assert sorted(o.dest for o in out) == sorted(n.address for n in nodes[2:])
    for o in out:
        assert isinstance(o.message, Gossip) and o.message.tuples == tuple(written)
        assert len(codec.encode(writer.envelope(o.message))) + AUTH_TRAILER <= cfg.max_datagram
    # more than one datagram holds: split, nothing dropped, each within the size budget
    room = cfg.max_datagram - AUTH_TRAILER - codec.GOSSIP_OVERHEAD
    size = room // 3
    long = [tuple_for(f"/{i:03d}".ljust(size - codec.tuple_size(tuple_for("", [])), "x"), [])
            for i in range(7)]
    out = writer.announce(net.now, *long)
    to_one = [o.message for o in out if o.dest == nodes[2].address]
    assert len(to_one) == 3
    assert [t for m in to_one for t in m.tuples] == long
    for m in to_one:
        assert len(codec.encode(writer.envelope(m))) + AUTH_TRAILER <= cfg.max_datagram


def test_a_holder_knows_a_missing_name_does_not_exist_once_settled() -> None:
    """``knows_absence``: only for a name this node holds, and only once the group's view has
    been stable for t_fail and a member's snapshot was pulled since; a failure unsettles it."""
    cfg = CoreConfig(k=1, replication=2)
    a, b, c = (make_node(cfg) for _ in range(3))
    net = Net(a, b, c)
    converge(net, [a, b, c], 2.0)
    names = [f"/n{i}" for i in range(40)]
    held_by_c = [n for n in names if c.placed_here(n)]
    elsewhere = [n for n in names if not c.placed_here(n)]
    assert held_by_c and elsewhere
    assert not any(c.knows_absence(n, net.now) for n in held_by_c)  # (the view just changed)
    net.run_until(net.now + cfg.t_fail + 2.0)
    assert all(c.knows_absence(n, net.now) for n in held_by_c)
    assert not any(c.knows_absence(n, net.now) for n in elsewhere)
    net.stop(b)
    stopped = net.now
    while b.node_id in own_ids(c):  # (step by step: caught right after the failure)
        assert net.now < stopped + 3 * cfg.t_fail, "b was never declared failed"
        net.run_until(net.now + 0.1)
    assert not any(c.knows_absence(n, net.now) for n in names)
    net.run_until(net.now + cfg.t_fail + 2.0)
    assert all(c.knows_absence(n, net.now) for n in names if c.placed_here(n))


def test_a_node_that_joins_during_writes_never_denies_a_name_it_holds() -> None:
    """Writers that do not know of a joiner yet place names without it and do not announce
    them to it; it must not say such a name does not exist before its tuple has reached it."""
    cfg = CoreConfig(k=1, replication=3)
    a, b, c = (make_node(cfg) for _ in range(3))
    net = Net(a, b, c)
    converge(net, [a, b, c], 8.0)
    d = make_node(cfg, now=net.now)
    net.add(d)
    join(net, d, a)
    by_id = {n.node_id: n for n in (a, b, c, d)}
    written: list[str] = []
    trusted = 0
    for step in range(150):
        # b writes: to the holders its own view places the name on, then the announce
        name = f"/w{step}"
        holders = [h.node_id for h in b.placement(name)]
        t = tuple_for(name, holders, clock=100 + step)
        for holder in holders:
            by_id[holder].record_write(net.now, t)
        net.post(b, b.announce(net.now, t))
        net.flush()
        written.append(name)
        net.run_until(net.now + 0.1)
        for name in written:
            if d.knows_absence(name, net.now):
                trusted += 1
                assert d.tuples.get(name) is not None, f"{name} denied at {net.now:.1f}"
    assert trusted  # (it did settle)


def test_gossip_with_want_ack_and_pull_gets_answers() -> None:
    cfg = CoreConfig(k=1)
    a, b = make_node(cfg), make_node(cfg)
    a.receive(0.0, wire(b, Gossip(b.entry(), 0, False, (), ())))
    out = a.receive(1.0, wire(b, Gossip(b.entry(), 1234, True, (), (), pull=True)))
    kinds = sorted(type(o.message).__name__ for o in out)
    assert kinds == ["Ack", "Gossip"]
    assert all(o.dest == b.address for o in out)
    ack = next(o.message for o in out if isinstance(o.message, Ack))
    assert ack.echo_ts_ms == 1234 and ack.sender == a.entry()


# --- snapshots -------------------------------------------------------------------------------


def test_snapshot_exchange_converges_two_nodes() -> None:
    k = 3
    cfg = CoreConfig(k=k, t_fail=10_000.0)
    a = make_node(cfg, group=0)
    b = make_node(cfg, group=0)
    shared = [fake_entry(i, k, 0) for i in range(3)]
    only_a = [fake_entry(10 + i, k, 0) for i in range(4)] + [fake_entry(20, k, 1)]
    only_b = [fake_entry(30 + i, k, 0) for i in range(5)] + [fake_entry(40, k, 2)]
    names = [find_name(k, 0, f"/n{i}") for i in range(8)]
    feeder = fake_entry(99, k, 1)
    for node, extra, tuples in (
        (a, only_a, [tuple_for(n, [a.node_id], clock=100 + i) for i, n in enumerate(names[:5])]),
        (b, only_b, [tuple_for(n, [b.node_id], clock=200 - i) for i, n in enumerate(names[3:])]),
    ):
        node.receive(0.0, node.envelope(Snapshot(feeder, tuple(shared + extra), tuple(tuples))))
    snap = a.snapshot()
    request = SyncRequest(a.entry(), snap.members, snap.tuples)
    replies = b.receive(1.0, wire(a, request))
    assert len(replies) == 1 and replies[0].dest == a.address
    assert isinstance(replies[0].message, Snapshot)
    assert a.receive(1.0, wire(b, replies[0].message)) == []
    group_a = own_ids(a) | {a.node_id}
    group_b = own_ids(b) | {b.node_id}
    assert group_a == group_b
    assert group_a == {a.node_id, b.node_id} | {e.node_id for e in shared + only_a[:4] + only_b[:5]}
    assert sorted(a.tuples, key=lambda t: t.name) == sorted(b.tuples, key=lambda t: t.name)
    assert set(a.tuples.names()) == set(names)
    for t in a.tuples:  # overlapping names: the higher version wins on both
        i = names.index(t.name)
        assert t.version.clock == max([100 + i] * (i < 5) + [200 - (i - 3)] * (i >= 3))


def test_snapshot_for_a_foreign_node_carries_no_tuples() -> None:
    cfg = CoreConfig(k=2)
    a = make_node(cfg, group=0)
    a.record_write(0.0, tuple_for(find_name(2, 0), [a.node_id]))
    assert len(a.snapshot(find_id(2, 0)).tuples) == 1
    assert a.snapshot(find_id(2, 1)).tuples == ()


def test_anti_entropy_runs_periodically() -> None:
    cfg = CoreConfig(k=1, anti_entropy_interval=3.0)
    a, b = make_node(cfg), make_node(cfg)
    net = Net(a, b)
    converge(net, [a, b], 20.0)
    syncs = [(t, o) for t, o in net.sent_by(a, since=1.0) if isinstance(o.message, SyncRequest)]
    assert 3 <= len(syncs) <= 10
    assert all(o.dest == b.address for _, o in syncs)
    assert any(isinstance(o.message, Snapshot) and o.dest == a.address for _, o in net.sent_by(b))


# --- lookups, placement, repair --------------------------------------------------------------


def test_plan_lookup_local_and_foreign() -> None:
    k = 4
    cfg = CoreConfig(k=k, contacts_per_group=3)
    a = make_node(cfg, group=0)
    own_name = find_name(k, 0)
    t = tuple_for(own_name, [a.node_id])
    a.record_write(0.0, t)
    plan = a.plan_lookup(own_name)
    assert plan.local and plan.group == 0 and plan.entry == t and plan.ask == ()
    missing = a.plan_lookup(find_name(k, 0, "/missing"))
    assert missing.local and missing.entry is None

    contacts = [fake_entry(i, k, 2) for i in range(3)]
    a.receive(0.0, a.envelope(Snapshot(contacts[0], tuple(contacts[1:]), ())))
    assert a.contacts[2] == [e.node_id for e in contacts]
    a.record_rtt(contacts[0].node_id, 0.050)
    a.record_rtt(contacts[1].node_id, 0.010)
    a.record_rtt(contacts[2].node_id, 0.030)
    foreign = find_name(k, 2)
    plan = a.plan_lookup(foreign)
    assert not plan.local and plan.group == 2 and plan.entry is None
    assert [e.node_id for e in plan.ask] == [contacts[i].node_id for i in (1, 2, 0)]
    assert a.plan_insert(foreign) == plan
    # a contact that left is no longer asked
    a.receive(1.0, a.envelope(Leave(contacts[1])))
    assert [e.node_id for e in a.plan_lookup(foreign).ask] == \
        [contacts[i].node_id for i in (2, 0)]
    assert a.plan_lookup(find_name(k, 3)).ask == ()  # no contacts there


def test_record_rtt_ignores_nonsense() -> None:
    cfg = CoreConfig(k=1)
    a, b = make_node(cfg), make_node(cfg)
    a.receive(0.0, wire(b, Gossip(b.entry(), 0, False, (), ())))
    a.record_rtt(b.node_id, -1.0)
    a.record_rtt(b.node_id, 120.0)
    a.record_rtt(b"\x00" * 20, 0.1)
    assert a.members[b.node_id].rtt is None


def test_placement_picks_r_distinct_live_members() -> None:
    cfg = CoreConfig(k=1, replication=3)
    a = make_node(cfg)
    others = [fake_entry(i) for i in range(6)]
    a.receive(0.0, a.envelope(Snapshot(others[0], tuple(others[1:]), ())))
    a.receive(0.0, a.envelope(Leave(others[5])))
    live = {a.node_id} | {e.node_id for e in others[:5]}
    for i in range(40):
        name = f"/p/{i}"
        chosen = a.placement(name)
        ids = [e.node_id for e in chosen]
        assert len(ids) == 3 == len(set(ids))
        assert set(ids) <= live
        assert ids == placement.choose(name, live, 3)
        assert a.placement(name) == chosen  # deterministic
        if a.node_id in ids:
            assert a.entry() in chosen
        excluded = a.placement(name, frozenset({ids[0]}))
        assert ids[0] not in {e.node_id for e in excluded} and len(excluded) == 3
    assert any(a.node_id in {e.node_id for e in a.placement(f"/p/{i}")} for i in range(40))

    small = make_node(CoreConfig(k=1, replication=3))
    only = fake_entry(50)
    small.receive(0.0, small.envelope(Snapshot(only, (), ())))
    assert {e.node_id for e in small.placement("/x")} == {small.node_id, only.node_id}


def test_repair_is_driven_by_the_lowest_live_holder_only() -> None:
    cfg = CoreConfig(k=1, replication=3, t_fail=10_000.0)
    nodes = sorted((make_node(cfg) for _ in range(6)), key=lambda n: n.node_id)
    for n in nodes:
        feeder = nodes[1] if n is nodes[0] else nodes[0]
        others = tuple(m.entry() for m in nodes if m is not n and m is not feeder)
        n.receive(0.0, wire(feeder, Snapshot(feeder.entry(), others, ())))
        assert len(n.own_alive()) == 5
    holders = [nodes[0], nodes[2], nodes[4]]
    t = tuple_for("/to/repair", [h.node_id for h in holders])
    for n in nodes:
        n.record_write(0.0, t)
        assert n.repair_tasks(0.0) == []  # fully replicated
    dead = nodes[0]  # the lowest id of all fails
    live_nodes = nodes[1:]
    for n in live_nodes:
        n.receive(1.0, wire(dead, Leave(dead.entry())))
    tasks = {n.node_id: n.repair_tasks(1.0) for n in live_nodes}
    driver = nodes[2]  # lowest id among the live holders
    assert all(v == [] for nid, v in tasks.items() if nid != driver.node_id)
    assert len(tasks[driver.node_id]) == 1
    task = tasks[driver.node_id][0]
    assert task.entry == t
    holder_ids = {h.node_id for h in holders}
    candidates = {n.node_id for n in live_nodes} - holder_ids
    target_ids = [e.node_id for e in task.targets]
    assert len(target_ids) == 1 and set(target_ids) <= candidates
    assert target_ids == placement.rank(t.name, candidates)[:1]
    # the next candidates in placement order stand by in case the target refuses
    assert [e.node_id for e in task.spares] == placement.rank(t.name, candidates)[1:4]
    assert driver.repair_tasks(1.5) == []  # not planned twice while in progress

    updated = driver.repair_done(2.0, task.entry, tuple(target_ids))
    assert updated.holder_seq == t.holder_seq + 1
    assert updated.version == t.version
    assert set(updated.holders) == {nodes[2].node_id, nodes[4].node_id, *target_ids}
    assert list(updated.holders) == sorted(updated.holders)
    assert driver.tuples.get(t.name) == updated
    assert driver.repair_tasks(2.0) == []
    for n in live_nodes:
        n.record_write(2.0, updated)
        assert n.repair_tasks(2.0) == []


def test_answer_lookup_lists_live_holders_self_first() -> None:
    cfg = CoreConfig(k=1)
    a = make_node(cfg)
    others = [fake_entry(60 + i) for i in range(3)]
    a.receive(0.0, a.envelope(Snapshot(others[0], tuple(others[1:]), ())))
    a.record_rtt(others[1].node_id, 0.001)
    a.receive(0.0, a.envelope(Leave(others[2])))
    t = tuple_for("/ans", [a.node_id, *(e.node_id for e in others)])
    a.record_write(0.0, t)
    ans = a.answer_lookup("/ans")
    assert ans.entry == t
    assert [e.node_id for e in ans.holders] == \
        [a.node_id, others[1].node_id, others[0].node_id]
    unknown = a.answer_lookup("/nothing")
    assert unknown.entry is None and unknown.holders == ()
    assert list(unknown.candidates) == a.placement("/nothing")


ASKER: Address = ("10.9.9.9", 7400)


def test_answer_lookup_request_inlines_only_the_current_small_version() -> None:
    cfg = CoreConfig(k=1)
    a = make_node(cfg)
    others = [fake_entry(70 + i) for i in range(2)]
    a.receive(0.0, a.envelope(Snapshot(others[0], (others[1],), ())))
    t = tuple_for("/small", [a.node_id, others[0].node_id])
    a.record_write(0.0, t)
    ask = LookupRequest(42, "/small", True)

    action = a.answer_lookup_request(ask, ASKER, t.version)
    assert action.attach == t and action.forward is None
    assert action.reply == Outgoing(ASKER, LookupReply(
        42, t, tuple(a.answer_lookup("/small").holders), ()))
    # not asked for, or an older or a newer (unacknowledged) copy: no bytes
    plain = a.answer_lookup_request(LookupRequest(42, "/small", False), ASKER, t.version)
    assert plain.attach is None and plain.forward is None and plain.reply is not None
    older = Version(t.version.clock - 1, t.version.writer)
    newer = Version(t.version.clock + 1, t.version.writer)
    for held in (None, older, newer):
        act = a.answer_lookup_request(ask, ASKER, held)
        assert act.attach is None
    # after an overwrite this node has not stored yet, its old copy is never offered
    t2 = tuple_for("/small", [others[0].node_id], clock=t.version.clock + 5)
    a.record_write(1.0, t2)
    act2 = a.answer_lookup_request(ask, ASKER, t.version)
    assert act2.attach is None and act2.reply is None and act2.forward is not None
    # too large to inline: the tuple, and no forwarding (the bytes go over HTTP)
    big = t._replace(name="/big", size=codec.INLINE_MAX + 1)
    a.record_write(0.0, big)
    act3 = a.answer_lookup_request(LookupRequest(1, "/big", True), ASKER, big.version)
    assert act3.attach is None and act3.forward is None and act3.reply is not None
    assert act3.reply.message == LookupReply(1, big, tuple(a.answer_lookup("/big").holders))
    exact = t._replace(name="/exact", size=codec.INLINE_MAX)
    a.record_write(0.0, exact)
    assert a.answer_lookup_request(LookupRequest(1, "/exact", True), ASKER,
                                   exact.version).attach == exact
    gone = t._replace(name="/gone", tombstone=True, size=0)
    a.record_write(0.0, gone)
    act4 = a.answer_lookup_request(LookupRequest(1, "/gone", True), ASKER, gone.version)
    assert act4.attach is None and act4.forward is None
    assert act4.reply is not None and act4.reply.message.entry == gone  # type: ignore[union-attr]
    # a name not heard of yet: the placement candidates, as over HTTP
    act5 = a.answer_lookup_request(LookupRequest(5, "/unknown", True), ASKER, None)
    assert act5.reply is not None and act5.attach is None
    unknown = act5.reply.message
    assert isinstance(unknown, LookupReply) and unknown.entry is None
    assert unknown.candidates == tuple(a.placement("/unknown"))
    # every reply goes through the codec unchanged
    for act in (action, plain, act3, act4, act5):
        assert act.reply is not None
        msg = act.reply.message
        assert codec.decode(codec.encode(a.envelope(msg))).message == msg


def test_lookup_request_for_a_small_object_held_elsewhere_is_forwarded_once() -> None:
    cfg = CoreConfig(k=1)
    contact = make_node(cfg)
    holders = [fake_entry(80 + i) for i in range(2)]
    contact.receive(0.0, contact.envelope(Snapshot(holders[0], (holders[1],), ())))
    contact.record_rtt(holders[1].node_id, 0.001)
    contact.record_rtt(holders[0].node_id, 0.005)
    t = tuple_for("/fwd", [h.node_id for h in holders])._replace(size=1024)
    contact.record_write(0.0, t)
    action = contact.answer_lookup_request(LookupRequest(9, "/fwd", True), ASKER, None)
    assert action.reply is None and action.attach is None
    # to the nearest live holder, which answers the asker (reply_to) and marks it forwarded
    assert action.forward == Outgoing(holders[1].address,
                                      LookupRequest(9, "/fwd", True, ASKER))
    holder = make_node(cfg)
    holder.receive(0.0, holder.envelope(Snapshot(holders[0], (holders[1],), ())))
    t_h = t._replace(holders=tuple(sorted([holder.node_id, holders[0].node_id])))
    holder.record_write(0.0, t_h)
    relayed = LookupRequest(9, "/fwd", True, ASKER)
    answered = holder.answer_lookup_request(relayed, contact.address, t_h.version)
    assert answered.attach == t_h and answered.forward is None
    assert answered.reply is not None and answered.reply.dest == ASKER
    assert isinstance(answered.reply.message, LookupReply)
    assert answered.reply.message.forwarded
    # a forwarded request is never forwarded again: a holder that is behind answers with
    # its tuple (no bytes) instead
    behind = holder.answer_lookup_request(relayed, contact.address, None)
    assert behind.forward is None and behind.attach is None
    assert behind.reply is not None and behind.reply.dest == ASKER
    # not asked for the bytes: no forwarding either
    plain = contact.answer_lookup_request(LookupRequest(9, "/fwd", False), ASKER, None)
    assert plain.forward is None and plain.reply is not None


def test_answer_lookup_request_for_another_group_says_so() -> None:
    k = 4
    a = make_node(CoreConfig(k=k), group=0)
    name = find_name(k, 1)
    a.record_write(0.0, tuple_for(name, [a.node_id]))  # ignored: not our group
    action = a.answer_lookup_request(LookupRequest(3, name, True), ASKER, None)
    assert action.reply == Outgoing(ASKER, LookupReply(3, None, (), (), None, True))
    assert action.attach is None and action.forward is None


def test_plan_lookup_falls_back_to_a_spare_when_every_contact_is_gone() -> None:
    """The members of a group heard of beyond its contacts: the latest one is kept and asked
    after the contacts (all of them dead after a crash of several nodes, say)."""
    k = 4
    a = make_node(CoreConfig(k=k, contacts_per_group=2), group=0)
    entries = [fake_entry(300 + i, k, 2) for i in range(4)]
    a.receive(0.0, a.envelope(Snapshot(entries[0], tuple(entries[1:]), ())))
    assert a.contacts[2] == [entries[0].node_id, entries[1].node_id]
    name = find_name(k, 2, "/spare")
    ask = [e.node_id for e in a.plan_lookup(name).ask]
    assert sorted(ask[:2]) == sorted(a.contacts[2]) and ask[2:] == [entries[3].node_id]
    size = a.state_entries()
    a.report_unreachable(1.0, entries[0].node_id)
    assert a.contacts[2] == [entries[1].node_id]
    a.report_unreachable(1.0, entries[1].node_id)
    # the group's last contact is gone: its spare takes the place at once
    assert a.contacts[2] == [entries[3].node_id]
    assert [e.node_id for e in a.plan_lookup(name).ask] == [entries[3].node_id]
    # gossip refills the contacts: the spare becomes a contact and is not listed twice
    a.receive(2.0, wire(make_node(CoreConfig(k=k), group=0), Gossip(
        entries[3]._replace(heartbeat=5), 0, False, (entries[2]._replace(heartbeat=5),), ())))
    assert set(a.contacts[2]) == {entries[2].node_id, entries[3].node_id}
    ask = [e.node_id for e in a.plan_lookup(name).ask]
    assert len(ask) == len(set(ask)) == 2
    # the spare pool is a fixed-size cache, outside the N- and F-dependent state figure
    assert size == 2 and a.state_entries() == len(a.members) + len(a.graveyard)


def _spare_setup(own_rtt: float) -> tuple[KelipsNode, list[MemberEntry], MemberEntry]:
    """A node of group 0 with 2 contacts in group 2 (RTT 2 ms), a spare there heard of at
    t = 0, and 4 own-group members at ``own_rtt``."""
    k = 4
    a = make_node(CoreConfig(k=k, contacts_per_group=2), group=0)
    own = [fake_entry(400 + i, k, 0) for i in range(4)]
    entries = [fake_entry(300 + i, k, 2) for i in range(3)]
    a.receive(0.0, a.envelope(Snapshot(entries[0], (*entries[1:], *own), ())))
    assert a.contacts[2] == [entries[0].node_id, entries[1].node_id]
    for e in entries[:2]:
        a.members[e.node_id].observe_rtt(0.002)
    for e in own:
        a.members[e.node_id].observe_rtt(own_rtt)
    return a, entries[:2], entries[2]


def _names_by_spare_rank(contacts: list[MemberEntry], spare: MemberEntry) -> tuple[str, str]:
    """A name of group 2 that the spare outranks both contacts for, and one it does not."""
    ids = [spare.node_id, *(c.node_id for c in contacts)]
    first = [placement.rank(f"/s-{i}", ids)[0] == spare.node_id
             if group_of_name(f"/s-{i}", 4) == 2 else None for i in range(2000)]
    return f"/s-{first.index(True)}", f"/s-{first.index(False)}"


def test_a_fresh_spare_that_outranks_the_contacts_is_asked_first_on_a_lan() -> None:
    """Holders are the group's top r by rendezvous weight, so the best-ranked of the
    contacts and the spare holds the object whenever any of them does: asking it first saves
    the contact's forward to a holder. Only while the spare is fresh (gossip names live members
    only) and an unmeasured member is expected near (the own group's median RTT within the
    slack of the nearest contact's)."""
    a, contacts, spare = _spare_setup(own_rtt=0.003)
    outranked, not_outranked = _names_by_spare_rank(contacts, spare)
    contact_ids = {c.node_id for c in contacts}

    def ask(name: str, now: float | None) -> list[NodeId]:
        return [e.node_id for e in a.plan_lookup(name, now).ask]

    assert ask(outranked, 0.5)[0] == spare.node_id
    assert set(ask(outranked, 0.5)[1:]) == contact_ids
    # ranked below a contact, or stale (not heard of for more than two gossip intervals),
    # or with no time given: asked last, as a fallback only
    assert ask(not_outranked, 0.5)[2] == spare.node_id
    assert ask(outranked, 2 * a.config.gossip_interval + 0.01)[2] == spare.node_id
    assert ask(outranked, None)[2] == spare.node_id
    # heard of again: fresh again
    a.receive(3.0, a.envelope(Snapshot(contacts[0], (spare._replace(heartbeat=2),), ())))
    assert ask(outranked, 3.5)[0] == spare.node_id


def test_typical_rtt_is_the_median_over_the_own_group_measured() -> None:
    k = 4
    a = make_node(CoreConfig(k=k), group=0)
    assert a.typical_rtt() is None
    own = [fake_entry(500 + i, k, 0) for i in range(4)]
    a.receive(0.0, a.envelope(Snapshot(own[0], tuple(own[1:]), ())))
    assert a.typical_rtt() is None  # nobody measured yet
    for e, rtt in zip(own[:3], (0.004, 0.001, 0.009), strict=True):
        a.members[e.node_id].observe_rtt(rtt)
    assert a.typical_rtt() == 0.004


def test_a_spare_of_unknown_distance_is_not_asked_first_across_a_wide_area() -> None:
    """Contacts are the nearest members of their group; the own group's members are placed
    at random, so their median RTT is what an unmeasured spare costs. Far above the nearest
    contact's (a wide area), the spare waits its turn."""
    a, contacts, spare = _spare_setup(own_rtt=0.030)
    outranked, _ = _names_by_spare_rank(contacts, spare)
    assert a.plan_lookup(outranked, 0.5).ask[2].node_id == spare.node_id


def test_the_spare_is_weighed_against_the_nearest_contact_not_the_one_asked_first() -> None:
    """The likely-holder contact may go first while farther than the nearest (within the
    slack); the spare's expected distance is still compared with the nearest one's."""
    a, contacts, spare = _spare_setup(own_rtt=0.006)
    outranked, _ = _names_by_spare_rank(contacts, spare)
    likely = placement.rank(outranked, [c.node_id for c in contacts])[0]
    for c in contacts:  # the likely holder at 4 ms, the other at 2 ms: 4 <= 2 * 2 + 1
        a.members[c.node_id].rtt = 0.004 if c.node_id == likely else 0.002
    ask = [e.node_id for e in a.plan_lookup(outranked, 0.5).ask]
    assert ask[0] == likely  # the likely holder goes first among the contacts ...
    assert ask[2] == spare.node_id  # ... and 6 ms > 2 * 2 + 1: the spare is expected too far


def test_a_spare_of_a_group_with_one_contact_outlives_the_others_in_the_pool() -> None:
    k = 40
    a = make_node(CoreConfig(k=k, contacts_per_group=2), group=0)
    lonely = fake_entry(900, k, 1)
    a.receive(0.0, a.envelope(Snapshot(lonely, (), ())))  # group 1: one contact
    a._keep_spare(1, fake_entry(901, k, 1), 0.0)
    for g in range(2, 2 + 30):  # 30 groups with both contacts, each heard of once more
        first, second, third = (fake_entry(910 + 3 * g + j, k, g) for j in range(3))
        a.receive(0.0, a.envelope(Snapshot(first, (second, third), ())))
    assert len(a._spares) == 16
    assert 1 in a._spares


def test_lookup_messages_do_not_change_membership_state() -> None:
    a = make_node(CoreConfig(k=1))
    before = (dict(a.members), a.heartbeat, len(a.tuples))
    t = tuple_for("/x", [a.node_id])
    assert a.receive(0.0, a.envelope(LookupRequest(1, "/x", True))) == []
    assert a.receive(0.0, a.envelope(LookupReply(1, t, (fake_entry(1),), (), b""))) == []
    assert (dict(a.members), a.heartbeat, len(a.tuples)) == before


def test_plan_lookup_asks_the_likely_holder_contact_first() -> None:
    """Among the contacts of a group, the one with the highest rendezvous weight for the
    name holds it whenever any contact does: it goes first unless clearly farther."""
    k = 4
    a = make_node(CoreConfig(k=k, contacts_per_group=3), group=0)
    contacts = [fake_entry(200 + i, k, 2) for i in range(3)]
    a.receive(0.0, a.envelope(Snapshot(contacts[0], tuple(contacts[1:]), ())))
    ids = [e.node_id for e in contacts]
    for i, rtt in enumerate((0.0010, 0.0012, 0.0015)):  # a LAN: all within the slack
        a.record_rtt(ids[i], rtt)
    for j in range(30):
        name = find_name(k, 2, f"/likely{j}")
        ask = [e.node_id for e in a.plan_lookup(name).ask]
        best = placement.rank(name, ids)[0]
        assert ask[0] == best
        assert ask[1:] == [nid for nid in ids if nid != best]  # the rest by RTT
    # a likely holder far away (more than 2 x the nearest RTT + 1 ms) is not preferred
    a.record_rtt(ids[2], 0.5)
    for _ in range(20):
        a.record_rtt(ids[2], 0.5)
    for j in range(30):
        name = find_name(k, 2, f"/far{j}")
        ask = [e.node_id for e in a.plan_lookup(name).ask]
        best = placement.rank(name, ids)[0]
        if best == ids[2]:
            assert ask == ids
        else:
            assert ask[0] == best


# --- contacts --------------------------------------------------------------------------------


@pytest.mark.parametrize("probe_misses", [2, 3])
def test_unresponsive_contact_is_dropped_not_failed(probe_misses: int) -> None:
    cfg = CoreConfig(k=2, probe_misses=probe_misses)
    a = make_node(cfg, group=0)
    x = make_node(cfg, group=1)
    net = Net(a)  # x is not on the network: nothing sent to it arrives
    a.receive(0.0, wire(x, Gossip(x.entry(), 0, False, (), ())))
    assert a.contacts[1] == [x.node_id]
    net.run_until(6.0)  # drops within 5.5 s; the grave (graveyard_ttl 8 s) is still there
    to_x = [t for t, o in net.sent_by(a) if o.dest == x.address]
    dropped = net.of_kind(a, "contact_dropped")
    assert [e.node_id for e in dropped] == [x.node_id]
    assert not net.of_kind(a, "failed")
    assert len(to_x) >= probe_misses
    assert dropped[0].at - to_x[0] >= probe_misses * cfg.probe_timeout
    assert dropped[0].at - to_x[0] <= probe_misses * (cfg.probe_timeout + cfg.gossip_interval) \
        + cfg.gossip_interval
    assert a.contacts.get(1) == []
    assert x.node_id not in a.members
    assert x.node_id in a.graveyard
    # stale news of x cannot make it a contact again; a fresher heartbeat can
    a.receive(net.now, wire(x, Gossip(x.entry(), 0, False, (), ())))
    assert x.node_id not in a.members
    x.heartbeat += 1
    a.receive(net.now, wire(x, Gossip(x.entry(), 0, False, (), ())))
    assert a.contacts[1] == [x.node_id]


def test_report_unreachable_drops_a_contact_but_not_a_group_member() -> None:
    cfg = CoreConfig(k=2)
    a = make_node(cfg, group=0)
    x = make_node(cfg, group=1)
    b = make_node(cfg, group=0)
    for peer in (x, b):
        a.receive(0.0, wire(peer, Gossip(peer.entry(), 0, False, (), ())))
    a.drain_events()
    a.report_unreachable(1.0, x.node_id)
    a.report_unreachable(1.0, b.node_id)
    assert [e.kind for e in a.drain_events()] == ["contact_dropped"]
    assert a.contacts[1] == []
    assert a.members[b.node_id].alive


# --- contact budget --------------------------------------------------------------------------


def _heavy_node(k: int, own_tuples: int) -> tuple[KelipsNode, list[MemberEntry]]:
    """A node alone in group 0 holding ``own_tuples`` tuples, with 2 contacts in every other
    group, the second one of each farther than the first."""
    a = make_node(CoreConfig(k=k, contacts_per_group=2), group=0)
    for i in range(own_tuples):
        a.merge_tuple(0.0, tuple_for(find_name(k, 0, f"/heavy{i}"), [a.node_id]))
    entries = [fake_entry(600 + 2 * g + j, k, g) for g in range(1, k) for j in range(2)]
    a.receive(0.0, a.envelope(Snapshot(entries[0], tuple(entries[1:]), ())))
    for i, e in enumerate(entries):
        a.record_rtt(e.node_id, 0.001 * (1 + i % 2) * (1 + i / 100))
    assert a.contact_budget() == len(a._all_contacts()) == 2 * (k - 1)
    return a, entries


_REPORTERS = iter(range(800, 100_000))


def _ack_from(a: KelipsNode, entry: MemberEntry, members: int, tuples: int) -> None:
    """An ack reporting a group's load, from a node of ``entry``'s group that is no contact
    (its RTT sample must not reorder the contacts)."""
    reporter = fake_entry(next(_REPORTERS), a.config.k, group_of_node(entry.node_id, a.config.k))
    a.receive(a._next_scan, a.envelope(Ack(reporter, 0, members, tuples)))


# The budget is recomputed every scan; called directly, so that no time passes (unanswered
# probes would drop contacts and leave graves, which count against the budget too).


def test_a_heavier_group_gives_up_its_farthest_second_contacts() -> None:
    """Every member of a group keeps all the group's tuples; one whose group holds more than
    the average keeps as many fewer contacts (and one more, for the estimate's noise), so its
    state stays at most the average node's."""
    k = 12
    a, entries = _heavy_node(k, own_tuples=3)
    before = a.state_entries()
    for e in entries[:6]:  # each foreign group: 1 member, no tuples -> ours is 3 heavier
        _ack_from(a, e, 1, 0)
    a._update_contact_budget(a._next_scan)
    assert a.contact_budget() == 2 * (k - 1) - 4
    assert a.state_entries() == before - 4
    kept = a._all_contacts()
    assert all(len(a.contacts[g]) >= 1 for g in range(1, k))
    # the dropped ones are the four farthest, each a second contact of its group
    dropped = [e.node_id for e in entries if e.node_id not in kept]
    assert len(dropped) == 4
    assert set(dropped) <= {e.node_id for e in entries[1::2]}
    assert dropped == [e.node_id for e in entries[1::2]][-4:]
    # ... and kept as the lookup spares of their groups, asked after the remaining contact
    assert all(a._spares[group_of_node(d, k)].entry.node_id == d for d in dropped)
    far_group = group_of_node(dropped[-1], k)
    ask = [e.node_id for e in a.plan_lookup(find_name(k, far_group, "/spared")).ask]
    assert ask == [*a.contacts[far_group], dropped[-1]]
    # no second contact comes back while trimmed, even if gossip offers one
    newcomer = fake_entry(700, k, 11)
    assert len(a.contacts[11]) == 1
    a.receive(a._next_scan, wire(make_node(CoreConfig(k=k), group=0),
                                 Gossip(newcomer, 0, False, (), ())))
    assert len(a.contacts[11]) == 1
    # the other groups catch up and pass ours: the budget comes back, gossip refills
    for _ in range(40):
        _ack_from(a, entries[0], 1, 4)
    a._update_contact_budget(a._next_scan)
    assert a.contact_budget() == 2 * (k - 1)
    a.receive(a._next_scan, wire(make_node(CoreConfig(k=k), group=0),
                                 Gossip(newcomer._replace(heartbeat=2), 0, False, (), ())))
    assert newcomer.node_id in a.contacts[11]


def test_two_contacts_stay_in_half_the_groups_however_heavy_the_own_group() -> None:
    k = 11
    a, entries = _heavy_node(k, own_tuples=50)
    for e in entries[:8]:
        _ack_from(a, e, 1, 0)
    a._update_contact_budget(a._next_scan)
    assert a.contact_budget() == 2 * (k - 1) - (k - 1) // 2
    assert sorted(len(a.contacts[g]) for g in range(1, k)) == [1] * 5 + [2] * 5
    assert all(plan.ask for plan in (a.plan_lookup(find_name(k, g, "/far")) for g in range(1, k)))


def test_a_write_burst_in_every_group_trims_nothing() -> None:
    """The own group's load is read at the moment each report arrives: when every group fills
    alike, the difference stays 0 however fast they fill."""
    k = 12
    a, entries = _heavy_node(k, own_tuples=0)
    for i in range(30):
        a.merge_tuple(0.0, tuple_for(find_name(k, 0, f"/burst{i}"), [a.node_id]))
        _ack_from(a, entries[(2 * i) % len(entries)], 1, len(a.tuples))
        a._update_contact_budget(a._next_scan)
        assert a.contact_budget() == 2 * (k - 1)
    assert len(a._all_contacts()) == 2 * (k - 1)


def test_no_trimming_before_enough_reports_and_reports_from_the_own_group_count_not() -> None:
    k = 12
    a, entries = _heavy_node(k, own_tuples=10)
    b = make_node(CoreConfig(k=k), group=0)
    for _ in range(10):  # a member of our own group reports our own load: no information
        _ack_from(a, b.entry(), 1, 0)
    for e in entries[:3]:  # three foreign reports: not enough to act on
        _ack_from(a, e, 1, 0)
    a._update_contact_budget(a._next_scan)
    assert a.contact_budget() == 2 * (k - 1)
    _ack_from(a, entries[3], 1, 0)
    a._update_contact_budget(a._next_scan)
    assert a.contact_budget() == 2 * (k - 1) - (k - 1) // 2  # 10 heavier: as many as may go


def test_members_of_a_group_average_their_load_estimates() -> None:
    """Gossip in the own group carries the sender's estimate (sixteenths of an entry); a
    node without reports of its own takes it, one with reports averages with it; foreign
    gossip is not the own group's estimate and is ignored."""
    k = 12
    a, entries = _heavy_node(k, own_tuples=0)
    b = make_node(CoreConfig(k=k), group=0)
    gossip = [o.message for o in a.tick(a._next_gossip) if isinstance(o.message, Gossip)]
    assert gossip and all(g.load_excess is None for g in gossip)
    a.receive(a._next_scan, wire(b, Gossip(b.entry(), 0, False, (), (), load_excess=4 * 16)))
    a._update_contact_budget(a._next_scan)
    assert a.contact_budget() == 2 * (k - 1) - 4 - 1
    a.receive(a._next_scan, wire(b, Gossip(b.entry(), 0, False, (), (), load_excess=0)))
    a._update_contact_budget(a._next_scan)
    assert a.contact_budget() == 2 * (k - 1) - 2 - 1
    foreign = entries[0]._replace(heartbeat=9)
    a.receive(a._next_scan, a.envelope(Gossip(foreign, 0, False, (), (), load_excess=-800)))
    a._update_contact_budget(a._next_scan)
    assert a.contact_budget() == 2 * (k - 1) - 2 - 1
    sent = [o.message for o in a.tick(a._next_gossip + 1) if isinstance(o.message, Gossip)
            and o.dest == b.address]
    assert sent and sent[0].load_excess == 2 * 16


def test_a_joiner_takes_its_group_estimate_from_the_snapshot_and_trims_at_once() -> None:
    """A node joining a heavy group gets the group's contacts and its estimate in one
    snapshot: it keeps no more than the budget from the start."""
    k = 12
    a, _ = _heavy_node(k, own_tuples=0)
    joiner = make_node(CoreConfig(k=k, contacts_per_group=2), group=0)
    joiner.join_request()
    for _ in range(8):  # reports heard before the join says anything: not our group's yet
        joiner.receive(0.0, joiner.envelope(Ack(fake_entry(next(_REPORTERS), k, 1), 0, 1, 50)))
    a._load_excess, a._load_known = 3.0, True
    snap = a.snapshot(joiner.node_id)
    assert snap.load_excess == 3 * 16
    joiner.receive(0.0, wire(a, snap))
    assert joiner.synced
    assert joiner.contact_budget() == 2 * (k - 1) - 4
    assert len(joiner._all_contacts()) == joiner.contact_budget()


def test_a_cluster_of_few_groups_keeps_every_contact() -> None:
    """Below 9 groups each contact is a large share of a node's reach and the state is
    nearly all tuples: the budget trims nothing, however heavy the own group."""
    k = 8
    a, entries = _heavy_node(k, own_tuples=50)
    for e in entries[:8]:
        _ack_from(a, e, 1, 0)
    a._update_contact_budget(a._next_scan)
    assert a.contact_budget() == len(a._all_contacts()) == 2 * (k - 1)

