"""Telling the kernel to forget what it cached of a record the cluster has just changed.

The kernel keeps entries (name → inode), attributes and pages of this mount for
``CACHE_SECONDS`` when they are records of this node's own group: every change to such a
record reaches this node -- announced to every member of the group before the write that made
it returns, else by gossip within a few rounds -- and the node's tuple watcher
(``KelipsNode.watch_tuples``) hands each one here, whoever made it. This turns it into the
matching notification: an entry record into ``invalidate_entry``, an inode record into
``invalidate_inode`` of its attributes, a content record into ``invalidate_inode`` of its
pages too. So a change made through another mount is seen here at once, as AFS's callbacks
break a client's cache, and the cache timeout only bounds how long a change whose announce
was lost can stay unseen.

A change this mount makes itself is not notified: the kernel applied it already (it keeps
the reply's attributes, and drops the attributes of the parents and links it changed), and a
notification would only throw away pages it just wrote.

The notifications are written to the FUSE device by a thread of their own: the kernel may
hold a lock while it waits for an answer the event loop is about to give, so writing from the
loop could deadlock.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import queue
import threading
from collections.abc import Iterator
from contextvars import ContextVar

import pyfuse3

from daemon.core.keys import DATA, INODE, ROOT_INO, parse_entry, record_ino
from daemon.core.messages import TupleEntry

log = logging.getLogger("kelipsfs.fuse")

#: Seconds the kernel keeps entries and attributes of this node's own group (and pages, as
#: long as the file is not changed elsewhere).
CACHE_SECONDS = 10.0

_Item = tuple[str, int, bytes] | None
#: Set while a request of this mount changes records (``own_change``).
_OWN_CHANGE: ContextVar[bool] = ContextVar("kelipsfs_own_change", default=False)


@contextlib.contextmanager
def own_change() -> Iterator[None]:
    """Around a request of this mount that changes records: the kernel knows of the changes
    it makes (tasks it starts inherit the mark)."""
    token = _OWN_CHANGE.set(True)
    try:
        yield
    finally:
        _OWN_CHANGE.reset(token)


class KernelInodes:
    """The inodes the kernel holds (FUSE lookup counts: every entry reply adds one, a forget
    takes its count away). Only what the kernel holds can have cached entries below it,
    attributes or pages, so a change of anything else needs no notification: most changes
    a node hears of are of files its own mount never looked at."""

    def __init__(self) -> None:
        self._counts: dict[int, int] = {}

    def handed(self, ino: int) -> None:
        """An entry reply names ``ino``."""
        self._counts[ino] = self._counts.get(ino, 0) + 1

    def forgotten(self, ino: int, count: int) -> None:
        left = self._counts.get(ino, 0) - count
        if left > 0:
            self._counts[ino] = left
        else:
            self._counts.pop(ino, None)

    def known(self, ino: int) -> bool:
        return ino == ROOT_INO or ino in self._counts


class Invalidator:
    """A queue of notifications and the thread that writes them (see the module docstring)."""

    def __init__(self, kernel: KernelInodes) -> None:
        self._kernel = kernel
        self._queue: queue.SimpleQueue[_Item] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="fuse invalidations",
                                        daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop writing (before the FUSE session closes)."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout)
            self._thread = None

    def changed(self, t: TupleEntry) -> None:
        """A tuple of this node's group changed (called on the event loop: cheap)."""
        if self._thread is None or _OWN_CHANGE.get():
            return
        if t.name.startswith("e/"):
            parsed = parse_entry(t.name)
            if parsed is not None and self._kernel.known(parsed[0]):
                self._queue.put(("entry", parsed[0], parsed[1].encode("utf-8")))
            return
        ino = record_ino(t.name)
        if ino is not None and t.name.startswith((INODE, DATA)) and self._kernel.known(ino):
            self._queue.put(("data" if t.name.startswith(DATA) else "attrs", ino, b""))

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            kind, ino, name = item
            try:
                if kind == "entry":
                    pyfuse3.invalidate_entry(ino, name)
                else:
                    pyfuse3.invalidate_inode(ino, attr_only=kind == "attrs")
            except OSError as exc:
                if exc.errno not in (errno.ENOENT, errno.ENOTDIR):
                    log.debug("invalidation of %x failed: %s", ino, exc)
            except Exception:  # a notification is an optimisation; never stop the thread
                log.exception("invalidation of %x failed", ino)
