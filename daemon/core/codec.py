"""Binary encoding of messages, with a version byte and one error type for any bad input.

Layout (big-endian): version u8 | type u8 | cluster tag 4s | k u16 | body. Decoding parses the
whole buffer into immutable objects before anything is returned, so a malformed message can
never be half-applied; every failure, whatever its cause, is a DecodeError. Sizes are also
computed arithmetically (``*_size``) so the gossip builder and the simulator can bound and count
bytes without encoding; tests keep the two in agreement.

The one-datagram lookup (types 7 and 8):
LookupRequest body: request id u64 | flags u8 (1: want inline, 2: reply-to) | name (u16 length,
UTF-8) | [reply-to: IPv4 4s, port u16].
LookupReply body: request id u64 | flags u8 (1: tuple, 2: inline, 4: wrong group, 8: forwarded)
| [tuple] | holders (u16 count, member entries) | candidates (same) | [inline: u32 length,
bytes].

Why a reply may exceed ``max_datagram``: gossip is kept to 1,200 bytes so it never fragments on
any path, but a lookup reply that carries a small object saves a whole second exchange (and an
HTTP one at that). Its size is capped at ``LOOKUP_DATAGRAM_MAX`` (16 KiB with the MAC trailer,
room for ``INLINE_MAX`` = 8 KiB of content plus the tuple and holder entries, as Kademlia's
datagrams carry values of a few KiB): on loopback (64 KiB MTU) it is one packet, on a LAN it is
a handful of IP fragments, and a lost fragment only costs the asker its timeout and a fallback
to the HTTP path. Larger objects are never inlined; a reply that would not fit is sent without
its inline bytes.
"""

from __future__ import annotations

import socket
import struct

