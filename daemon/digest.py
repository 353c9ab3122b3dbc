"""The content digest: the one hash that names an object's bytes everywhere in kelipsfs.

Every copy of an object, every upload and download, the mount's local copies and the body of
every signed HTTP request are checked against this digest, so it is defined here once and
nowhere else.

It is BLAKE3 (32-byte output), not SHA-256. Why: a put of r = 3 copies hashes each byte four
times (the writer, to name the content; each holder, to verify what it commits) and a get once
more, so the hash was the largest single cost of a large transfer. Measured on these machines
(AMD EPYC, which has the SHA extensions OpenSSL uses): SHA-256 1.7 GB/s, BLAKE3 6.2 GB/s on one
core. SHA-256 was about 0.6 of the 1.8 CPU-seconds a 256 MiB put took on 2 cores. BLAKE3 is a
cryptographic hash (128-bit collision resistance), so a MAC over a body's BLAKE3 digest
authenticates the body as well as one over its SHA-256, and it releases the GIL while it hashes
(the daemon hashes in worker threads beside its event loop). Message authentication itself
stays HMAC-SHA256 (``daemon.security``): its inputs are small.

Stores written before the switch recorded SHA-256; ``daemon.store_recovery`` converts them at start.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import trio
from blake3 import blake3

#: Name recorded in on-disk metadata and shown to users.
ALGORITHM = "blake3"
#: Bytes of a digest (BLAKE3's default output length).
DIGEST_SIZE = 32
#: Bytes hashed on the event loop by ``digest_async`` (more go to a worker thread).
HASH_IN_LOOP = 64 << 10

Hasher = blake3
"""An incremental hasher: ``update(bytes)`` any number of times, then ``digest()``."""


def new_hasher() -> Hasher:
    """A fresh incremental hasher of the content digest."""
    return blake3()


def digest_of(data: bytes | bytearray | memoryview) -> bytes:
    """The content digest of bytes in memory."""
    return blake3(data).digest()


async def digest_async(data: bytes) -> bytes:
    """``digest_of`` from trio: in a worker thread when hashing would hold up the loop."""
    if len(data) <= HASH_IN_LOOP:
        return digest_of(data)
    return await trio.to_thread.run_sync(digest_of, data)


def file_digest(path: str | os.PathLike[str]) -> bytes:
    """The content digest of a file, read through a memory map (no copy into Python)."""
    hasher = blake3()
    hasher.update_mmap(os.fspath(path))
    return hasher.digest()


class Stopped(Exception):
    """``fd_digest`` was told to stop before the end (its result is no longer wanted)."""


def fd_digest(fd: int, size: int, block: int = 1 << 20,
              stop: Callable[[], bool] | None = None) -> bytes:
    """The content digest of the first ``size`` bytes of an open file, read with pread.

    For files that someone else may change while they are read (a user's file being uploaded):
    read into one reused buffer rather than through a memory map, because a file truncated
    under a map kills the process with SIGBUS, where a read simply comes back short.
    Raises EOFError if the file holds fewer than ``size`` bytes, and ``Stopped`` as soon as
    ``stop()`` is true (checked before each block: a caller whose upload failed does not
    wait for a large file to be read to the end).
    """
    hasher = blake3()
    buffer = bytearray(min(block, max(size, 1)))
    view = memoryview(buffer)
    offset = 0
    while offset < size:
        if stop is not None and stop():
            raise Stopped(f"stopped after {offset} of {size} bytes")
        got = os.preadv(fd, [view[:min(len(buffer), size - offset)]], offset)
        if got == 0:
            raise EOFError(f"the file ended after {offset} of {size} bytes")
        hasher.update(view[:got])
        offset += got
    return hasher.digest()


#: The digest of no bytes: what a tombstone and an empty body report.
EMPTY_DIGEST = digest_of(b"")
