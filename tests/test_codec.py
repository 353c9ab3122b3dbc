"""Binary codec: roundtrips, size arithmetic, and DecodeError as the only failure on bad bytes."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.core import codec
from daemon.core.ids import NODE_ID_BYTES, cluster_tag
from daemon.core.messages import (
    BEAT_PREFIX,
    Ack,
    Beat,
    Envelope,
    Gossip,
    Leave,
    LookupReply,
    LookupRequest,
    MemberEntry,
    Message,
    Refusal,
    Snapshot,
    SyncRequest,
    TupleEntry,
    Version,
)

PROPS = settings(max_examples=200, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

TAG = cluster_tag("kelipsfs")
U32 = 2**32 - 1
U64 = 2**64 - 1


def nid(i: int) -> bytes:
    return i.to_bytes(NODE_ID_BYTES, "big")


def member(i: int, inc: int = 1, hb: int = 7) -> MemberEntry:
    return MemberEntry(nid(i), f"10.0.{i // 200}.{i % 200 + 1}", 7000 + i, inc, hb)


def tuple_entry(name: str, clock: int = 1 << 20, holders: int = 3,
                tombstone: bool = False) -> TupleEntry:
    return TupleEntry(name, Version(clock, nid(99)), 2, 12345, 0o644, 1_700_000_000_000_000_000,
                      bytes(range(32)), tuple(nid(i) for i in range(holders)), tombstone)


SENDER = member(1, inc=3, hb=42)

MESSAGES: dict[str, Message] = {
    "gossip-empty": Gossip(SENDER, 0, False, (), ()),
    "gossip-full": Gossip(
        SENDER, U32, True,
        (member(2), member(3, inc=U32, hb=U32)),
        (tuple_entry("/a/b.txt"), tuple_entry("/été/ü.bin", holders=0, tombstone=True)),
        pull=True,
        beats=(Beat(nid(4)[:BEAT_PREFIX], 1, 9), Beat(b"\xff" * BEAT_PREFIX, 0xFF, 0xFFFF)),
        load_excess=-163,
    ),
    "gossip-pull-only": Gossip(SENDER, 123, False, (), (), pull=True),
    "gossip-ack-only": Gossip(SENDER, 456, True, (member(5),), ()),
    "ack": Ack(SENDER, 987654),
    "ack-load": Ack(SENDER, 1, group_members=U32, group_tuples=12345),
    "leave": Leave(SENDER),
    "sync-empty": SyncRequest(SENDER, (), ()),
    "sync": SyncRequest(SENDER, tuple(member(i) for i in range(2, 12)),
                        tuple(tuple_entry(f"/f{i}") for i in range(5))),
    "snapshot": Snapshot(SENDER, (member(2), member(3)), (tuple_entry("/x", clock=U64),)),
    "snapshot-empty": Snapshot(SENDER, (), ()),
    "snapshot-load": Snapshot(SENDER, (member(2),), (), load_excess=-32767),
    "sync-load": SyncRequest(SENDER, (), (), load_excess=160),
    "refusal": Refusal("join refused: this cluster uses k=4 affinity groups"),
    "refusal-empty": Refusal(""),
    "refusal-utf8": Refusal("refusé: k=3 ≠ k=4"),
    "lookup-request": LookupRequest(U64, "/a/b.txt", True),
    "lookup-request-plain": LookupRequest(0, "/été/ü.bin", False),
    "lookup-reply-unknown": LookupReply(7, None, (), (member(2), member(3), member(4))),
    "lookup-reply-tuple": LookupReply(8, tuple_entry("/a/b.txt"), (member(2), member(3))),
    "lookup-reply-inline": LookupReply(U64, tuple_entry("/a/b.txt"), (member(2),), (),
                                       bytes(range(256)) * 4),
    "lookup-reply-inline-empty": LookupReply(1, tuple_entry("/e", holders=1), (), (), b""),
    "lookup-reply-wrong-group": LookupReply(9, None, (), (), None, True),
    "lookup-request-forwarded": LookupRequest(5, "/f", True, ("10.1.2.3", 65535)),
    "lookup-reply-forwarded": LookupReply(5, tuple_entry("/f", holders=1), (member(2),), (),
                                          b"abc", False, True),
}


def env(message: Message, k: int = 4, tag: bytes = TAG) -> Envelope:
    return Envelope(tag, k, message)


@pytest.mark.parametrize("name", sorted(MESSAGES))
def test_roundtrip_every_message_type(name: str) -> None:
    e = env(MESSAGES[name], k=17)
    data = codec.encode(e)
    assert codec.decode(data) == e
    assert codec.decode(bytearray(data)) == e


@pytest.mark.parametrize("name", sorted(MESSAGES))
def test_message_size_matches_encoding(name: str) -> None:
    message = MESSAGES[name]
    assert codec.message_size(message) == len(codec.encode(env(message)))


def test_header_layout() -> None:
    data = codec.encode(env(MESSAGES["ack"], k=300))
    version, code, tag, k = struct.unpack(">BB4sH", data[:8])
    assert (version, code, tag, k) == (codec.PROTOCOL_VERSION, 2, TAG, 300)
    assert len(data) == codec.ACK_SIZE
    assert len(codec.encode(env(MESSAGES["leave"]))) == codec.LEAVE_SIZE


def test_gossip_flags_roundtrip_independently() -> None:
    for want_ack in (False, True):
        for pull in (False, True):
            msg = Gossip(SENDER, 1, want_ack, (), (), pull)
            out = codec.decode(codec.encode(env(msg))).message
            assert isinstance(out, Gossip)
            assert (out.want_ack, out.pull) == (want_ack, pull)


def test_gossip_ts_is_carried_modulo_2_32() -> None:
    msg = Gossip(SENDER, 2**32 + 5, False, (), ())
    out = codec.decode(codec.encode(env(msg))).message
    assert isinstance(out, Gossip)
    assert out.ts_ms == 5


def test_size_helpers_agree_with_encoding() -> None:
    t = tuple_entry("/some/name")
    msg = Gossip(SENDER, 0, False, (member(2),), (t,), beats=(Beat(b"\x00" * BEAT_PREFIX, 1, 1),))
    assert codec.tuple_size(t) == len(codec.encode(env(Gossip(SENDER, 0, False, (), (t,))))) \
        - codec.GOSSIP_OVERHEAD
    assert codec.gossip_size(1, 1, codec.tuple_size(t)) == len(codec.encode(env(msg)))


# --- decode errors ---------------------------------------------------------------------------


def valid(name: str = "gossip-full") -> bytes:
    return codec.encode(env(MESSAGES[name]))


def test_wrong_version_byte() -> None:
    data = bytearray(valid())
    for version in (0, 1, codec.PROTOCOL_VERSION + 1, 255):  # 1: 10-byte digests, refused
        data[0] = version
        with pytest.raises(codec.DecodeError):
            codec.decode(bytes(data))


@pytest.mark.parametrize("code", [0, 9, 10, 200, 255])
def test_unknown_type(code: int) -> None:
    data = bytearray(valid("leave"))
    data[1] = code
    with pytest.raises(codec.DecodeError):
        codec.decode(bytes(data))


@pytest.mark.parametrize("name", sorted(MESSAGES))
def test_every_truncation_is_a_decode_error(name: str) -> None:
    data = valid(name)
    for n in range(len(data)):
        with pytest.raises(codec.DecodeError):
            codec.decode(data[:n])


@pytest.mark.parametrize("name", sorted(MESSAGES))
def test_trailing_bytes(name: str) -> None:
    data = valid(name)
    for extra in (b"\x00", b"\x01\x02\x03", bytes(40)):
        with pytest.raises(codec.DecodeError):
            codec.decode(data + extra)


GOSSIP_FLAGS_OFFSET = codec.HEADER_SIZE + codec.MEMBER_SIZE + 4
SENDER_PORT_OFFSET = codec.HEADER_SIZE + NODE_ID_BYTES + 4


@pytest.mark.parametrize("flags", [8, 0x80, 0xFF])
def test_unknown_gossip_flags(flags: int) -> None:
    data = bytearray(valid("gossip-empty"))
    assert data[GOSSIP_FLAGS_OFFSET] == 0
    data[GOSSIP_FLAGS_OFFSET] = flags
    with pytest.raises(codec.DecodeError):
        codec.decode(bytes(data))


def test_gossip_load_estimate_round_trips_and_needs_its_flag() -> None:
    for load in (None, 0, 1, -1, 32767, -32767):
        msg = Gossip(SENDER, 5, False, (), (), load_excess=load)
        assert codec.decode(codec.encode(env(msg))).message == msg
    data = bytearray(valid("gossip-empty"))
    data[GOSSIP_FLAGS_OFFSET + 2] = 1  # an estimate (the int16 after the flags), flag unset
    with pytest.raises(codec.DecodeError, match="load estimate"):
        codec.decode(bytes(data))
    with pytest.raises(codec.EncodeError):
        codec.encode(env(Gossip(SENDER, 5, False, (), (), load_excess=40000)))


def test_unknown_tuple_flags() -> None:
    msg = Gossip(SENDER, 0, False, (), (tuple_entry("/t", holders=0),))
    data = bytearray(codec.encode(env(msg)))
    # the tuple's flag byte sits right before its checksum length and checksum
    flag_at = len(data) - 1 - 32 - 1 - 1
    assert data[flag_at] == 0
    data[flag_at] = 4
    with pytest.raises(codec.DecodeError, match="unknown tuple flags"):
        codec.decode(bytes(data))


def test_tuple_attrs_roundtrip_and_limits() -> None:
    plain = tuple_entry("i/00000000000000ab", holders=2)
    rich = plain._replace(attrs=bytes(range(200)))
    for t in (plain, rich):
        msg = Gossip(SENDER, 0, False, (), (t,))
        data = codec.encode(env(msg))
        assert codec.decode(data).message == msg
        assert len(data) == codec.message_size(msg)
    assert codec.tuple_size(rich) == codec.tuple_size(plain) + 201
    with pytest.raises(codec.EncodeError):
        codec.encode(env(Gossip(SENDER, 0, False, (), (plain._replace(attrs=b"x" * 256),))))


@pytest.mark.parametrize("name", ["gossip-empty", "ack", "leave", "sync-empty", "snapshot"])
def test_sender_port_zero(name: str) -> None:
    data = bytearray(valid(name))
    data[SENDER_PORT_OFFSET:SENDER_PORT_OFFSET + 2] = b"\x00\x00"
    with pytest.raises(codec.DecodeError):
        codec.decode(bytes(data))


def test_member_entry_port_zero() -> None:
    msg = Gossip(SENDER, 0, False, (member(2)._replace(port=0),), ())
    with pytest.raises(codec.EncodeError):
        codec.encode(env(msg))
    data = bytearray(codec.encode(env(Gossip(SENDER, 0, False, (), ()))))
    port_at = codec.HEADER_SIZE + 20 + 4  # the sender entry's port, after its id and IPv4
    data[port_at:port_at + 2] = b"\x00\x00"
    with pytest.raises(codec.DecodeError):
        codec.decode(bytes(data))


@pytest.mark.parametrize("name", sorted(MESSAGES))
def test_k_zero(name: str) -> None:
    data = bytearray(valid(name))
    data[6:8] = b"\x00\x00"
    with pytest.raises(codec.DecodeError):
        codec.decode(bytes(data))


def test_bad_tuple_names() -> None:
    for bad in ("", "a\x00b"):
        msg = Gossip(SENDER, 0, False, (), (tuple_entry("/ok")._replace(name=bad),))
        with pytest.raises(codec.EncodeError):
            codec.encode(env(msg))
    # The same names arriving from a peer that encodes them anyway are refused on decode.
    data = bytearray(codec.encode(env(Gossip(SENDER, 0, False, (), (tuple_entry("/ab"),)))))
    at = codec.GOSSIP_OVERHEAD + 2
    data[at + 1] = 0
    with pytest.raises(codec.DecodeError):
        codec.decode(bytes(data))
    empty = bytearray(data[:at - 2]) + b"\x00\x00" + data[at + 3:]
    with pytest.raises(codec.DecodeError):
        codec.decode(bytes(empty))


def test_invalid_utf8_name() -> None:
    data = bytearray(codec.encode(env(Gossip(SENDER, 0, False, (), (tuple_entry("/ab"),)))))
    at = codec.GOSSIP_OVERHEAD + 2  # after the tuples count comes the name length, then the name
    assert bytes(data[at:at + 3]) == b"/ab"
    data[at + 1] = 0xFF
    with pytest.raises(codec.DecodeError):
        codec.decode(bytes(data))


def test_huge_counts_are_rejected_cheaply() -> None:
    data = bytearray(valid("sync-empty"))
    members_count_at = codec.HEADER_SIZE + codec.MEMBER_SIZE
    data[members_count_at:members_count_at + 4] = b"\xff\xff\xff\xff"
    with pytest.raises(codec.DecodeError):
        codec.decode(bytes(data))


def test_refusal_reason_too_long_on_the_wire() -> None:
    data = codec.encode(env(Refusal("")))[:-2] + struct.pack(">H", 2000) + b"x" * 2000
    with pytest.raises(codec.DecodeError):
        codec.decode(data)


def test_long_refusal_is_truncated_to_a_decodable_prefix() -> None:
    reason = "a" * 1023 + "é" + "b" * 500  # the 1,024-byte cut falls inside "é"
    data = codec.encode(env(Refusal(reason)))
    out = codec.decode(data).message
    assert isinstance(out, Refusal)
    assert reason.startswith(out.reason)
    assert len(out.reason.encode("utf-8")) <= codec.MAX_REASON_BYTES


def test_message_size_of_long_refusal_matches_encoding() -> None:
    message = Refusal("x" * 3000)
    assert codec.message_size(message) == len(codec.encode(env(message)))


# --- encode errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "envelope",
    [
        Envelope(b"abc", 1, Leave(SENDER)),
        Envelope(TAG, 0x10000, Leave(SENDER)),
        Envelope(TAG, 1, Leave(SENDER._replace(node_id=b"short"))),
        Envelope(TAG, 1, Leave(SENDER._replace(host="not-an-ip"))),
        Envelope(TAG, 1, Leave(SENDER._replace(port=70000))),
        Envelope(TAG, 1, Leave(SENDER._replace(heartbeat=2**32))),
        Envelope(TAG, 1, Gossip(SENDER, 0, False, (), (tuple_entry("x" * 5000),))),
        Envelope(TAG, 1, Gossip(SENDER, 0, False, (), (tuple_entry("/x", holders=65),))),
        Envelope(TAG, 1, "not a message"),  # type: ignore[arg-type]
    ],
)
def test_encode_errors(envelope: Envelope) -> None:
    with pytest.raises(codec.EncodeError):
        codec.encode(envelope)


# --- properties ------------------------------------------------------------------------------

ids = st.binary(min_size=NODE_ID_BYTES, max_size=NODE_ID_BYTES)
u32 = st.integers(min_value=0, max_value=U32)
u64 = st.integers(min_value=0, max_value=U64)
hosts = st.tuples(*[st.integers(0, 255)] * 4).map(lambda p: ".".join(map(str, p)))
member_entries = st.builds(MemberEntry, ids, hosts, st.integers(1, 65535), u32, u32)
object_names = st.text(
    st.characters(exclude_categories=("Cs",), exclude_characters="\x00"),
    min_size=1, max_size=100)
tuple_entries = st.builds(
    TupleEntry,
    object_names,
    st.builds(Version, u64, ids),
    u32,
    u64,
    u32,
    u64,
    st.binary(min_size=32, max_size=32),
    st.lists(ids, max_size=5).map(tuple),
    st.booleans(),
    st.binary(max_size=255),
)
beats = st.builds(Beat, st.binary(min_size=BEAT_PREFIX, max_size=BEAT_PREFIX),
                  st.integers(0, 0xFF), st.integers(0, 0xFFFF))


def _tuples_of(strategy: st.SearchStrategy, n: int) -> st.SearchStrategy:
    return st.lists(strategy, max_size=n).map(tuple)


gossips = st.builds(Gossip, member_entries, u32, st.booleans(), _tuples_of(member_entries, 8),
                    _tuples_of(tuple_entries, 4), st.booleans(), _tuples_of(beats, 8))
messages = st.one_of(
    gossips,
    st.builds(Ack, member_entries, u32),
    st.builds(Leave, member_entries),
    st.builds(SyncRequest, member_entries, _tuples_of(member_entries, 8),
              _tuples_of(tuple_entries, 4)),
    st.builds(Snapshot, member_entries, _tuples_of(member_entries, 8),
              _tuples_of(tuple_entries, 4)),
    st.builds(Refusal, st.text(st.characters(exclude_categories=("Cs",)), max_size=300)),
)
envelopes = st.builds(Envelope, st.binary(min_size=4, max_size=4), st.integers(1, 65535),
                      messages)


def _decode_or_decode_error(data: bytes) -> None:
    try:
        out = codec.decode(data)
    except codec.DecodeError:
        return
    assert isinstance(out, Envelope)
    # whatever decodes must be re-encodable to the same bytes (no lossy acceptance)
    assert codec.encode(out) == data


@PROPS
@given(st.binary(max_size=2000))
def test_random_bytes_only_raise_decode_error(data: bytes) -> None:
    _decode_or_decode_error(data)


@PROPS
@given(code=st.integers(0, 7), k=st.integers(0, 3), body=st.binary(max_size=2000))
def test_random_bodies_behind_a_valid_header_only_raise_decode_error(
        code: int, k: int, body: bytes) -> None:
    _decode_or_decode_error(struct.pack(">BB4sH", codec.PROTOCOL_VERSION, code, TAG, k) + body)


@PROPS
@given(message=gossips, data=st.data())
def test_mutated_gossip_only_raises_decode_error(message: Gossip, data: st.DataObject) -> None:
    buf = bytearray(codec.encode(env(message)))
    ops = data.draw(st.lists(st.tuples(st.sampled_from(["flip", "insert", "delete"]),
                                       st.integers(0, 10**6), st.integers(0, 255)),
                             min_size=1, max_size=6))
    for op, where, value in ops:
        if op == "insert":
            buf.insert(where % (len(buf) + 1), value)
        elif not buf:
            continue
        elif op == "flip":
            buf[where % len(buf)] ^= 1 << (value % 8)
        else:
            del buf[where % len(buf)]
    _decode_or_decode_error(bytes(buf))


@PROPS
@given(envelopes)
def test_generated_messages_roundtrip(envelope: Envelope) -> None:
    data = codec.encode(envelope)
    assert codec.decode(data) == envelope
    assert codec.message_size(envelope.message) == len(data)


# --- the one-datagram lookup -----------------------------------------------------------------

LOOKUP_FLAGS_OFFSET = codec.HEADER_SIZE + 8


def test_lookup_header_and_type_codes() -> None:
    request = codec.encode(env(MESSAGES["lookup-request"]))
    reply = codec.encode(env(MESSAGES["lookup-reply-inline"]))
    assert request[1] == 7 and reply[1] == codec.LOOKUP_REPLY_CODE == 8
    assert struct.unpack(">Q", request[codec.HEADER_SIZE:codec.HEADER_SIZE + 8]) == (U64,)
    assert request[LOOKUP_FLAGS_OFFSET] == 1 and reply[LOOKUP_FLAGS_OFFSET] == 3


def test_largest_lookup_reply_fits_the_lookup_datagram() -> None:
    """An inline reply at the limits (8 KiB content, a long name, many holders) fits."""
    big = LookupReply(U64, tuple_entry("/" + "n" * 1000, holders=16),
                      tuple(member(i) for i in range(16)), (), b"\xab" * codec.INLINE_MAX)
    size = len(codec.encode(env(big)))
    assert size == codec.message_size(big)
    assert size + codec.HEADER_SIZE < codec.LOOKUP_DATAGRAM_MAX - 48
    assert codec.decode(codec.encode(env(big))).message == big


@pytest.mark.parametrize("flags", [2, 0x10, 0x20, 0x80])
def test_lookup_reply_bad_flags(flags: int) -> None:
    """Unknown bits, and inline bytes without a tuple, are decode errors."""
    data = bytearray(valid("lookup-reply-unknown"))
    assert data[LOOKUP_FLAGS_OFFSET] == 0
    data[LOOKUP_FLAGS_OFFSET] = flags
    with pytest.raises(codec.DecodeError):
        codec.decode(bytes(data))


@pytest.mark.parametrize("flags", [4, 0x80, 0xFF])
def test_lookup_request_bad_flags(flags: int) -> None:
    data = bytearray(valid("lookup-request"))
    data[LOOKUP_FLAGS_OFFSET] = flags
    with pytest.raises(codec.DecodeError):
        codec.decode(bytes(data))


def test_lookup_request_reply_to_port_zero() -> None:
    data = bytearray(valid("lookup-request-forwarded"))
    data[-2:] = b"\x00\x00"
    with pytest.raises(codec.DecodeError):
        codec.decode(bytes(data))
    with pytest.raises(codec.EncodeError):
        codec.encode(env(LookupRequest(1, "/x", True, ("10.0.0.1", 0))))


def test_lookup_request_bad_names() -> None:
    good = valid("lookup-request")
    name_at = LOOKUP_FLAGS_OFFSET + 1
    empty = good[:name_at] + b"\x00\x00"
    nul = good[:name_at] + b"\x00\x02a\x00"
    too_long = good[:name_at] + struct.pack(">H", codec.MAX_NAME_BYTES + 1) \
        + b"a" * (codec.MAX_NAME_BYTES + 1)
    bad_utf8 = good[:name_at] + b"\x00\x02\xff\xfe"
    for data in (empty, nul, too_long, bad_utf8):
        with pytest.raises(codec.DecodeError):
            codec.decode(data)
    for name in ("", "a\x00b", "x" * (codec.MAX_NAME_BYTES + 1)):
        with pytest.raises(codec.EncodeError):
            codec.encode(env(LookupRequest(1, name, False)))


def test_lookup_reply_inline_over_the_limit() -> None:
    reply = LookupReply(1, tuple_entry("/big"), (), (), b"x" * 10)
    data = bytearray(codec.encode(env(reply)))
    length_at = len(data) - 10 - 4
    assert struct.unpack(">I", data[length_at:length_at + 4]) == (10,)
    over = bytes(data[:length_at]) + struct.pack(">I", codec.INLINE_MAX + 1) \
        + b"x" * (codec.INLINE_MAX + 1)
    with pytest.raises(codec.DecodeError):
        codec.decode(over)
    with pytest.raises(codec.EncodeError):
        codec.encode(env(LookupReply(1, tuple_entry("/big"), (), (),
                                     b"x" * (codec.INLINE_MAX + 1))))
    with pytest.raises(codec.EncodeError):  # bytes without the tuple they are the content of
        codec.encode(env(LookupReply(1, None, (), (), b"x")))


def test_lookup_reply_too_many_members() -> None:
    many = tuple(member(i) for i in range(codec.MAX_LOOKUP_MEMBERS + 1))
    with pytest.raises(codec.EncodeError):
        codec.encode(env(LookupReply(1, None, many, ())))
    with pytest.raises(codec.EncodeError):
        codec.encode(env(LookupReply(1, None, (), many)))
    # hand-built: a count over the limit is refused by the decoder as well
    head = codec.encode(env(LookupReply(1, None, (), ())))[:LOOKUP_FLAGS_OFFSET + 1]
    body = struct.pack(">H", len(many)) + b"".join(
        struct.pack(f">{NODE_ID_BYTES}s4sHII", m.node_id, bytes([10, 0, 0, 1]), m.port, 1, 1)
        for m in many) + struct.pack(">H", 0)
    with pytest.raises(codec.DecodeError):
        codec.decode(head + body)
    ok = head + struct.pack(">H", 0) + struct.pack(">H", 0)
    assert codec.decode(ok).message == LookupReply(1, None, (), ())


@given(st.binary(max_size=300))
@PROPS
def test_random_bytes_after_a_lookup_header_only_raise_decode_error(tail: bytes) -> None:
    for code in (7, 8):
        data = struct.pack(">BB4sH", codec.PROTOCOL_VERSION, code, TAG, 4) + tail
        with contextlib.suppress(codec.DecodeError):
            codec.decode(data)
