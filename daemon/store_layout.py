"""What the object store's modules share: the errors it raises, the version of an object it
holds, and how a version is named and recorded on disk.

Every object version a node holds lives under the store's ``root``::

    root/tmp/                                        in-flight writes; emptied at every start
    root/objects/<kk>/<key>-<clock>-<writer>.data    the content (absent for a tombstone)
    root/objects/<kk>/<key>-<clock>-<writer>.meta    JSON metadata; its presence commits it

``key`` is the hex SHA-1 of the UTF-8 name and ``kk`` its first two digits (256 fan-out
directories so none grows huge); ``clock`` is the version's clock as 16 hex digits and
``writer`` the writer id in hex. The user's name is never a path: names may contain '/', be
4 KiB long or hold any character; it only lives inside the metadata.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daemon.core.ids import NODE_ID_BYTES
from daemon.core.messages import Version
from daemon.record_log import LogRef
from daemon.store_files import unlink_quietly, write_all

#: Largest clock a version may carry (it is written as 16 hex digits in file names).
MAX_CLOCK = (1 << 64) - 1
#: Version of the metadata files. 1 recorded SHA-256 checksums; 2 records the content digest
#: (``daemon.digest``) of an object named by its path in the mount; 3 is a record of the
#: namespace (``daemon.core.inodes``: inodes, directory entries, file data) with its attrs.
#: Recovery converts version 1 in place (``daemon.store_recovery``) into version 2. Objects
#: named by path (legacy) become files of the namespace once the node has joined
#: (``daemon.namespace.migrate``).
META_FORMAT = 3
PATH_META_FORMAT = 2
SHA256_META_FORMAT = 1

_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
FILE_RE = re.compile(r"([0-9a-f]{40})-([0-9a-f]{16})-([0-9a-f]{40})\.(data|meta)")
FANOUT_RE = re.compile(r"[0-9a-f]{2}")


class StoreError(Exception):
    """The store could not do what was asked; the message names the object and the cause."""


class StoreFull(StoreError):
    """The filesystem ran out of space (ENOSPC) or quota (EDQUOT) while writing.

    Nothing partial is left visible and any older version of the object is untouched.
    """


class ChecksumMismatch(StoreError):
    """Bytes received (or read back) do not match the expected digest or size."""


class StaleVersion(StoreError):
    """The store already holds a newer version of the name than the one offered: ``held``.

    It travels with the refusal so that a writer whose version lost (a concurrent write,
    or its clock behind the other writer's) can stamp its next attempt above it."""

    def __init__(self, message: str, held: Version) -> None:
        super().__init__(message)
        self.held = held


def io_error(root: Path, exc: OSError, what: str) -> StoreError:
    """StoreFull for a full disk or quota, StoreError naming the cause for anything else."""
    reason = exc.strerror or str(exc)
    if exc.errno in _FULL_ERRNOS:
        return StoreFull(f"{what}: the filesystem of {root} is full ({reason}); "
                         "the write was abandoned and any older version is untouched")
    return StoreError(f"{what}: {reason}")


@dataclass(frozen=True, slots=True)
class StoredObject:
    """One committed version of a name, as its metadata file records it."""

    name: str
    version: Version
    size: int
    checksum: bytes  # digest of the content (of no bytes for a tombstone)
    mode: int
    mtime_ns: int
    tombstone: bool
    path: Path | None  # the content file; None for a tombstone
    #: The checksum was computed from the bytes as this process wrote them. False for what
    #: recovery found on disk at start: content a crash or the disk may have damaged since,
    #: which a local reader checks before trusting it (``kelipsfs.local_copy``).
    written_here: bool = field(default=False, compare=False)
    #: The record kind's own fields (``TupleEntry.attrs``).
    attrs: bytes = b""
    #: Where the content lies in the record log, for a record kept there (``path`` None).
    log: LogRef | None = field(default=None, compare=False)


def with_log(obj: StoredObject, ref: LogRef) -> StoredObject:
    """``obj`` kept in the record log at ``ref`` (``dataclasses.replace``, written out: it is
    on the path of every logged record)."""
    return StoredObject(obj.name, obj.version, obj.size, obj.checksum, obj.mode, obj.mtime_ns,
                        obj.tombstone, obj.path, obj.written_here, obj.attrs, ref)


def show(name: str) -> str:
    """A name for messages: repr (so odd characters stay visible), cut so 4 KiB does not flood."""
    text = repr(name)
    return text if len(text) <= 120 else text[:117] + "..."


def show_version(version: Version) -> str:
    return f"{version.clock}@{version.writer.hex()[:12]}"


def name_key(name: str) -> str:
    """SHA-1 hex of the name: the only form of the name that appears in file names.

    ``surrogatepass`` lets any Python str (even one with lone surrogates) hash deterministically.
    """
    return hashlib.sha1(name.encode("utf-8", "surrogatepass"), usedforsecurity=False).hexdigest()


def file_stem(key: str, version: Version) -> str:
    return f"{key}-{version.clock:016x}-{version.writer.hex()}"


def check_name(name: str) -> None:
    """Any str is a valid store name (naming rules are the daemon's); anything else is not."""
    if not isinstance(name, str):
        raise TypeError(f"an object name is a str, got {type(name).__name__}")


def check_version(version: Version) -> Version:
    """A well-formed Version (clock fits 64 bits, writer is a node id) or ValueError."""
    clock, writer = version
    if isinstance(clock, bool) or not isinstance(clock, int) or not 0 <= clock <= MAX_CLOCK:
        raise ValueError(f"a version clock is an integer in [0, 2**64), got {clock!r}")
    if not isinstance(writer, bytes) or len(writer) != NODE_ID_BYTES:
        raise ValueError(f"a version writer is a {NODE_ID_BYTES}-byte node id, got {writer!r}")
    return Version(clock, writer)


def version_files(objects: Path, name: str, version: Version) -> tuple[Path, Path]:
    """Where the (content, metadata) files of a version of ``name`` live under ``objects``."""
    key = name_key(name)
    stem = file_stem(key, check_version(version))
    directory = objects / key[:2]
    return directory / f"{stem}.data", directory / f"{stem}.meta"


def write_meta(tmp: Path, meta_path: Path, doc: dict[str, Any]) -> None:
    """Write the metadata to ``tmp``, fsync it, rename it into place (worker thread)."""
    payload = json.dumps(doc, ensure_ascii=True, separators=(",", ":")).encode("ascii")
    temp = tmp / f"{secrets.token_hex(16)}.meta"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        try:
            write_all(fd, payload)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, meta_path)
    except BaseException:
        unlink_quietly(temp)
        raise
