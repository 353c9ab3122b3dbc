"""Member / Graveyard rules of the failure detector, TupleStore merge, and the hybrid clock."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.core import codec
from daemon.core.ids import NODE_ID_BYTES
from daemon.core.members import Graveyard, Member, Status
from daemon.core.messages import BEAT_PREFIX, Beat, MemberEntry, TupleEntry, Version
from daemon.core.tuples import HybridClock, TupleStore, make_version, newest, with_holders

PROPS = settings(max_examples=200, deadline=None)


def nid(i: int) -> bytes:
    return i.to_bytes(NODE_ID_BYTES, "big")


def entry(inc: int, hb: int, host: str = "10.0.0.1", port: int = 7000, i: int = 1) -> MemberEntry:
    return MemberEntry(nid(i), host, port, inc, hb)


def tup(name: str, clock: int, writer: int = 1, seq: int = 0, holders: tuple[int, ...] = (1,),
        tombstone: bool = False, size: int = 10) -> TupleEntry:
    return TupleEntry(name, Version(clock, nid(writer)), seq, size, 0o644, 0, b"\x01" * 32,
                      tuple(nid(h) for h in holders), tombstone)


# --- Member ----------------------------------------------------------------------------------


def test_new_member_is_alive_and_heard_now() -> None:
    m = Member(entry(1, 5), group=3, own=True, now=10.0)
    assert m.alive and m.status is Status.ALIVE
    assert (m.incarnation, m.heartbeat, m.last_heard, m.group, m.own) == (1, 5, 10.0, 3, True)
    assert m.entry() == entry(1, 5)
    assert m.address == ("10.0.0.1", 7000)
    assert m.rtt is None


def test_absorb_takes_higher_heartbeat() -> None:
    m = Member(entry(1, 5), 0, True, 0.0)
    assert m.absorb(entry(1, 6, host="10.0.0.9", port=7001), 3.0)
    assert (m.incarnation, m.heartbeat, m.last_heard) == (1, 6, 3.0)
    assert m.address == ("10.0.0.9", 7001)


def test_absorb_takes_higher_incarnation_even_with_lower_heartbeat() -> None:
    m = Member(entry(1, 50), 0, True, 0.0)
    assert m.absorb(entry(2, 0), 4.0)
    assert (m.incarnation, m.heartbeat, m.last_heard) == (2, 0, 4.0)


def test_absorb_ignores_equal_and_lower() -> None:
    m = Member(entry(2, 5), 0, True, 1.0)
    for stale in (entry(2, 5, host="10.9.9.9"), entry(2, 4), entry(1, 99)):
        assert not m.absorb(stale, 8.0)
        assert (m.incarnation, m.heartbeat, m.last_heard) == (2, 5, 1.0)
        assert m.address == ("10.0.0.1", 7000)  # the address is not taken from stale entries


def test_absorb_beat() -> None:
    m = Member(entry(1, 5), 0, True, 0.0)
    assert not m.absorb_beat(1, 5, 2.0)
    assert m.last_heard == 0.0
    assert m.absorb_beat(1, 7, 2.0)
    assert (m.heartbeat, m.last_heard) == (7, 2.0)
    assert m.beat() == Beat(nid(1)[:BEAT_PREFIX], 1, 7)


def test_digests_carry_low_bits_and_unwrap_to_the_nearest_heartbeat() -> None:
    m = Member(entry(0x1_03, 0xFFFE), 0, True, 0.0)
    assert m.beat() == Beat(nid(1)[:BEAT_PREFIX], 0x03, 0xFFFE)
    assert not m.absorb_digest(Beat(nid(1)[:BEAT_PREFIX], 0x04, 0xFFFF), 1.0)  # other life
    assert not m.absorb_digest(Beat(nid(1)[:BEAT_PREFIX], 0x03, 0xFFF0), 1.0)  # older
    assert m.absorb_digest(Beat(nid(1)[:BEAT_PREFIX], 0x03, 0x0002), 2.0)  # wrapped: +4
    assert (m.heartbeat, m.last_heard) == (0x1_0002, 2.0)
    assert not m.absorb_digest(Beat(nid(1)[:BEAT_PREFIX], 0x03, 0xFFFF), 3.0)  # 3 behind
    assert m.heartbeat == 0x1_0002


@given(st.integers(0, 1 << 31), st.integers(-(1 << 15) + 1, (1 << 15) - 1))
def test_digest_unwrap_recovers_any_heartbeat_within_half_the_range(known: int,
                                                                   delta: int) -> None:
    m = Member(entry(1, known), 0, True, 0.0)
    sent = known + delta
    if sent < 0:
        return
    taken = m.absorb_digest(Beat(nid(1)[:BEAT_PREFIX], 1, sent & 0xFFFF), 1.0)
    assert taken == (delta > 0)
    assert m.heartbeat == max(known, sent)


def test_observe_rtt_is_smoothed() -> None:
    m = Member(entry(1, 1), 0, False, 0.0)
    m.observe_rtt(0.1)
    assert m.rtt == 0.1
    m.observe_rtt(1.1)
    assert abs(m.rtt - 0.3) < 1e-9


@PROPS
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 50)), max_size=60))
def test_liveness_never_decreases_under_absorb(seq: list[tuple[int, int]]) -> None:
    m = Member(entry(1, 10), 0, True, 0.0)
    best = (1, 10)
    for step, (inc, hb) in enumerate(seq, start=1):
        before = (m.incarnation, m.heartbeat, m.last_heard)
        took = m.absorb(entry(inc, hb), float(step))
        after = (m.incarnation, m.heartbeat)
        assert after >= before[:2]
        assert took == ((inc, hb) > before[:2])
        assert m.last_heard == (float(step) if took else before[2])
        best = max(best, (inc, hb))
        assert after == best


@PROPS
@given(st.lists(st.integers(0, 100), max_size=60))
def test_heartbeat_never_decreases_within_an_incarnation(seq: list[int]) -> None:
    m = Member(entry(3, 0), 0, True, 0.0)
    last = 0
    for hb in seq:
        m.absorb(entry(3, hb), 1.0)
        assert m.heartbeat >= last
        last = m.heartbeat
    assert m.heartbeat == max([0, *seq])


# --- Graveyard -------------------------------------------------------------------------------


def test_graveyard_blocks_stale_and_equal_but_not_fresher() -> None:
    g = Graveyard()
    g.bury(nid(1), (2, 10), expires=100.0)
    assert nid(1) in g and len(g) == 1
    assert g.blocks(entry(2, 10))
    assert g.blocks(entry(2, 9))
    assert g.blocks(entry(1, 500))
    assert not g.blocks(entry(2, 11))
    assert not g.blocks(entry(3, 0))
    assert not g.blocks(entry(1, 1, i=2))  # an unknown node is never blocked


def test_graveyard_expire_and_forget() -> None:
    g = Graveyard()
    g.bury(nid(1), (1, 1), expires=10.0)
    g.bury(nid(2), (1, 1), expires=20.0)
    g.expire(9.9)
    assert len(g) == 2
    g.expire(10.0)
    assert nid(1) not in g and nid(2) in g
    assert not g.blocks(entry(1, 1, i=1))
    assert g.blocks(entry(1, 1, i=2))
    g.forget(nid(2))
    g.forget(nid(3))  # forgetting an unknown node is harmless
    assert len(g) == 0
    assert not g.blocks(entry(1, 1, i=2))


# --- TupleStore ------------------------------------------------------------------------------


def contents(store: TupleStore) -> dict[str, TupleEntry]:
    return {t.name: t for t in store}


def test_merge_keeps_max_order_key() -> None:
    s = TupleStore()
    a = tup("/a", 10)
    assert s.merge(a, 0.0)
    assert not s.merge(a, 0.0)  # same entry: no change
    assert not s.merge(tup("/a", 9), 0.0)  # older version
    assert s.get("/a") == a
    b = tup("/a", 10, seq=1, holders=(1, 2))  # same version, later holder epoch
    assert s.merge(b, 0.0)
    assert not s.merge(a, 0.0)
    c = tup("/a", 10, writer=2)  # same clock, higher writer id
    assert s.merge(c, 0.0)
    assert s.get("/a") == c
    assert len(s) == 1 and s.names() == ["/a"]


def test_merge_tie_breaks_on_holders_then_tombstone() -> None:
    s = TupleStore()
    s.merge(tup("/a", 5, holders=(1,)), 0.0)
    assert s.merge(tup("/a", 5, holders=(2,)), 0.0)
    assert s.merge(tup("/a", 5, holders=(2,), tombstone=True), 0.0)
    assert s.get("/a") == tup("/a", 5, holders=(2,), tombstone=True)


def test_tombstones_expire_after_ttl() -> None:
    s = TupleStore()
    s.merge(tup("/dead", 5, tombstone=True), 10.0)
    s.merge(tup("/live", 5), 10.0)
    assert s.expire_tombstones(15.0, ttl=10.0) == []
    assert s.expire_tombstones(20.0, ttl=10.0) == ["/dead"]
    assert s.names() == ["/live"]
    # a newer live version replaces a tombstone, which then never expires
    s.merge(tup("/x", 1, tombstone=True), 0.0)
    s.merge(tup("/x", 2), 1.0)
    assert s.expire_tombstones(100.0, ttl=10.0) == []
    assert s.get("/x") == tup("/x", 2)
    # oldest first: a tombstone deleted again later waits its own ttl from then
    s.merge(tup("/a", 1, tombstone=True), 200.0)
    s.merge(tup("/b", 1, tombstone=True), 201.0)
    s.merge(tup("/a", 2, tombstone=True), 205.0)
    assert s.expire_tombstones(212.0, ttl=10.0) == ["/b"]
    assert s.expire_tombstones(214.0, ttl=10.0) == []
    assert s.expire_tombstones(215.0, ttl=10.0) == ["/a"]


def test_select_hot_sends_each_change_rumor_sends_times() -> None:
    s = TupleStore(rumor_sends=3)
    for i in range(4):
        s.merge(tup(f"/f{i}", 1), 0.0)
    sent: list[str] = []
    for _ in range(20):
        sent += [t.name for t in s.select_hot(10**6, codec.tuple_size)]
    assert sorted(sent) == sorted([f"/f{i}" for i in range(4)] * 3)
    assert s.hot_count == 0


def test_select_hot_respects_budget() -> None:
    s = TupleStore()
    for i in range(10):
        s.merge(tup(f"/file-{i}", 1), 0.0)
    size = codec.tuple_size(tup("/file-0", 1))
    chosen = s.select_hot(3 * size + size // 2, codec.tuple_size)
    assert len(chosen) == 3


def test_oversized_hot_tuple_does_not_block_the_others() -> None:
    # One tuple whose encoding exceeds the tuple budget must not stop every later change from
    # being gossiped (it can travel by anti-entropy); the others must still be selected.
    s = TupleStore()
    s.merge(tup("/" + "d" * 600, 1), 0.0)
    for i in range(5):
        s.merge(tup(f"/small-{i}", 1), 0.0)
    chosen: set[str] = set()
    for _ in range(5):
        chosen |= {t.name for t in s.select_hot(446, codec.tuple_size)}
    assert {f"/small-{i}" for i in range(5)} <= chosen


def test_oversized_cold_tuple_does_not_stall_the_rotation() -> None:
    s = TupleStore()
    s.merge(tup("/" + "d" * 600, 1), 0.0)
    for i in range(5):
        s.merge(tup(f"/small-{i}", 1), 0.0)
    seen: set[str] = set()
    for _ in range(10):
        seen |= {t.name for t in s.select_cold(300, set(), codec.tuple_size)}
    assert {f"/small-{i}" for i in range(5)} <= seen


def test_select_cold_rotates_over_everything() -> None:
    s = TupleStore()
    for i in range(12):
        s.merge(tup(f"/f{i:02d}", 1), 0.0)
    size = codec.tuple_size(tup("/f00", 1))
    seen: list[str] = []
    for _ in range(4):
        seen += [t.name for t in s.select_cold(3 * size, set(), codec.tuple_size)]
    assert sorted(seen) == sorted(f"/f{i:02d}" for i in range(12))
    skipped = s.select_cold(100 * size, {"/f00"}, codec.tuple_size)
    assert "/f00" not in {t.name for t in skipped}


def test_newest_and_with_holders() -> None:
    a, b = tup("/a", 1), tup("/a", 2)
    assert newest(a, b) == b and newest(b, a) == b
    assert newest(None, a) == a and newest(a, None) == a and newest(None, None) is None
    moved = with_holders(a, (nid(3), nid(2)))
    assert moved.holders == (nid(2), nid(3))
    assert moved.holder_seq == a.holder_seq + 1
    assert moved.version == a.version
    assert moved.order_key > a.order_key


# --- HybridClock -----------------------------------------------------------------------------


@PROPS
@given(st.lists(st.integers(-10, 2**40), min_size=1, max_size=50))
def test_stamp_strictly_increases_and_follows_wall(walls: list[int]) -> None:
    c = HybridClock()
    last = -1
    for wall in walls:
        v = c.stamp(wall)
        assert v > last
        assert v >= max(0, wall) << 16
        last = v


def test_observe_raises_the_clock() -> None:
    c = HybridClock()
    v1 = c.stamp(1000)
    c.observe(v1 + (5 << 16))
    v2 = c.stamp(1000)
    assert v2 > v1 + (5 << 16)
    c.observe(0)  # observing an older clock never lowers it
    assert c.stamp(0) > v2


def test_make_version() -> None:
    c = HybridClock()
    v = make_version(c, 5, nid(7))
    assert v == Version(5 << 16, nid(7))
    assert make_version(c, 5, nid(7)).clock == (5 << 16) + 1


# --- merge algebra (hypothesis) --------------------------------------------------------------

_NAMES = ["/a", "/b", "/c/d", "/e"]


@st.composite
def store_tuples(draw: st.DrawFn) -> TupleEntry:
    """Tuples over a few names; the payload is a function of the version, as it is in the
    protocol (a version names one write), so equal order keys mean equal tuples."""
    name = draw(st.sampled_from(_NAMES))
    clock = draw(st.integers(0, 4))
    writer = draw(st.integers(1, 3))
    holders = tuple(sorted(set(draw(st.lists(st.integers(1, 4), max_size=3)))))
    return TupleEntry(name, Version(clock, nid(writer)), draw(st.integers(0, 2)),
                      clock * 100 + writer, 0o644, clock, bytes([clock, writer]) * 16,
                      tuple(nid(h) for h in holders), draw(st.booleans()))


def _merged(entries: list[TupleEntry]) -> dict[str, TupleEntry]:
    s = TupleStore()
    for t in entries:
        s.merge(t, 0.0)
    return contents(s)


def _expected(entries: list[TupleEntry]) -> dict[str, TupleEntry]:
    out: dict[str, TupleEntry] = {}
    for t in entries:
        if t.name not in out or t.order_key > out[t.name].order_key:
            out[t.name] = t
    return out


@PROPS
@given(st.lists(store_tuples(), max_size=20).flatmap(
    lambda xs: st.tuples(st.just(xs), st.permutations(xs))))
def test_merge_is_commutative(pair: tuple[list[TupleEntry], list[TupleEntry]]) -> None:
    entries, shuffled = pair
    assert _merged(entries) == _merged(list(shuffled)) == _expected(entries)


@PROPS
@given(st.lists(store_tuples(), max_size=20))
def test_merge_is_idempotent(entries: list[TupleEntry]) -> None:
    s = TupleStore()
    for t in entries:
        s.merge(t, 0.0)
    once = contents(s)
    changed = [s.merge(t, 1.0) for t in entries]
    assert contents(s) == once
    assert not any(changed)


@PROPS
@given(st.lists(store_tuples(), max_size=8), st.lists(store_tuples(), max_size=8),
       st.lists(store_tuples(), max_size=8))
def test_merge_is_associative(a: list[TupleEntry], b: list[TupleEntry],
                              c: list[TupleEntry]) -> None:
    # (a then b) then c
    ab = TupleStore()
    for t in a + b:
        ab.merge(t, 0.0)
    left = TupleStore()
    for t in list(ab):
        left.merge(t, 0.0)
    for t in c:
        left.merge(t, 0.0)
    # a then (b then c), the b-c store fed as a snapshot of its contents
    bc = TupleStore()
    for t in b + c:
        bc.merge(t, 0.0)
    right = TupleStore()
    for t in a:
        right.merge(t, 0.0)
    for t in list(bc):
        right.merge(t, 0.0)
    assert contents(left) == contents(right) == _expected(a + b + c)