from .ids import NODE_ID_BYTES
from .messages import (
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

#: 2: 7-byte heartbeat digests; 3: acks report their group's load; 4: tuples carry attrs
PROTOCOL_VERSION = 4
MAX_NAME_BYTES = 4096
MAX_CHECKSUM_BYTES = 64
MAX_ATTRS_BYTES = 255
MAX_HOLDERS = 64
MAX_REASON_BYTES = 1024
#: Largest object a LookupReply carries inline (bytes of content).
INLINE_MAX = 8192
#: Largest lookup datagram, MAC trailer included (see the module doc).
LOOKUP_DATAGRAM_MAX = 16384
#: Holder and candidate entries one LookupReply may carry.
MAX_LOOKUP_MEMBERS = 64

_HEADER = struct.Struct(">BB4sH")
_MEMBER = struct.Struct(f">{NODE_ID_BYTES}s4sHII")
_TUPLE_FIXED = struct.Struct(f">Q{NODE_ID_BYTES}sIQIQB")
_U8 = struct.Struct(">B")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_LOAD = struct.Struct(">Bh")  # a bulk message's load estimate: present (0/1), sixteenths
_GOSSIP_FIXED = struct.Struct(">IBh")
_BEAT = struct.Struct(f">{BEAT_PREFIX}sBH")
_LOOKUP_FIXED = struct.Struct(">QB")

HEADER_SIZE = _HEADER.size
MEMBER_SIZE = _MEMBER.size
TUPLE_FIXED_SIZE = 2 + _TUPLE_FIXED.size + 1 + 1  # name length, fixed part, checksum len, holders
BEAT_SIZE = _BEAT.size
GOSSIP_OVERHEAD = HEADER_SIZE + MEMBER_SIZE + _GOSSIP_FIXED.size + 2 + 2 + 2
ACK_SIZE = HEADER_SIZE + MEMBER_SIZE + 4 + 4 + 4
LEAVE_SIZE = HEADER_SIZE + MEMBER_SIZE
LOOKUP_REQUEST_OVERHEAD = HEADER_SIZE + _LOOKUP_FIXED.size + 2
LOOKUP_REPLY_OVERHEAD = HEADER_SIZE + _LOOKUP_FIXED.size + 2 + 2

_TYPE_CODES: dict[type, int] = {Gossip: 1, Ack: 2, Leave: 3, SyncRequest: 4, Snapshot: 5,
                                Refusal: 6, LookupRequest: 7, LookupReply: 8}
#: Type byte of a LookupReply (second byte of every encoded message): lets the driver admit
#: datagrams above max_datagram for this type only, before it spends a MAC check on them.
LOOKUP_REPLY_CODE = 8
_U32_MAX = 0xFFFFFFFF
_U64_MAX = 0xFFFFFFFFFFFFFFFF


class DecodeError(ValueError):
    """The bytes are not a well-formed message of a protocol version this node speaks."""


class EncodeError(ValueError):
    """A message cannot be encoded (a field out of its wire range)."""


def _reason_bytes(reason: str) -> bytes:
    """The reason as sent: capped at MAX_REASON_BYTES without splitting a character."""
    raw = reason.encode("utf-8")
    if len(raw) <= MAX_REASON_BYTES:
        return raw
    return raw[:MAX_REASON_BYTES].decode("utf-8", "ignore").encode("utf-8")


def tuple_size(entry: TupleEntry) -> int:
    """Encoded size of one file tuple."""
    return (TUPLE_FIXED_SIZE + len(entry.name.encode("utf-8")) + len(entry.checksum)
            + NODE_ID_BYTES * len(entry.holders) + (1 + len(entry.attrs) if entry.attrs else 0))


def gossip_size(n_members: int, n_beats: int, tuples_bytes: int) -> int:
    """Encoded size of a Gossip with these many entries and beats and tuples of that size."""
    return GOSSIP_OVERHEAD + MEMBER_SIZE * n_members + BEAT_SIZE * n_beats + tuples_bytes


def message_size(message: Message) -> int:
    """Encoded size of any message, without encoding it."""
    if isinstance(message, Gossip):
        return gossip_size(len(message.members), len(message.beats),
                           sum(map(tuple_size, message.tuples)))
    if isinstance(message, Ack):
        return ACK_SIZE
    if isinstance(message, Leave):
        return LEAVE_SIZE
    if isinstance(message, (SyncRequest, Snapshot)):
        return (HEADER_SIZE + MEMBER_SIZE + 8 + _LOAD.size + MEMBER_SIZE * len(message.members)
                + sum(map(tuple_size, message.tuples)))
    if isinstance(message, LookupRequest):
        return (LOOKUP_REQUEST_OVERHEAD + len(message.name.encode("utf-8"))
                + (6 if message.reply_to is not None else 0))
    if isinstance(message, LookupReply):
        return (LOOKUP_REPLY_OVERHEAD
                + (tuple_size(message.entry) if message.entry is not None else 0)
                + MEMBER_SIZE * (len(message.holders) + len(message.candidates))
                + (4 + len(message.inline) if message.inline is not None else 0))
    return HEADER_SIZE + 2 + len(_reason_bytes(message.reason))


# --- encoding ---------------------------------------------------------------------------------

def encode(envelope: Envelope) -> bytes:
    """Encode an envelope; raises EncodeError for a field outside its wire range."""
    message = envelope.message
    code = _TYPE_CODES.get(type(message))
    if code is None:
        raise EncodeError(f"not a message: {message!r}")
    try:
        parts = [_HEADER.pack(PROTOCOL_VERSION, code, envelope.cluster_tag, envelope.k)]
        if len(envelope.cluster_tag) != 4:
            raise EncodeError("cluster tag must be 4 bytes")
        if isinstance(message, Gossip):
            parts.append(_member(message.sender))
            load = message.load_excess
            flags = ((1 if message.want_ack else 0) | (2 if message.pull else 0)
                     | (4 if load is not None else 0))
            parts.append(_GOSSIP_FIXED.pack(message.ts_ms & _U32_MAX, flags,
                                            0 if load is None else load))
            _members(parts, message.members)
            parts.append(_U16.pack(len(message.beats)))
            if any(len(b.prefix) != BEAT_PREFIX for b in message.beats):
                raise EncodeError(f"a beat prefix is {BEAT_PREFIX} bytes")
            parts.extend(_BEAT.pack(b.prefix, b.incarnation, b.heartbeat) for b in message.beats)
            _tuples(parts, message.tuples)
        elif isinstance(message, Ack):
            parts.append(_member(message.sender))
            parts.append(_U32.pack(message.echo_ts_ms & _U32_MAX))
            parts.append(_U32.pack(message.group_members))
            parts.append(_U32.pack(message.group_tuples))
        elif isinstance(message, Leave):
            parts.append(_member(message.sender))
        elif isinstance(message, (SyncRequest, Snapshot)):
            parts.append(_member(message.sender))
            _members(parts, message.members, wide=True)
            _tuples(parts, message.tuples, wide=True)
            load = message.load_excess
            parts.append(_LOAD.pack(0 if load is None else 1, 0 if load is None else load))
        elif isinstance(message, LookupRequest):
            flags = (1 if message.want_inline else 0) | (2 if message.reply_to else 0)
            parts.append(_LOOKUP_FIXED.pack(message.request_id, flags))
            parts.append(_name(message.name))
            if message.reply_to is not None:
                host, port = message.reply_to
                if port == 0:
                    raise EncodeError("port 0 is not an address")
                parts.append(socket.inet_aton(host) + _U16.pack(port))
        elif isinstance(message, LookupReply):
            _lookup_reply(parts, message)
        else:
            reason = _reason_bytes(message.reason)
            parts.append(_U16.pack(len(reason)))
            parts.append(reason)
    except (struct.error, OSError, UnicodeError, TypeError) as exc:
        raise EncodeError(str(exc)) from exc
    return b"".join(parts)


def _member(entry: MemberEntry) -> bytes:
    if len(entry.node_id) != NODE_ID_BYTES:
        raise EncodeError("node id must be 20 bytes")
    if entry.port == 0:
        raise EncodeError("port 0 is not an address")
    return _MEMBER.pack(entry.node_id, socket.inet_aton(entry.host), entry.port,
                        entry.incarnation, entry.heartbeat)


def _members(parts: list[bytes], entries: tuple[MemberEntry, ...], wide: bool = False) -> None:
    parts.append(_U32.pack(len(entries)) if wide else _U16.pack(len(entries)))
    parts.extend(_member(e) for e in entries)


def _tuples(parts: list[bytes], entries: tuple[TupleEntry, ...], wide: bool = False) -> None:
    parts.append(_U32.pack(len(entries)) if wide else _U16.pack(len(entries)))
    for t in entries:
        _tuple(parts, t)


def _name(name: str) -> bytes:
    raw = name.encode("utf-8")
    if not raw or "\x00" in name:
        raise EncodeError("an object name is non-empty and has no NUL")
    if len(raw) > MAX_NAME_BYTES:
        raise EncodeError(f"name {name[:40]!r}... exceeds {MAX_NAME_BYTES} bytes")
    return _U16.pack(len(raw)) + raw


def _tuple(parts: list[bytes], t: TupleEntry) -> None:
    if (len(t.checksum) > MAX_CHECKSUM_BYTES or len(t.holders) > MAX_HOLDERS
            or len(t.attrs) > MAX_ATTRS_BYTES):
        raise EncodeError(f"tuple {t.name!r} exceeds a wire limit")
    ids = (*t.holders, t.version.writer)
    if any(len(h) != NODE_ID_BYTES for h in ids):
        raise EncodeError("node id must be 20 bytes")
    parts.append(_name(t.name))
    parts.append(_TUPLE_FIXED.pack(t.version.clock, t.version.writer, t.holder_seq, t.size,
                                   t.mode, t.mtime_ns,
                                   (1 if t.tombstone else 0) | (2 if t.attrs else 0)))
    parts.append(_U8.pack(len(t.checksum)))
    parts.append(t.checksum)
    parts.append(_U8.pack(len(t.holders)))
    parts.extend(t.holders)
    if t.attrs:
        parts.append(_U8.pack(len(t.attrs)))
        parts.append(bytes(t.attrs))


def _lookup_reply(parts: list[bytes], message: LookupReply) -> None:
    if len(message.holders) > MAX_LOOKUP_MEMBERS or len(message.candidates) > MAX_LOOKUP_MEMBERS:
        raise EncodeError(f"a lookup reply carries at most {MAX_LOOKUP_MEMBERS} holders and "
                          f"as many candidates")
    if message.inline is not None and (message.entry is None
                                       or len(message.inline) > INLINE_MAX):
        raise EncodeError(f"inline bytes need a tuple and are at most {INLINE_MAX}")
    flags = ((1 if message.entry is not None else 0) | (2 if message.inline is not None else 0)
             | (4 if message.wrong_group else 0) | (8 if message.forwarded else 0))
    parts.append(_LOOKUP_FIXED.pack(message.request_id, flags))
    if message.entry is not None:
        _tuple(parts, message.entry)
    _members(parts, message.holders)
    _members(parts, message.candidates)
    if message.inline is not None:
        parts.append(_U32.pack(len(message.inline)))
        parts.append(bytes(message.inline))


# --- decoding ---------------------------------------------------------------------------------

class _Reader:
    """A cursor over a buffer whose every read either succeeds completely or raises DecodeError."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if n < 0 or end > len(self.data):
            raise DecodeError("message truncated")
        chunk = self.data[self.pos:end]
        self.pos = end
        return chunk

    def unpack(self, fmt: struct.Struct) -> tuple:  # type: ignore[type-arg]
        return fmt.unpack(self.take(fmt.size))

    def count(self, wide: bool, item_size: int) -> int:
        (n,) = self.unpack(_U32 if wide else _U16)
        if n * item_size > len(self.data) - self.pos:
            raise DecodeError("count exceeds message length")
        return int(n)


def decode(data: bytes) -> Envelope:
    """Decode one whole message; any problem at all raises DecodeError and nothing else."""
    try:
        return _decode(bytes(data))
    except DecodeError:
        raise
    except (struct.error, ValueError, OSError, UnicodeError, IndexError, TypeError) as exc:
        raise DecodeError(f"malformed message: {exc}") from exc


def _decode(data: bytes) -> Envelope:
    reader = _Reader(data)
    version, code, tag, k = reader.unpack(_HEADER)
    if version != PROTOCOL_VERSION:
        raise DecodeError(f"unsupported protocol version {version}")
    if k == 0:
        raise DecodeError("k must be at least 1")
    message: Message
    if code == 1:
        sender = _read_member(reader)
        ts_ms, flags, load = reader.unpack(_GOSSIP_FIXED)
        if flags & ~7:
            raise DecodeError("unknown gossip flags")
        if load and not flags & 4:
            raise DecodeError("a load estimate without its flag")
        members = _read_members(reader, wide=False)
        n_beats = reader.count(False, BEAT_SIZE)
        beats = tuple(Beat(*reader.unpack(_BEAT)) for _ in range(n_beats))
        tuples = _read_tuples(reader, wide=False)
        message = Gossip(sender, ts_ms, bool(flags & 1), members, tuples, bool(flags & 2), beats,
                         load if flags & 4 else None)
    elif code == 2:
        sender = _read_member(reader)
        (echo,) = reader.unpack(_U32)
        (group_members,) = reader.unpack(_U32)
        (group_tuples,) = reader.unpack(_U32)
        message = Ack(sender, echo, group_members, group_tuples)
    elif code == 3:
        message = Leave(_read_member(reader))
    elif code in (4, 5):
        sender = _read_member(reader)
        members = _read_members(reader, wide=True)
        tuples = _read_tuples(reader, wide=True)
        present, load = reader.unpack(_LOAD)
        if present > 1 or (load and not present):
            raise DecodeError("bad load estimate")
        message = (SyncRequest if code == 4 else Snapshot)(sender, members, tuples,
                                                           load if present else None)
    elif code == 6:
        (n,) = reader.unpack(_U16)
        if n > MAX_REASON_BYTES:
            raise DecodeError("reason too long")
        message = Refusal(reader.take(n).decode("utf-8"))
    elif code == 7:
        request_id, flags = reader.unpack(_LOOKUP_FIXED)
        if flags & ~3:
            raise DecodeError("unknown lookup request flags")
        name = _read_name(reader)
        reply_to = None
        if flags & 2:
            raw_ip, port = socket.inet_ntoa(reader.take(4)), reader.unpack(_U16)[0]
            if port == 0:
                raise DecodeError("port 0 is not an address")
            reply_to = (raw_ip, port)
        message = LookupRequest(request_id, name, bool(flags & 1), reply_to)
    elif code == 8:
        message = _read_lookup_reply(reader)
    else:
        raise DecodeError(f"unknown message type {code}")
    if reader.pos != len(data):
        raise DecodeError("trailing bytes after message")
    return Envelope(tag, k, message)


def _read_member(reader: _Reader) -> MemberEntry:
    node_id, raw_ip, port, incarnation, heartbeat = reader.unpack(_MEMBER)
    if port == 0:
        raise DecodeError("port 0 is not an address")
    return MemberEntry(node_id, socket.inet_ntoa(raw_ip), port, incarnation, heartbeat)


def _read_members(reader: _Reader, wide: bool) -> tuple[MemberEntry, ...]:
    n = reader.count(wide, MEMBER_SIZE)
    return tuple(_read_member(reader) for _ in range(n))


def _read_tuples(reader: _Reader, wide: bool) -> tuple[TupleEntry, ...]:
    n = reader.count(wide, TUPLE_FIXED_SIZE)
    return tuple(_read_tuple(reader) for _ in range(n))


def _read_name(reader: _Reader) -> str:
    (name_len,) = reader.unpack(_U16)
    if name_len == 0 or name_len > MAX_NAME_BYTES:
        raise DecodeError("bad object name length")
    name = reader.take(name_len).decode("utf-8")
    if "\x00" in name:
        raise DecodeError("object name contains NUL")
    return name


def _read_tuple(reader: _Reader) -> TupleEntry:
    name = _read_name(reader)
    clock, writer, holder_seq, size, mode, mtime_ns, flags = reader.unpack(_TUPLE_FIXED)
    if flags & ~3:
        raise DecodeError("unknown tuple flags")
    (cs_len,) = reader.unpack(_U8)
    if cs_len > MAX_CHECKSUM_BYTES:
        raise DecodeError("checksum too long")
    checksum = reader.take(cs_len)
    (n_holders,) = reader.unpack(_U8)
    if n_holders > MAX_HOLDERS:
        raise DecodeError("too many holders")
    holders = tuple(reader.take(NODE_ID_BYTES) for _ in range(n_holders))
    attrs = b""
    if flags & 2:
        (n_attrs,) = reader.unpack(_U8)
        if n_attrs == 0:
            raise DecodeError("empty attrs announced")
        attrs = reader.take(n_attrs)
    return TupleEntry(name, Version(clock, writer), holder_seq, size, mode, mtime_ns,
                      checksum, holders, bool(flags & 1), attrs)


def _read_lookup_reply(reader: _Reader) -> LookupReply:
    request_id, flags = reader.unpack(_LOOKUP_FIXED)
    if flags & ~15:
        raise DecodeError("unknown lookup reply flags")
    if flags & 2 and not flags & 1:
        raise DecodeError("inline bytes without a tuple")
    entry = _read_tuple(reader) if flags & 1 else None
    holders = _read_members(reader, wide=False)
    candidates = _read_members(reader, wide=False)
    if len(holders) > MAX_LOOKUP_MEMBERS or len(candidates) > MAX_LOOKUP_MEMBERS:
        raise DecodeError("too many holders or candidates")
    inline = None
    if flags & 2:
        (n,) = reader.unpack(_U32)
        if n > INLINE_MAX:
            raise DecodeError(f"inline content over {INLINE_MAX} bytes")
        inline = reader.take(n)
    return LookupReply(request_id, entry, holders, candidates, inline, bool(flags & 4),
                       bool(flags & 8))
