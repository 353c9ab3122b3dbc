"""The files open on a mount: one local copy per inode, shared by all its handles.

Every handle of one inode on this mount -- whatever name or hard link opened it -- reads and
writes one ``LocalCopy``, so a program sees its own writes at once (local POSIX semantics)
and the kernel's single page cache per inode matches what every handle reads. The copy is
fetched whole at the first open (a hard link to this node's store file when it holds the
current version, copied on the first write; a small content of its record log is held in
memory until a write needs a file) and published as the inode's new content at
``flush`` (every close) and ``fsync`` when it changed: close-to-open consistency, as NFS and
AFS give. A failed publish fails the close (EIO, ENOSPC) and the copy stays dirty, so a write
is never lost silently.

A copy whose inode another mount has rewritten since is not shared with new opens: they get
the new version, while the handles already open keep reading the one they opened.

Every method runs on the node's event loop (pyfuse3 calls them as trio tasks). Local disk
work that can take long -- copying a file before its first write, hashing it, waiting for the
check of a linked copy -- goes to worker threads, and a per-inode lock keeps writes out while
a publish hands the file to the store.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

import trio

from daemon.core.manifest import CHUNK_SIZE, is_manifest
from daemon.data_errors import DataError, InsertFailed
from daemon.digest import HASH_IN_LOOP, digest_of
from daemon.quick_lock import QuickLock, QuickLocks
from kelipsfs.chunked_copy import ChunkedCopy
from kelipsfs.content import Content
from kelipsfs.local_copy import CorruptCopy, LocalCopy
from kelipsfs.memory_copy import MemoryCopy

log = logging.getLogger("kelipsfs.fuse")


class FileError(OSError):
    """A file operation failed with an errno (the FUSE adapter passes it on)."""

    def __init__(self, code: int, message: str = "") -> None:
        super().__init__(code, message or os.strerror(code))


@dataclass
class _Open:
    """One inode's local copy on this mount, and the handles that use it."""

    ino: int
    copy: LocalCopy
    lock: QuickLock = field(default_factory=QuickLock)
    refs: int = 0
    writers: int = 0


@dataclass
class _Handle:
    file: _Open
    writable: bool
    append: bool


