"""Early writeback of files written front to back (sync_file_range, Linux).

Why: a put or a copy through the mount ends with an fsync of the whole file. Left alone, the
kernel starts writing dirty pages only after ~30 s or under memory pressure, so all of a
256 MiB file's disk writes happen inside that final fsync, after the last byte arrived. Asked
to start writing every ``WRITEBACK_EVERY`` bytes, the disk works while the data is still
arriving and the fsync only waits for the tail.
"""

from __future__ import annotations

import ctypes
import ctypes.util

#: Every this many bytes written front to back, the kernel is asked to start writing them out.
WRITEBACK_EVERY = 16 << 20
_SYNC_FILE_RANGE_WRITE = 2

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """sync_file_range(SYNC_FILE_RANGE_WRITE): begin writing the range out, do not wait.

    Only a hint: an error (a filesystem without it) changes nothing, the final fsync still
    writes and reports everything.
    """
    _libc.sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


def advance_writeback(fd: int, started: int, end: int) -> int:
    """The file holds bytes up to ``end`` and writeback was asked up to ``started``: ask for
    the rest when a full step is due. Returns how far writeback has now been asked."""
    if end - started >= WRITEBACK_EVERY:
        _start_writeback(fd, started, end - started)
        return end
    return started
