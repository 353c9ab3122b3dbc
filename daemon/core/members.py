"""Membership records and the rules of the gossip-style failure detector.

van Renesse, Minsky and Hayden: every node bumps its own heartbeat counter; a member whose
counter has not risen (as seen locally) for t_fail is failed -- no longer gossiped, targeted,
used as contact or as holder -- and after t_cleanup it is forgotten. Forgotten members go to a
graveyard for graveyard_ttl so that stale gossip (an old heartbeat still in flight) cannot bring
them back; only a strictly higher (incarnation, heartbeat) does.
"""

from __future__ import annotations

import enum
from typing import NamedTuple

from .ids import NodeId
from .messages import BEAT_HEARTBEAT_BITS, BEAT_INCARNATION_BITS, BEAT_PREFIX, Beat, MemberEntry


class Status(enum.Enum):
    ALIVE = "alive"
    FAILED = "failed"


class Member:
    """What one node knows of another: the gossiped entry plus local observations."""

    __slots__ = (
        "failed_at",
        "group",
        "heartbeat",
        "host",
        "incarnation",
        "last_heard",
        "node_id",
        "own",
        "port",
        "rtt",
        "status",
    )

    def __init__(self, entry: MemberEntry, group: int, own: bool, now: float) -> None:
        self.node_id = entry.node_id
        self.host = entry.host
        self.port = entry.port
        self.incarnation = entry.incarnation
        self.heartbeat = entry.heartbeat
        self.group = group
        self.own = own  # in the owner's affinity group (else it is a contact)
        self.last_heard = now  # local time of the last heartbeat increase
        self.rtt: float | None = None
        self.status = Status.ALIVE
        self.failed_at = 0.0

    @property
    def alive(self) -> bool:
        return self.status is Status.ALIVE

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def entry(self) -> MemberEntry:
        return MemberEntry(self.node_id, self.host, self.port, self.incarnation, self.heartbeat)

    def absorb(self, entry: MemberEntry, now: float) -> bool:
        """Take a gossiped entry if it is strictly fresher; True when it was (liveness rose)."""
        if not self.absorb_beat(entry.incarnation, entry.heartbeat, now):
            return False
        self.host = entry.host
        self.port = entry.port
        return True

    def absorb_beat(self, incarnation: int, heartbeat: int, now: float) -> bool:
        """Take a heartbeat if (incarnation, heartbeat) is strictly higher; True when it was."""
        if (incarnation, heartbeat) <= (self.incarnation, self.heartbeat):
            return False
        self.incarnation = incarnation
        self.heartbeat = heartbeat
        self.last_heard = now
        return True

    def beat(self) -> Beat:
        return Beat(self.node_id[:BEAT_PREFIX], self.incarnation & _INCARNATION_MASK,
                    self.heartbeat & _HEARTBEAT_MASK)

    def absorb_digest(self, beat: Beat, now: float) -> bool:
        """Take a digest's heartbeat if it is of this incarnation and newer; True when it was.

        The 16 heartbeat bits are unwrapped to the value nearest the known heartbeat, so an
        old digest still reads as old (never as a wrapped-around future one)."""
        if (self.incarnation & _INCARNATION_MASK) != beat.incarnation:
            return False
        half = (_HEARTBEAT_MASK + 1) // 2
        delta = ((beat.heartbeat - self.heartbeat + half) & _HEARTBEAT_MASK) - half
        return delta > 0 and self.absorb_beat(self.incarnation, self.heartbeat + delta, now)

    def observe_rtt(self, sample: float) -> None:
        """Exponentially weighted RTT, robust to one slow sample."""
        self.rtt = sample if self.rtt is None else 0.8 * self.rtt + 0.2 * sample


class Grave(NamedTuple):
    liveness: tuple[int, int]
    expires: float


class Graveyard:
    """Recently forgotten nodes and the liveness they had, so stale gossip cannot revive them."""

    __slots__ = ("_graves",)

    def __init__(self) -> None:
        self._graves: dict[NodeId, Grave] = {}

    def bury(self, node_id: NodeId, liveness: tuple[int, int], expires: float) -> None:
        self._graves[node_id] = Grave(liveness, expires)

    def blocks(self, entry: MemberEntry) -> bool:
        """True if this entry is no fresher than what the node had when it was forgotten."""
        grave = self._graves.get(entry.node_id)
        return grave is not None and (entry.incarnation, entry.heartbeat) <= grave.liveness

    def forget(self, node_id: NodeId) -> None:
        self._graves.pop(node_id, None)

    def expire(self, now: float) -> None:
        dead = [nid for nid, grave in self._graves.items() if grave.expires <= now]
        for nid in dead:
            del self._graves[nid]

    def __len__(self) -> int:
        return len(self._graves)

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._graves


_INCARNATION_MASK = (1 << BEAT_INCARNATION_BITS) - 1
_HEARTBEAT_MASK = (1 << BEAT_HEARTBEAT_BITS) - 1
