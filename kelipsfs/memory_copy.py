"""A small file's local copy held in memory: no spool file to create, write, read back and
remove for each small file a program makes or reads (``tar``, ``git``, ``grep -r``).

A new file and a small content of the record log start here. Writes and truncates change the
buffer while the content stays at most ``MEMORY_MAX`` bytes (the size the store logs whole);
the first change beyond puts the content in its spool file, and the copy goes on as a
``LocalCopy`` from then on (hashing sequential writes as they come). A publish hands the
store a snapshot of the bytes, so a later write never touches what the store holds.
"""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

from daemon.digest import digest_of
from daemon.store_files import write_all
from kelipsfs.local_copy import LocalCopy, SequentialHash

#: The largest content kept in memory: the size of the contents the store logs whole.
MEMORY_MAX = 64 << 10


class MemoryCopy(LocalCopy):
    """A ``LocalCopy`` whose content is a buffer until it outgrows ``MEMORY_MAX``."""

    def __init__(self, name: str, path: Path, data: bytes, *, clock: int | None,
                 checksum: bytes | None = None, dirty: bool = False,
                 mtime_ns: int = 0) -> None:
        # (dirty=False: no running hash for the base to start; the buffer is hashed whole)
        super().__init__(name, path, -1, spool=True, clock=clock, mtime_ns=mtime_ns,
                         dirty=False, checksum=checksum, size=len(data))
        self.dirty = dirty
        self._data: bytearray | None = bytearray(data)

    def memory(self) -> bytes | None:
        """A snapshot of the content while it is held in memory (None once in its file)."""
        return bytes(self._data) if self._data is not None else None

    def size(self) -> int:
        return len(self._data) if self._data is not None else super().size()

    def checksum(self) -> bytes:
        return digest_of(self._data) if self._data is not None else super().checksum()

    def read(self, size: int, offset: int) -> bytes:
        if self._data is not None:
            return bytes(self._data[offset:offset + size])
        return super().read(size, offset)

    def check_pending(self, size: int, offset: int) -> bool:
        return self._data is None and super().check_pending(size, offset)

    def write(self, data: bytes, offset: int, append: bool, max_size: int) -> int:
        buffer = self._data
        if buffer is None:
            return super().write(data, offset, append, max_size)
        with self.lock:
            if append:
                offset = len(buffer)
            end = offset + len(data)
            if end > max_size:
                raise OSError(errno.EFBIG, os.strerror(errno.EFBIG))
            if end <= MEMORY_MAX:
                if offset > len(buffer):  # a write past the end: the gap reads as zeros
                    buffer.extend(bytes(offset - len(buffer)))
                buffer[offset:end] = data
                self.dirty = True
                self.mtime_ns = time.time_ns()
                return len(data)
            self._spill()
        return super().write(data, offset, append, max_size)

    def truncate(self, length: int) -> None:
        buffer = self._data
        if buffer is None or length > MEMORY_MAX:
            if buffer is not None:
                with self.lock:
                    self._spill()
            super().truncate(length)
            return
        with self.lock:
            if length < len(buffer):
                del buffer[length:]
            else:
                buffer.extend(bytes(length - len(buffer)))
            self.dirty = True
            self.mtime_ns = time.time_ns()

    def published(self, clock: int, linked: bool) -> None:
        """In memory the store got a snapshot, never this buffer: nothing to copy on the
        next write."""
        super().published(clock, linked and self._data is None)

    def _unshare(self) -> None:
        if self._data is not None:
            self._spill()
        else:
            super()._unshare()

    def _spill(self) -> None:
        """Put the content in the spool file (call with ``lock`` held); a file from then on,
        hashed as written when it was written front to back."""
        assert self._data is not None
        data = bytes(self._data)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            write_all(fd, data)
        except BaseException:
            os.close(fd)
            self.path.unlink(missing_ok=True)
            raise
        hasher = SequentialHash()
        hasher.feed(data)
        self.fd, self._shared = fd, False
        self._drop_hash()
        self._hasher, self._hashed, self._written_out = hasher, len(data), 0
        self._data = None

    def close(self) -> None:
        if self._data is None:
            super().close()
