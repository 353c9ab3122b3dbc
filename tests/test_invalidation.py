"""Invalidation: a change is notified to the kernel only for what the kernel holds."""

from __future__ import annotations

import threading

from daemon.core.keys import ROOT_INO, data_name, entry_name, inode_name
from daemon.core.messages import TupleEntry, Version
from kelipsfs.invalidation import Invalidator, KernelInodes, own_change


def record(name: str) -> TupleEntry:
    return TupleEntry(name, Version(1, b"\x01" * 20), 0, 0, 0o644, 0, bytes(32), (), False)


def queued(inv: Invalidator) -> list[tuple[str, int, bytes]]:
    out = []
    while not inv._queue.empty():
        item = inv._queue.get_nowait()
        assert item is not None
        out.append(item)
    return out


def test_lookup_counts_follow_entry_replies_and_forgets() -> None:
    kernel = KernelInodes()
    assert kernel.known(ROOT_INO) and not kernel.known(7)
    kernel.handed(7)
    kernel.handed(7)
    kernel.forgotten(7, 1)
    assert kernel.known(7)
    kernel.forgotten(7, 1)
    assert not kernel.known(7)
    kernel.forgotten(7, 3)  # a forget of more than was counted leaves nothing behind
    kernel.handed(7)
    assert kernel.known(7)


def test_only_changes_of_held_inodes_are_notified() -> None:
    kernel = KernelInodes()
    inv = Invalidator(kernel)
    inv._thread = threading.current_thread()  # (queued, not written: no FUSE session here)
    for name in (entry_name(5, "a"), inode_name(5), data_name(5), entry_name(ROOT_INO, "x")):
        inv.changed(record(name))
    assert queued(inv) == [("entry", ROOT_INO, b"x")]
    kernel.handed(5)
    for name in (entry_name(5, "a"), inode_name(5), data_name(5)):
        inv.changed(record(name))
    assert queued(inv) == [("entry", 5, b"a"), ("attrs", 5, b""), ("data", 5, b"")]
    with own_change():
        inv.changed(record(inode_name(5)))
    assert queued(inv) == []
    kernel.forgotten(5, 1)
    inv.changed(record(inode_name(5)))
    assert queued(inv) == []
