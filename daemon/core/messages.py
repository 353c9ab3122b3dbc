"""What nodes say to each other, as plain immutable data (no bytes, no sockets).

The codec turns these into bytes and back; the node state machine consumes and produces them.
Datagram messages (Gossip, Ack, Leave) must fit one UDP datagram; SyncRequest / Snapshot /
Refusal travel over a stream transport (HTTP in the daemon) and may be large.
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
    """A heartbeat digest for a member the receiver already knows: 10 bytes on the wire
    instead of a 34-byte entry, so a 100-member group fits in one datagram.

    The incarnation travels as its low 16 bits only: a beat applies when they match the
    receiver's incarnation of that member (a new incarnation always arrives as a full entry)."""

    prefix: bytes  # first BEAT_PREFIX bytes of the node id
    incarnation: int  # low 16 bits
    heartbeat: int


BEAT_PREFIX = 4


class Version(NamedTuple):
    """Write version: hybrid logical clock, then writer id; higher wins everywhere."""

    clock: int
    writer: NodeId


class TupleEntry(NamedTuple):
    """The Kelips file tuple of one object name, as kept by every member of its group."""

    name: str
    version: Version
    holder_seq: int  # bumped when repair changes the holders of the same version
    size: int
    mode: int
    mtime_ns: int
    checksum: bytes
    holders: tuple[NodeId, ...]
    tombstone: bool

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


@dataclass(frozen=True, slots=True)
class Ack:
    """Answer to a Gossip with want_ack: proves the sender alive and measures RTT."""

    sender: MemberEntry
    echo_ts_ms: int


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


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Full push-pull answer: the responder's own group, its contacts and (same group) tuples."""

    sender: MemberEntry
    members: tuple[MemberEntry, ...]
    tuples: tuple[TupleEntry, ...]


@dataclass(frozen=True, slots=True)
class Refusal:
    """A join refused, with a reason a person can act on (wrong k, wrong cluster)."""

    reason: str


Message = Gossip | Ack | Leave | SyncRequest | Snapshot | Refusal
DATAGRAM_TYPES = (Gossip, Ack, Leave)


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
