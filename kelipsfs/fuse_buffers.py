"""Zero-copy reads for the mount: libfuse reads the bytes from our file, not from Python.

With the plain ``read`` callback every 128 KiB the kernel asks for is read into a Python
``bytes`` and copied again by ctypes into libfuse's buffer: for a large file that is most of
the mount's CPU time. ``read_buf`` instead answers with a *descriptor and an offset*
(``FUSE_BUF_IS_FD | FUSE_BUF_FD_SEEK``); libfuse then preads (or splices) the range itself, in C,
and Python only decides which file. This module builds that answer.

libfuse frees the ``fuse_bufvec`` it receives with ``free()``, so it is allocated with the C
library's ``malloc``. mfusepy declares ``fuse_bufvec.buf`` as a pointer, but in ``fuse_common.h``
it is an inline array (``struct fuse_buf buf[1]``): the structure is declared here as libfuse
has it.

``tune_connection`` asks for 1 MiB requests (``max_write``; the kernel derives ``max_pages``
from it, which also bounds reads), so a large write costs an eighth of the callbacks (the
mount reports a 1 MiB ``st_blksize`` so ``cp`` and ``cat`` use buffers that large).
"""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import Any

import mfusepy

#: enum fuse_buf_flags
FUSE_BUF_IS_FD = 1 << 1
FUSE_BUF_FD_SEEK = 1 << 2
#: Largest request asked of the kernel (it grants at most 256 pages on Linux).
MAX_REQUEST = 1 << 20
#: fuse_common.h capability bits.
FUSE_CAP_SPLICE_WRITE = 1 << 7
FUSE_CAP_AUTO_INVAL_DATA = 1 << 12


class _Buf(ctypes.Structure):
    """struct fuse_buf (libfuse 3)."""

    _fields_ = [("size", ctypes.c_size_t), ("flags", ctypes.c_int), ("mem", ctypes.c_void_p),
                ("fd", ctypes.c_int), ("pos", ctypes.c_int64)]


class _BufVec(ctypes.Structure):
    """struct fuse_bufvec with its one inline buffer."""

    _fields_ = [("count", ctypes.c_size_t), ("idx", ctypes.c_size_t), ("off", ctypes.c_size_t),
                ("buf", _Buf * 1)]


_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.malloc.restype = ctypes.c_void_p
_libc.malloc.argtypes = [ctypes.c_size_t]


def answer_with_fd(bufpp: Any, fd: int, size: int, offset: int) -> None:
    """Fill ``*bufpp`` with "read ``size`` bytes of ``fd`` at ``offset``" (libfuse frees it)."""
    address = _libc.malloc(ctypes.sizeof(_BufVec))
    if not address:
        raise MemoryError("malloc of a fuse_bufvec failed")
    vec = _BufVec.from_address(address)
    vec.count, vec.idx, vec.off = 1, 0, 0
    buf = vec.buf[0]
    buf.size, buf.flags, buf.mem, buf.fd, buf.pos = (size, FUSE_BUF_IS_FD | FUSE_BUF_FD_SEEK,
                                                     None, fd, offset)
    bufpp[0] = ctypes.cast(address, mfusepy.fuse_bufvec_p)


def tune_connection(conn: Any) -> None:
    """At init (``conn`` is libfuse's fuse_conn_info): ask for large requests, let libfuse
    splice a ``read_buf`` answer from our file into /dev/fuse (no copy through its own buffer),
    and switch off ``auto_inval_data``.

    With attribute caching off (``attr_timeout=0``, see ``kelipsfs.mount``), auto_inval_data
    makes the kernel ask for the attributes before *every* read(2) to decide whether to drop
    the cached pages: a round trip into Python per 128 KiB, as many as the reads themselves.
    kelipsfs does not need it: every open fetches the current version, and an open without
    ``keep_cache`` already drops the file's cached pages (close-to-open consistency).
    """
    if conn is None:
        return
    conn.max_write = max(int(conn.max_write), MAX_REQUEST)
    want = int(conn.want) & ~FUSE_CAP_AUTO_INVAL_DATA
    conn.want = want | (int(conn.capable) & FUSE_CAP_SPLICE_WRITE)
