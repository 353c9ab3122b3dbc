"""Records in memory, changed by the same rules as the cluster's: a namespace with no network.

``MemoryRecords`` implements ``daemon.namespace.vfs.Records`` over one dictionary. Every op
runs the rule of ``daemon.core.inodes`` a primary runs, and the records it writes are stamped
and kept exactly as a primary would (``stamp_writes``), so the namespace's semantics are
tested here without root, sockets or a mount, and what differs on a cluster is only where the
records live.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Callable, Iterable

from daemon.core.inodes import (
    Entry,
    FsError,
    Inode,
    Outcome,
    Write,
    current_inode,
    entry_from_record,
)
from daemon.core.keys import data_name, entry_name, parse_entry
from daemon.core.messages import TupleEntry, Version
from daemon.core.tuples import HybridClock
from daemon.digest import EMPTY_DIGEST, digest_of
from daemon.namespace.ops import Op, Result, from_json, run, to_json


def stamp_writes(writes: list[Write], version: Version, holders: tuple[bytes, ...]
                 ) -> list[tuple[TupleEntry, bytes | None]]:
    """The tuples (and contents) of an op's writes, all stamped ``version``."""
    out = []
    for w in writes:
        content = w.content
        tombstone = content is None
        out.append((TupleEntry(w.name, version, 1, 0 if content is None else len(content),
                               w.mode, w.mtime_ns,
                               EMPTY_DIGEST if content is None else digest_of(content),
                               holders, tombstone, w.attrs), content))
    return out


class MemoryRecords:
    """Every record in one dict; ops applied at once (one primary: this object)."""

    def __init__(self, wall_ns: Callable[[], int] = time.time_ns,
                 writer: bytes = b"\x01" * 20) -> None:
        self._wall_ns = wall_ns
        self._writer = writer
        self._clock = HybridClock()
        self._tuples: dict[str, TupleEntry] = {}
        self._contents: dict[str, bytes] = {}
        self._entries: dict[int, set[str]] = {}
        self.ops: list[Op] = []  # every op applied, in order (tests look at them)

    # --- the View the rules read --------------------------------------------------------

    def record(self, name: str) -> TupleEntry | None:
        return self._tuples.get(name)

    def entries_of(self, directory: int) -> Iterable[TupleEntry]:
        return [self._tuples[n] for n in sorted(self._entries.get(directory, ()))]

    def content(self, name: str) -> bytes | None:
        return self._contents.get(name)

    # --- Records ------------------------------------------------------------------------

    async def inode(self, ino: int) -> Inode | None:
        return current_inode(_View(self), ino)

    async def bare_inode(self, ino: int) -> Inode | None:
        return current_inode(_View(self), ino)

    async def entry(self, directory: int, name: str) -> Entry | None:
        t = self._tuples.get(entry_name(directory, name))
        return entry_from_record(t) if t is not None else None

    async def entries(self, directory: int) -> list[Entry]:
        found = (entry_from_record(t) for t in self.entries_of(directory))
        return [e for e in found if e is not None]

    async def small_content(self, name: str) -> bytes:
        data = self._contents.get(name)
        if data is None:
            raise FsError(errno.EIO, f"{name}: no content")
        return data

    def placed_with(self, directory: int, ino: int) -> bool:
        return True  # one store, one primary: every inode is placed with every directory

    def primary_here(self, ino: int) -> bool | None:
        return True

    async def sync(self, ino: int) -> None:
        return None  # memory: every change is as durable as it gets when it is made

    async def apply(self, op: Op) -> Result:
        now = self._wall_ns()
        clock = self._clock.stamp(now // 1_000_000)
        # Through the wire form, as between nodes: what cannot travel fails here too.
        outcome: Outcome = run(from_json(to_json(op)), _View(self), now, clock)
        self.ops.append(op)
        stamped = stamp_writes(outcome.writes, Version(clock, self._writer), ())
        self._keep(stamped)
        return Result(outcome.inode, outcome.entry, tuple(t for t, _ in stamped))

    # --- content, as a mount's close writes it ------------------------------------------

    def write_content(self, ino: int, data: bytes, mtime_ns: int | None = None) -> None:
        now = self._wall_ns()
        clock = self._clock.stamp(now // 1_000_000)
        name = data_name(ino)
        self._keep([(TupleEntry(name, Version(clock, self._writer), 1, len(data), 0,
                                now if mtime_ns is None else mtime_ns, digest_of(data), (),
                                False), data)])

    def _keep(self, stamped: list[tuple[TupleEntry, bytes | None]]) -> None:
        for t, content in stamped:
            self._tuples[t.name] = t
            if content is None:
                self._contents.pop(t.name, None)
            else:
                self._contents[t.name] = content
            parsed = parse_entry(t.name)
            if parsed is not None:
                self._entries.setdefault(parsed[0], set()).add(t.name)

    def live_names(self) -> list[str]:
        """Names of every record that is not a tombstone (tests check for leftovers)."""
        return sorted(n for n, t in self._tuples.items() if not t.tombstone)


class _View:
    """``daemon.core.inodes.View`` over a MemoryRecords."""

    def __init__(self, records: MemoryRecords) -> None:
        self._r = records

    def record(self, name: str) -> TupleEntry | None:
        return self._r.record(name)

    def entries(self, directory: int) -> Iterable[TupleEntry]:
        return self._r.entries_of(directory)

    def content(self, name: str) -> bytes | None:
        return self._r.content(name)
