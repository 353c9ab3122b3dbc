"""A node's identity on disk: its id survives restarts, its incarnation rises with each start.

Keeping the id lets a restarted node serve the objects it holds under the same name in every
tuple; raising the incarnation makes its fresh heartbeats (restarting at 0) win over what the
cluster remembers of its previous life.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

from daemon.core.ids import NODE_ID_BYTES, NodeId, new_node_id

IDENTITY_FILE = "node.json"


@dataclass(frozen=True)
class Identity:
    node_id: NodeId
    incarnation: int


def load_identity(data_dir: Path, rng: random.Random) -> Identity:
    """Read (or create) the identity, bump and durably store the incarnation, return it."""
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
        node_id = new_node_id(rng)
    incarnation += 1
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as fh:
        json.dump({"node_id": node_id.hex(), "incarnation": incarnation}, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return Identity(node_id, incarnation)
