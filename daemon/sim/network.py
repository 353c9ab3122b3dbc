"""The simulator's virtual network: latency from 2-D coordinates, datagram loss, partitions.

Datagrams (gossip, acks, leaves) are lost with probability ``loss`` each. Stream messages
(joins, snapshots, lookups) model TCP: a loss costs a retransmission timeout, not the message.
Nothing crosses an active partition; nothing reaches a crashed host.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

BASE_ONE_WAY = 0.0002  # seconds: switch and stack cost between any two hosts
SPAN_ONE_WAY = 0.020  # seconds: one-way latency across the whole unit square
RETRANSMIT = 0.2  # seconds: TCP's minimum retransmission timeout


@dataclass
class Host:
    x: float
    y: float
    side: int = 0  # which side of a partition the host is on


@dataclass
class VirtualNetwork:
    loss: float
    rng: random.Random
    hosts: list[Host] = field(default_factory=list)
    partitioned: bool = False

    def add_host(self) -> int:
        self.hosts.append(Host(self.rng.random(), self.rng.random()))
        return len(self.hosts) - 1

    def one_way(self, a: int, b: int) -> float:
        ha, hb = self.hosts[a], self.hosts[b]
        return BASE_ONE_WAY + SPAN_ONE_WAY * math.hypot(ha.x - hb.x, ha.y - hb.y)

    def connected(self, a: int, b: int) -> bool:
        return not self.partitioned or self.hosts[a].side == self.hosts[b].side

    def datagram_delay(self, a: int, b: int) -> float | None:
        """One-way delay of a datagram, or None when it is lost or cannot cross."""
        if not self.connected(a, b) or (self.loss and self.rng.random() < self.loss):
            return None
        return self.one_way(a, b)

    def stream_delay(self, a: int, b: int, exchanges: int = 1) -> float | None:
        """Time for ``exchanges`` request/response round trips over TCP (None: unreachable)."""
        if not self.connected(a, b):
            return None
        total = 0.0
        rtt = 2 * self.one_way(a, b)
        for _ in range(2 * exchanges):
            while self.loss and self.rng.random() < self.loss:
                total += max(RETRANSMIT, 2 * rtt)
        return total + exchanges * rtt

    def split(self) -> None:
        """Partition the plane into west and east halves."""
        for host in self.hosts:
            host.side = 0 if host.x < 0.5 else 1
        self.partitioned = True

    def heal(self) -> None:
        self.partitioned = False
