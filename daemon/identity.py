"""A node's identity on disk: its id survives restarts, its incarnation rises with each start.

Keeping the id lets a restarted node serve the objects it holds under the same name in every
tuple; raising the incarnation makes its fresh heartbeats (restarting at 0) win over what the
cluster remembers of its previous life. A node without an identity chooses its id by the sizes
of the groups it would land in (``balanced_node_id``); an identity on disk is never changed.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon.core.balance import candidate_ids, census, least_loaded
from daemon.core.ids import NODE_ID_BYTES, NodeId, new_node_id
from daemon.core.messages import Address

IDENTITY_FILE = "node.json"


@dataclass(frozen=True)
class Identity:
    node_id: NodeId
    incarnation: int


def has_identity(data_dir: Path) -> bool:
    return (data_dir / IDENTITY_FILE).exists()


def load_identity(data_dir: Path, rng: random.Random, new_id: NodeId | None = None) -> Identity:
    """Read (or create, with ``new_id`` if given) the identity, bump and durably store the
    incarnation, return it."""
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / IDENTITY_FILE
    node_id: NodeId | None = None
    incarnation = 0
    if path.exists():
        try:
            doc = json.loads(path.read_text())
            node_id = bytes.fromhex(doc["node_id"])
            incarnation = int(doc["incarnation"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}: unreadable node identity ({exc}); move it away to start "
                             "as a new node") from exc
        if len(node_id) != NODE_ID_BYTES:
            raise ValueError(f"{path}: node_id must be {NODE_ID_BYTES} bytes")
    if node_id is None:
        node_id = new_node_id(rng) if new_id is None else new_id
    incarnation += 1
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as fh:
        json.dump({"node_id": node_id.hex(), "incarnation": incarnation}, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return Identity(node_id, incarnation)


StatusFetch = Callable[[Address], Awaitable[Any]]


async def balanced_node_id(rng: random.Random, k: int, seeds: Sequence[Address],
                           status: StatusFetch) -> NodeId:
    """A first start's id: of ``daemon.core.balance.JOIN_CHOICES`` random candidates, the one
    whose group is smallest in the view learned through the first seed that answers.

    ``status(address)`` returns a node's status document (``NodeRuntime.status``) or None if
    the node could not be asked. The seed's says how many members its own group has and who
    its live contacts are; one contact of each other candidate group is asked for that
    group's size. No seed answers (or k = 1): a plain random id."""
    candidates = candidate_ids(rng)
    if k == 1:
        return candidates[0]
    for seed in seeds:
        doc = await status(seed)
        try:
            if doc is None or doc["k"] != k:
                continue
            contacts: dict[int, list[Address]] = {}
            for row in doc["members"]:
                if row["role"] == "contact" and row["state"] == "alive":
                    host, _, port = str(row["address"]).rpartition(":")
                    contacts.setdefault(int(row["group"]), []).append((host, int(port)))
            sizes, ask = census(candidates, k, int(doc["group"]), int(doc["group_size"]),
                                contacts)
        except (KeyError, TypeError, ValueError):
            continue
        for group, address in ask.items():
            answer = await status(address)
            try:
                if answer is not None and int(answer["group"]) == group:
                    sizes[group] = int(answer["group_size"])
            except (KeyError, TypeError, ValueError):
                pass
        return least_loaded(candidates, k, sizes)
    return candidates[0]
