"""What nodes say to each other, as plain immutable data (no bytes, no sockets).

The codec turns these into bytes and back; the node state machine consumes and produces them.
Datagram messages (Gossip, Ack, Leave) must fit one UDP datagram; SyncRequest / Snapshot /
Refusal travel over a stream transport (HTTP in the daemon) and may be large. The one-datagram
lookup (LookupRequest / LookupReply) travels as a datagram too; a reply carrying a small object
inline may be larger than a gossip datagram, up to ``codec.LOOKUP_DATAGRAM_MAX``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from .ids import NodeId

Address = tuple[str, int]


class MemberEntry(NamedTuple):
    """One node as gossiped: who, where, and how alive (incarnation, heartbeat)."""

    node_id: NodeId
    host: str
    port: int
    incarnation: int
    heartbeat: int

    @property
    def address(self) -> Address:
        return (self.host, self.port)

    @property
    def liveness(self) -> tuple[int, int]:
        """Ordering key: a higher incarnation wins, then a higher heartbeat."""
        return (self.incarnation, self.heartbeat)


class Beat(NamedTuple):
    """A heartbeat digest for a member the receiver already knows: 7 bytes on the wire
    instead of a 34-byte entry, so a group of 130 fits in one 1,200-byte datagram.

    Only low bits travel: 8 of the incarnation (a beat applies when they match the receiver's
    incarnation of that member; a new incarnation always arrives as a full entry) and 16 of
    the heartbeat, which the receiver unwraps as the nearest value to the one it knows
    (``Member.absorb_digest``): heartbeats rise once a second, and a member silent for more
    than 9 hours (2^15 s) has long been forgotten. At 10 bytes, groups of 100 (N = 10,000)
    overflowed the datagram and the failure detector raised false alarms."""

    prefix: bytes  # first BEAT_PREFIX bytes of the node id
    incarnation: int  # low BEAT_INCARNATION_BITS bits
    heartbeat: int  # low BEAT_HEARTBEAT_BITS bits


BEAT_PREFIX = 4
BEAT_INCARNATION_BITS = 8
BEAT_HEARTBEAT_BITS = 16


class Version(NamedTuple):
    """Write version: hybrid logical clock, then writer id; higher wins everywhere."""

    clock: int
    writer: NodeId


class TupleEntry(NamedTuple):
    """The Kelips tuple of one record name, as kept by every member of its group."""

    name: str
    version: Version
    holder_seq: int  # bumped when repair changes the holders of the same version
    size: int
    mode: int
    mtime_ns: int
    checksum: bytes
    holders: tuple[NodeId, ...]
    tombstone: bool
    #: What the record kind adds to the fixed fields, opaque to the protocol (an inode's
    #: owner, link count and times; a directory entry's child): ``daemon.core.inodes``.
    attrs: bytes = b""

    @property
    def order_key(self) -> tuple[Version, int, tuple[NodeId, ...], bool]:
        """Total order used by merge: version, then holder epoch, then a deterministic tie-break."""
        return (self.version, self.holder_seq, self.holders, self.tombstone)


@dataclass(frozen=True, slots=True)
class Gossip:
    """A bounded gossip datagram: the sender's freshest member entries and file tuples."""

    sender: MemberEntry
    ts_ms: int
    want_ack: bool
    members: tuple[MemberEntry, ...]
    tuples: tuple[TupleEntry, ...]
    #: The sender has heard too little gossip lately: answer with a gossip message of your own.
    pull: bool = False
    #: Heartbeat digests of own-group members.
    beats: tuple[Beat, ...] = ()
    #: The sender's estimate of how far its group's members + tuples are above the average
    #: group's, in sixteenths of an entry (None: no estimate yet). Members of a group average
    #: their estimates through this field (``KelipsNode``'s contact budget).
    load_excess: int | None = None


@dataclass(frozen=True, slots=True)
class Ack:
    """Answer to a Gossip with want_ack: proves the sender alive and measures RTT.

    It also reports the load of the sender's group -- live members (the sender included)
    and file tuples -- so a node can tell how far its own group is above the average and
    keep fewer contacts when it is (``KelipsNode``'s contact budget). 0 members: no report.
    """

    sender: MemberEntry
    echo_ts_ms: int
    group_members: int = 0
    group_tuples: int = 0


@dataclass(frozen=True, slots=True)
class Leave:
    """A node leaving on purpose: its group marks it failed at once instead of after t_fail."""

    sender: MemberEntry


@dataclass(frozen=True, slots=True)
class SyncRequest:
    """Join or anti-entropy: the sender's state (possibly empty) and a request for the reply's."""

    sender: MemberEntry
    members: tuple[MemberEntry, ...]
    tuples: tuple[TupleEntry, ...]
    #: As ``Gossip.load_excess``: a member joining or re-syncing learns its group's estimate.
    load_excess: int | None = None


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Full push-pull answer: the responder's own group, its contacts and (same group) tuples."""

    sender: MemberEntry
    members: tuple[MemberEntry, ...]
    tuples: tuple[TupleEntry, ...]
    #: As ``Gossip.load_excess``: a member joining or re-syncing learns its group's estimate.
    load_excess: int | None = None


@dataclass(frozen=True, slots=True)
class Refusal:
    """A join refused, with a reason a person can act on (wrong k, wrong cluster)."""

    reason: str


@dataclass(frozen=True, slots=True)
class LookupRequest:
    """"Where is ``name``?" in one datagram, to a member of the name's group.

    ``request_id`` is chosen by the asker and echoed by the reply (the asker matches replies to
    waiting lookups by it). With ``want_inline`` the answering node attaches the object's bytes
    when it holds the current version itself and they are small (see LookupReply).
    """

    request_id: int
    name: str
    want_inline: bool
    #: Set by a contact that forwards the request to a holder: the holder answers the asker
    #: at this address directly (one message fewer than a reply and a second request).
    reply_to: Address | None = None


@dataclass(frozen=True, slots=True)
class LookupReply:
    """The answer to a LookupRequest: the same facts as the HTTP /v1/lookup answer.

    ``entry`` is the answering node's tuple of the name (None: not heard of yet; then
    ``candidates`` are the members a write would have chosen), ``holders`` its live holders,
    nearest first. ``inline`` is the content of ``entry``'s version, present only when the
    answering node stores exactly that version and it is at most ``codec.INLINE_MAX`` bytes;
    the asker checks its size and digest against ``entry`` before using it. ``wrong_group``:
    the name is not of the answering node's group (the asker's contact view is stale).
    """

    request_id: int
    entry: TupleEntry | None
    holders: tuple[MemberEntry, ...]
    candidates: tuple[MemberEntry, ...] = ()
    inline: bytes | None = None
    wrong_group: bool = False
    #: Answered by a holder the asked contact forwarded the request to (so it comes from
    #: another address than the one asked).
    forwarded: bool = False


Message = (Gossip | Ack | Leave | SyncRequest | Snapshot | Refusal | LookupRequest
           | LookupReply)
#: Messages that travel as datagrams and change membership state (``KelipsNode.receive``).
DATAGRAM_TYPES = (Gossip, Ack, Leave)
#: The one-datagram lookup: answered (``KelipsNode.answer_lookup_request``) and matched to the
#: waiting lookup by the driver.
LOOKUP_TYPES = (LookupRequest, LookupReply)


@dataclass(frozen=True, slots=True)
class Envelope:
    """A message with the cluster identity every encoded message carries in its header."""

    cluster_tag: bytes
    k: int
    message: Message


class Outgoing(NamedTuple):
    """A message the driver must deliver to an address (datagram or stream by message type)."""

    dest: Address
    message: Message
