"""Where an object lives inside its group: rendezvous (highest-random-weight) hashing.

Every member of a group ranks the live members the same way for a given name, so writers,
contacts and repairers agree on the r holders without coordination, and when a holder fails
only its copies move (to the next member in the ranking).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from .ids import NodeId
from .keys import placement_key


def rank(name: str, node_ids: Iterable[NodeId]) -> list[NodeId]:
    """Node ids ordered by their rendezvous weight for ``name`` (best first): the weight of
    its placement key (``keys``), so every record of an inode has the same holders."""
    key = placement_key(name).encode("utf-8")
    return sorted(node_ids, key=lambda nid: hashlib.sha1(key + nid).digest(), reverse=True)


def choose(name: str, node_ids: Iterable[NodeId], r: int) -> list[NodeId]:
    """The r preferred holders of ``name`` among ``node_ids``."""
    return rank(name, node_ids)[:r]
