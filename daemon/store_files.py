"""The object store's file primitives: temp files filled and fsynced, links, directory
fsyncs, reads, and the worker-thread hop every blocking call of the store takes.

``daemon.store`` keeps the index and the versions, ``daemon.store_commit`` the commit protocol;
what is here touches one file or directory at a time and knows nothing of names or versions.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
from collections.abc import AsyncIterable, Callable
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import trio

from daemon.core.codec import INLINE_MAX
from daemon.digest import Hasher, new_hasher
from daemon.writeback import advance_writeback

log = logging.getLogger("kelipsfs.store")
_T = TypeVar("_T")
#: Largest object whose bytes a put keeps: what a lookup reply can carry inline.
SMALL_KEEP = INLINE_MAX


def stat_signature(st: os.stat_result) -> tuple[int, ...]:
    """What changes when a file is written to or replaced: inode, size, mtime (Linux gives a
    file that was stat'ed since its last change a fine-grained time on its next change, so
    even a write right after the signature was taken changes it). Not ctime: the commit's
    rename changes it, and the put takes the signature before, in its worker thread."""
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def file_signature(path: Path) -> tuple[int, ...] | None:
    try:
        return stat_signature(os.stat(path))
    except OSError:
        return None


def read_small_file(path: Path, size: int) -> bytes:
    """At most ``size`` + 1 bytes of a small local file (one more shows that it grew)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, size + 1)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make renames and creations in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def unlink_quietly(path: Path) -> bool:
    """Remove a file if it exists; a failure is logged (recovery retries), never raised."""
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        log.warning("could not remove %s: %s", path, exc.strerror or exc)
        return False
    return True


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written <= 0:  # never seen on Linux, but a zero write must not spin forever
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view = view[written:]


def link_synced(source: Path, link: Path) -> int:
    """Hard-link ``source`` as ``link``, fsync the inode, return its size (worker thread)."""
    os.link(source, link)
    fd = os.open(link, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
        return os.fstat(fd).st_size
    finally:
        os.close(fd)


def open_read(path: Path) -> BinaryIO:
    return open(path, "rb")  # the caller owns and closes it


def read_hashed(f: BinaryIO, size: int, hasher: Any) -> bytes:
    """Read up to ``size`` bytes and feed them to ``hasher`` (in a worker thread)."""
    block = f.read(size)
    hasher.update(block)
    return block


async def in_thread(fn: Callable[[], _T]) -> _T:
    """Run blocking I/O in a worker thread; not abandoned on cancel, so results are never lost."""
    return await trio.to_thread.run_sync(fn)


async def shielded(fn: Callable[[], object]) -> None:
    """Clean-up I/O in a worker thread that must run even while the caller is being cancelled."""
    with trio.CancelScope(shield=True):
        await trio.to_thread.run_sync(fn)


class TempFile:
    """A temp file in ``root/tmp`` being filled; every method blocks (call from a thread)."""

    def __init__(self, tmp_dir: Path, hashing: bool = True) -> None:
        self.path = tmp_dir / f"{secrets.token_hex(16)}.part"
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        self.hasher: Hasher | None = new_hasher() if hashing else None
        self.size = 0
        self._written_out = 0  # how far writeback was asked (advance_writeback)
        self.small: bytes | None = None  # the whole content, if it came in one small write
        self.signature: tuple[int, ...] | None = None  # of the finished file

    def write(self, blocks: list[bytes]) -> None:
        data = blocks[0] if len(blocks) == 1 else b"".join(blocks)
        self.small = data if self.size == 0 and len(data) <= SMALL_KEEP else None
        if self.hasher is not None:
            self.hasher.update(data)
        write_all(self.fd, data)
        self.size += len(data)
        self._written_out = advance_writeback(self.fd, self._written_out, self.size)

    def finish(self) -> None:
        """fsync and close: after this the bytes are on disk, whatever happens to the process."""
        os.fsync(self.fd)
        self.signature = stat_signature(os.fstat(self.fd))
        fd, self.fd = self.fd, -1
        os.close(fd)

    def discard(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            with contextlib.suppress(OSError):
                os.close(fd)
        unlink_quietly(self.path)


async def stream_to_new_file(dest: Path, blocks: AsyncIterable[bytes],
                             write: Callable[[int, bytes], object] = write_all) -> None:
    """Create ``dest`` and ``write`` each block to it in a worker thread; on any failure
    (or cancellation) the file is removed, so no partial file is ever left behind."""
    fd = await trio.to_thread.run_sync(
        os.open, dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    ok = False
    try:
        async for block in blocks:
            await trio.to_thread.run_sync(write, fd, block)
        ok = True
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(os.close, fd)
            if not ok:
                await trio.to_thread.run_sync(dest.unlink, True)
