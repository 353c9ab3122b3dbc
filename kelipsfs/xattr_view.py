"""The read-only ``user.kelips.*`` extended attributes: where things live, seen from a mount.

On the root: ``node_id``, ``group``, ``k``, ``members`` (one JSON object per line: id,
address, group, state, heartbeat, role) and ``contacts`` (JSON, per group). On any other
inode: ``group`` (its records' affinity group), ``inode`` (its number in hex), ``version``
(clock:writer of its content, or of its inode record when it has no content), ``holders``
(JSON list of id and address) and, for a regular file, ``checksum`` (the content's BLAKE3
digest in hex, what ``b3sum`` prints). A value longer than the kernel's 64 KiB limit is offered
as ``NAME.0``, ``NAME.1``, ... cut at line ends.

They are readable by name (``getfattr -n``) but not listed, so tools that copy every listed
attribute (``cp -a``, ``rsync -X``, ``mv`` across filesystems) do not copy them, as CephFS
keeps its ``ceph.*`` attributes out of listings.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from daemon.core.inodes import Inode
from daemon.core.keys import ROOT_INO, data_name, inode_name

if TYPE_CHECKING:
    from daemon.runtime import NodeRuntime

PREFIX = "user.kelips."
#: Linux caps one xattr value (and a name list) at 64 KiB; larger values are paged.
XATTR_MAX = 64 * 1024


def root_values(rt: NodeRuntime) -> dict[str, bytes]:
    node = rt.node
    status = rt.status()
    members = "".join(
        json.dumps({"id": row["id"], "address": row["address"], "group": row["group"],
                    "state": row["state"], "heartbeat": row["heartbeat"],
                    "role": row["role"]}) + "\n"
        for row in status["members"])
    contacts: dict[str, list[dict[str, Any]]] = {}
    for group, ids in sorted(node.contacts.items()):
        rows = []
        for nid in ids:
            m = node.members.get(nid)
            if m is not None:
                rows.append({"id": nid.hex(), "address": f"{m.host}:{m.port}",
                             "state": m.status.value,
                             "rtt_ms": None if m.rtt is None else round(m.rtt * 1000, 2)})
        contacts[str(group)] = rows
    values = {"node_id": node.node_id.hex(), "group": str(node.group),
              "k": str(rt.settings.core.k), "members": members,
              "contacts": json.dumps(contacts, indent=1) + "\n"}
    return _paged({PREFIX + key: value.encode() for key, value in values.items()})


async def inode_values(rt: NodeRuntime, inode: Inode) -> dict[str, bytes]:
    """The placement facts of ``inode``."""
    if inode.ino == ROOT_INO:
        return root_values(rt)
    node = rt.node
    name = inode_name(inode.ino)
    holders, _ = await rt.dataplane.placement(name)
    values = {"group": str(node.group_of(name)), "inode": f"{inode.ino:x}",
              "holders": json.dumps([{"id": h.node_id.hex(), "address": f"{h.host}:{h.port}"}
                                     for h in holders]) + "\n"}
    version = inode.content if inode.content is not None else inode.version
    if version is not None:
        values["version"] = f"{version.clock}:{version.writer.hex()}"
    if inode.content is not None:
        found = await rt.dataplane.find(data_name(inode.ino))
        if found is not None and not found.tombstone:
            values["checksum"] = found.checksum.hex()
    return _paged({PREFIX + key: value.encode() for key, value in values.items()})


def _paged(values: dict[str, bytes]) -> dict[str, bytes]:
    """Values over 64 KiB become NAME.0, NAME.1, ... split at line ends (where possible)."""
    out: dict[str, bytes] = {}
    for key, value in values.items():
        if len(value) <= XATTR_MAX:
            out[key] = value
            continue
        page, index = b"", 0
        for line in value.splitlines(keepends=True):
            while len(line) > XATTR_MAX:  # one line longer than a page: cut it
                if page:
                    out[f"{key}.{index}"], page, index = page, b"", index + 1
                out[f"{key}.{index}"], line, index = line[:XATTR_MAX], line[XATTR_MAX:], index + 1
            if len(page) + len(line) > XATTR_MAX:
                out[f"{key}.{index}"], page, index = page, b"", index + 1
            page += line
        if page:
            out[f"{key}.{index}"] = page
    return out
