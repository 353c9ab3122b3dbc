"""Every protocol parameter of the core, with its default and why it has that value.

The defaults come from the simulator (``kelipsfs sim``); ``bench/README.md`` holds the runs
that chose them. The daemon's YAML configuration maps onto this dataclass key for key.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .ids import ConfigError, validate_k

AUTH_TRAILER = 48  # appended to every datagram: 8-byte time, 8-byte nonce, HMAC-SHA256


#: Most copies of an object a cluster may ask for (``replication``).
MAX_REPLICATION = 16


@dataclass(frozen=True)
class CoreConfig:
    """Protocol parameters shared by every node of a cluster (k and cluster_id must agree)."""

    #: Number of affinity groups. About sqrt(expected N): state per node is then O(sqrt N).
    k: int = 1
    #: Name of the cluster: other clusters' nodes are refused at join, their datagrams dropped.
    cluster_id: str = "kelipsfs"
    #: A node bumps its own heartbeat counter this often (seconds).
    heartbeat_interval: float = 1.0
    #: A gossip round (one message to ``fanout`` group members) runs this often (seconds).
    gossip_interval: float = 0.5
    #: Own-group targets per gossip round.
    fanout: int = 2
    #: A member whose heartbeat has not risen for this long is failed (seconds).
    t_fail: float = 4.0
    #: A failed member is forgotten after this long without a higher heartbeat (2 * t_fail if 0).
    t_cleanup: float = 0.0
    #: Contacts kept per foreign group.
    contacts_per_group: int = 2
    #: Copies of every object.
    replication: int = 3
    #: Largest encoded gossip datagram including its MAC; 1,200 never fragments on real paths.
    max_datagram: int = 1200
    #: Share of a gossip message's entry budget given to file tuples when tuples are waiting.
    tuple_share: float = 0.25
    #: Share of a gossip message's entry budget given to foreign-group (contact) entries.
    foreign_share: float = 0.1
    #: Spatial gossip: target weight falls as (rtt_floor / rtt) ** rtt_exponent ...
    rtt_exponent: float = 1.0
    #: ... with RTTs below this floor (seconds) counted as the floor ...
    rtt_floor: float = 0.002
    #: ... and this share of targets drawn uniformly, so far members are never starved.
    uniform_share: float = 0.3
    #: A probe to a contact that gets no ack within max(this, 4 * its RTT) counts as a miss.
    probe_timeout: float = 1.0
    #: Consecutive missed probes after which a contact is replaced (not declared failed).
    probe_misses: int = 2
    #: Chance per round of probing a newly seen foreign node for a closer contact.
    explore_probability: float = 0.1
    #: Chance that a gossip message asks its target for an ack, to refresh the RTT estimate.
    rtt_refresh_probability: float = 0.05
    #: Full push-pull state exchange with one group member this often (seconds); heals gossip gaps.
    anti_entropy_interval: float = 60.0
    #: Tombstones of deleted objects are kept this long (seconds) so stale copies cannot return.
    tombstone_ttl: float = 3600.0
    #: Removed members stay in the graveyard this long (seconds) so stale gossip cannot revive them.
    graveyard_ttl: float = 0.0

    def __post_init__(self) -> None:
        validate_k(self.k)
        if not self.cluster_id or len(self.cluster_id.encode("utf-8")) > 255:
            raise ConfigError("cluster_id must be 1 to 255 bytes of UTF-8")
        _positive("heartbeat_interval", self.heartbeat_interval)
        _positive("gossip_interval", self.gossip_interval)
        _positive("probe_timeout", self.probe_timeout)
        _positive("anti_entropy_interval", self.anti_entropy_interval)
        _positive("tombstone_ttl", self.tombstone_ttl)
        _positive("rtt_floor", self.rtt_floor)
        _int_range("fanout", self.fanout, 1, 16)
        _int_range("contacts_per_group", self.contacts_per_group, 1, 16)
        _int_range("replication", self.replication, 1, MAX_REPLICATION)
        _int_range("probe_misses", self.probe_misses, 1, 100)
        _int_range("max_datagram", self.max_datagram, 512, 65507)
        for name in ("tuple_share", "foreign_share", "uniform_share", "explore_probability",
                     "rtt_refresh_probability"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ConfigError(f"{name} must be between 0 and 1, got {value!r}")
        if self.tuple_share + self.foreign_share > 0.9:
            raise ConfigError("tuple_share + foreign_share must leave room for own-group entries")
        if not isinstance(self.rtt_exponent, (int, float)) or not 0 <= self.rtt_exponent <= 4:
            raise ConfigError(f"rtt_exponent must be between 0 and 4, got {self.rtt_exponent!r}")
        _positive("t_fail", self.t_fail)
        if self.t_cleanup != 0.0:
            _positive("t_cleanup", self.t_cleanup)
        if self.graveyard_ttl != 0.0:
            _positive("graveyard_ttl", self.graveyard_ttl)
        if self.t_fail <= self.heartbeat_interval:
            raise ConfigError("t_fail must be longer than heartbeat_interval")
        if self.t_cleanup == 0.0:
            object.__setattr__(self, "t_cleanup", 2.0 * self.t_fail)
        if self.t_cleanup < self.t_fail:
            raise ConfigError("t_cleanup must be at least t_fail")
        if self.graveyard_ttl == 0.0:
            object.__setattr__(self, "graveyard_ttl", self.t_cleanup)
        _positive("graveyard_ttl", self.graveyard_ttl)

    def with_changes(self, **changes: object) -> CoreConfig:
        """A copy with some fields replaced (derived defaults recomputed when left at 0)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        if "t_fail" in changes and "t_cleanup" not in changes:
            values["t_cleanup"] = 0.0
        if ("t_fail" in changes or "t_cleanup" in changes) and "graveyard_ttl" not in changes:
            values["graveyard_ttl"] = 0.0
        values.update(changes)
        return CoreConfig(**values)


def _positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 \
            or not math.isfinite(value):
        raise ConfigError(f"{name} must be a positive number, got {value!r}")


def _int_range(name: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"{name} must be an integer from {low} to {high}, got {value!r}")


def groups_for(expected_nodes: int) -> int:
    """The k that minimises state for an expected cluster size: round(sqrt(N)), at least 1."""
    if expected_nodes < 1:
        raise ConfigError("expected_nodes must be at least 1")
    return max(1, round(math.sqrt(expected_nodes)))