class OpenFiles:
    """The open-file table of a mount (see the module docstring)."""

    def __init__(self, content: Content, spool_dir: Path, max_size: int) -> None:
        self._content = content
        self._spool = spool_dir
        self._max_size = max_size
        self._files: dict[int, _Open] = {}  # ino -> the copy new opens share
        self._handles: dict[int, _Handle] = {}
        self._next_fh = 1
        self._opening: QuickLocks[int] = QuickLocks()  # opens of one inode, one at a time

    # --- what is open ---------------------------------------------------------------------

    def busy(self, ino: int) -> LocalCopy | None:
        """The copy of ``ino`` whose state is newer than the cluster's (dirty or being
        written), or None: its size and mtime are the ones to show."""
        f = self._files.get(ino)
        return f.copy if f is not None and _busy(f) else None

    def is_open(self, ino: int) -> bool:
        return ino in self._files

    async def unlinked(self, ino: int) -> None:
        """The inode is gone (its last link removed): open handles keep reading and writing
        their copy, which is never published again. What of it is still only in the cluster
        is fetched now, before its chunks are reclaimed."""
        f = self._files.get(ino)
        if f is not None:
            f.copy.unlinked = True
            try:
                await f.copy.load_all()
            except OSError as exc:
                log.warning("inode %x: unlinked while open, not all of it kept: %s", ino, exc)

    def is_unlinked(self, ino: int) -> bool:
        f = self._files.get(ino)
        return f is not None and f.copy.unlinked

    # --- open and close -------------------------------------------------------------------

    async def open(self, ino: int, writable: bool, truncate: bool, append: bool) -> int:
        async with self._opening.hold(ino):
            f = await self._copy_for(ino, truncate)
            if truncate and (f.copy.size() or isinstance(f.copy, ChunkedCopy)):
                async with f.lock:
                    await self._before_change(f.copy)
                    f.copy.truncate(0)
            return self._install(f, writable, append)

    async def create(self, ino: int, writable: bool, append: bool) -> int:
        """A handle on a new, empty file: published at the first flush, even if empty."""
        f = _Open(ino, self._empty_copy(ino))
        self._files[ino] = f
        return self._install(f, writable, append)

    async def _copy_for(self, ino: int, truncate: bool) -> _Open:
        current = self._files.get(ino)
        if current is not None and (_busy(current) or truncate):
            return current  # this mount's unpublished state wins
        if truncate:
            latest = await self._content.current(ino)
            if latest is not None and is_manifest(latest.attrs):
                f = _Open(ino, await self._fetch(ino))  # cut to 0 by its chunks: retired
            else:
                f = _Open(ino, self._empty_copy(ino))
            self._files[ino] = f
            return f
        if current is not None:
            latest = await self._content.current(ino)
            if (latest.version.clock if latest is not None else None) == current.copy.clock:
                return current
        f = _Open(ino, await self._fetch(ino))
        self._files[ino] = f
        return f

    def _empty_copy(self, ino: int) -> LocalCopy:
        """A new, empty content (in memory until it grows: ``kelipsfs.memory_copy``)."""
        return MemoryCopy(f"{ino:x}", self._spool / secrets.token_hex(12), b"", clock=None,
                          dirty=True, mtime_ns=time.time_ns())

    async def _fetch(self, ino: int) -> LocalCopy:
        path = self._spool / secrets.token_hex(12)
        try:
            meta = await self._content.fetch(ino, path, link_ok=True, in_memory=True)
        except DataError as exc:
            log.warning("cannot read inode %x: %s", ino, exc.message)
            raise FileError(errno.EIO) from exc
        if meta is None:  # never written: empty, and nothing to publish until it changes
            copy = self._empty_copy(ino)
            copy.dirty = False
            return copy
        if meta.manifest is not None:  # in chunks: each fetched when first needed
            return await ChunkedCopy.open(f"{ino:x}", ino, path, meta.manifest, meta.clock,
                                          self._content.chunks, self._content.background)
        if meta.data is not None:  # small: read from memory until a write needs the file
            return MemoryCopy(f"{ino:x}", path, meta.data, clock=meta.clock,
                              checksum=meta.checksum)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return LocalCopy(f"{ino:x}", path, fd, spool=True, clock=meta.clock, mtime_ns=0,
                         dirty=False, checksum=meta.checksum, size=meta.size,
                         verify=meta.verify, shared=True)

    def _install(self, f: _Open, writable: bool, append: bool) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = _Handle(f, writable, append)
        f.refs += 1
        if writable:
            f.writers += 1
        return fh

    def _handle(self, fh: int) -> _Handle:
        handle = self._handles.get(fh)
        if handle is None:
            raise FileError(errno.EBADF)
        return handle

    def has(self, fh: int) -> bool:
        return fh in self._handles

    def ino_of(self, fh: int) -> int:
        return self._handle(fh).file.ino

    async def release(self, fh: int) -> None:
        handle = self._handles.pop(fh, None)
        if handle is None:
            return
        f = handle.file
        try:
            if f.refs == 1:
                await self._publish(f)  # normally nothing: flush did it
        except FileError as exc:
            log.error("could not store inode %x when it was closed: %s", f.ino, exc.strerror)
        finally:
            f.refs -= 1
            if handle.writable:
                f.writers -= 1
            if f.refs == 0:
                if self._files.get(f.ino) is f:
                    del self._files[f.ino]
                f.copy.close()

    # --- data -----------------------------------------------------------------------------

    async def read(self, fh: int, offset: int, size: int) -> bytes:
        copy = self._handle(fh).file.copy
        try:
            await copy.load(offset, size)
            if copy.check_pending(size, offset):
                return await trio.to_thread.run_sync(copy.read, size, offset)
            return copy.read(size, offset)
        except CorruptCopy as exc:
            raise FileError(errno.EIO) from exc

    async def write(self, fh: int, offset: int, data: bytes) -> int:
        handle = self._handle(fh)
        if not handle.writable:
            raise FileError(errno.EBADF)
        f = handle.file
        async with f.lock:
            copy = f.copy
            await self._before_change(copy)
            at = copy.size() if handle.append else offset
            await copy.load_edges(at, len(data))
            written = copy.write(data, offset, handle.append, self._max_size)
            if copy.size() > CHUNK_SIZE and not isinstance(copy, ChunkedCopy):
                copy = f.copy = ChunkedCopy.adopt(copy, f.ino, self._content.chunks,
                                                  self._content.background, following=at)
            await copy.after_write(at, written)
            return written

    async def truncate(self, ino: int, length: int) -> bool:
        """Cut or extend the open copy of ``ino`` (published with it); False if none is
        open here."""
        f = self._files.get(ino)
        if f is None:
            return False
        if length > self._max_size:
            raise FileError(errno.EFBIG)
        async with f.lock:
            await self._before_change(f.copy)
            await f.copy.load_cut(length)
            f.copy.truncate(length)
        return True

    def set_mtime(self, ino: int, mtime_ns: int) -> None:
        """An explicit mtime for a copy about to be published (futimens before close, as
        ``cp -p`` does): its publish carries it, so the write does not overrule it."""
        copy = self.busy(ino)
        if copy is not None:
            copy.mtime_ns = mtime_ns

    async def _before_change(self, copy: LocalCopy) -> None:
        if copy.shared:  # copy on write, off the event loop (it may be a large file)
            await trio.to_thread.run_sync(copy.unshare)

    # --- publishing -----------------------------------------------------------------------

    async def flush(self, fh: int) -> None:
        """close(2) returns what this raises: a write is never lost silently. A reader
        closing while another handle still writes does not publish half-done content."""
        handle = self._handles.get(fh)
        if handle is not None and (handle.writable or handle.file.writers == 0):
            await self._publish(handle.file)

    async def fsync(self, fh: int) -> bool:
        """Publish the file if it changed; whether it did (and so made its records durable)."""
        return await self._publish(self._handle(fh).file)

    async def _publish(self, f: _Open) -> bool:
        async with f.lock:
            copy = f.copy
            if not copy.dirty or copy.unlinked:
                return False
            size = copy.size()
            if size > CHUNK_SIZE and not isinstance(copy, ChunkedCopy):
                copy = f.copy = ChunkedCopy.adopt(copy, f.ino, self._content.chunks)
            if isinstance(copy, ChunkedCopy):
                await self._publish_chunks(f.ino, copy)
                return True
            source: Path | bytes = copy.path
            if (held := copy.memory()) is not None:
                source, checksum = held, digest_of(held)
            elif size <= HASH_IN_LOOP:  # a small file hashes faster than a thread hop
                with copy.lock:
                    checksum = copy.checksum()
            else:
                checksum = await trio.to_thread.run_sync(copy.locked_checksum)
            try:
                entry = await self._content.publish(f.ino, source, size, checksum,
                                                    copy.mtime_ns)
            except InsertFailed as exc:
                log.warning("inode %x not stored: %s", f.ino, exc.message)
                raise FileError(errno.ENOSPC if exc.full else errno.EIO) from exc
            except DataError as exc:
                log.warning("inode %x not stored: %s", f.ino, exc.message)
                raise FileError(errno.EIO) from exc
            with copy.lock:
                copy.published(entry.version.clock, linked=True)
            return True

    async def _publish_chunks(self, ino: int, copy: ChunkedCopy) -> None:
        """Upload what changed of a chunked copy, then its manifest (``f.lock`` held)."""
        try:
            latest = None
            if copy.base.chunks:  # (an adopted copy uploads every chunk anyway)
                current = await self._content.current(ino)
                latest = current.version.clock if current is not None else None
            entry = await copy.publish(copy.mtime_ns, latest)
        except InsertFailed as exc:
            log.warning("inode %x not stored: %s", ino, exc.message)
            raise FileError(errno.ENOSPC if exc.full else errno.EIO) from exc
        except DataError as exc:
            log.warning("inode %x not stored: %s", ino, exc.message)
            raise FileError(errno.EIO) from exc
        with copy.lock:
            copy.published(entry.version.clock, linked=False)


def _busy(f: _Open) -> bool:
    """Its state is newer than (or about to replace) the cluster's: answer from it."""
    return f.copy.dirty or f.writers > 0
