"""Node ids and the SHA-1 mapping of node ids and object names onto affinity groups.

Kelips places both nodes and objects by hashing them into one of ``k`` affinity groups; every
node must compute the same group for the same key, so the mapping is a pure function of the
key bytes and ``k`` and nothing else.
"""

from __future__ import annotations

import functools
import hashlib
import random

from .keys import placement_key

NODE_ID_BYTES = 20
MAX_GROUPS = 65535  # k travels as an unsigned 16-bit field on the wire

NodeId = bytes


class ConfigError(ValueError):
    """A protocol parameter is out of range; the message names the parameter."""


def validate_k(k: object) -> int:
    """Return ``k`` if it is a usable number of affinity groups, else raise ConfigError."""
    if isinstance(k, bool) or not isinstance(k, int):
        raise ConfigError(f"k must be an integer, got {k!r}")
    if not 1 <= k <= MAX_GROUPS:
        raise ConfigError(f"k must be between 1 and {MAX_GROUPS}, got {k}")
    return k


def new_node_id(rng: random.Random) -> NodeId:
    """A fresh random 160-bit node id drawn from the injected random source."""
    return rng.getrandbits(8 * NODE_ID_BYTES).to_bytes(NODE_ID_BYTES, "big")


def node_id_from_name(name: str) -> NodeId:
    """A stable node id for a stable node name (SHA-1 of the UTF-8 name)."""
    return hashlib.sha1(name.encode("utf-8")).digest()


def check_node_id(node_id: object) -> NodeId:
    """Return ``node_id`` if it is a well-formed id, else raise ValueError."""
    if not isinstance(node_id, bytes) or len(node_id) != NODE_ID_BYTES:
        raise ValueError(f"a node id is {NODE_ID_BYTES} bytes, got {node_id!r}")
    return node_id


def group_of_bytes(key: bytes, k: int) -> int:
    """The affinity group of an arbitrary key: int(SHA-1(key)) mod k."""
    if k == 1:
        return 0
    return int.from_bytes(hashlib.sha1(key).digest(), "big") % k


@functools.lru_cache(maxsize=1 << 17)
def group_of_node(node_id: NodeId, k: int) -> int:
    """The affinity group of a node id (cached: the same ids arrive in every gossip message)."""
    return group_of_bytes(node_id, k)


def group_of_name(name: str, k: int) -> int:
    """The affinity group of a record name: that of its placement key (``keys``)."""
    return group_of_bytes(placement_key(name).encode("utf-8"), k)


def cluster_tag(cluster_id: str) -> bytes:
    """Four bytes that identify a cluster on every datagram, so strays are dropped cheaply."""
    return hashlib.sha1(cluster_id.encode("utf-8")).digest()[:4]


def short_id(node_id: NodeId) -> str:
    """A short human-readable form of a node id for tables and logs."""
    return node_id.hex()[:10]
