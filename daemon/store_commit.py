"""How a version's files get on disk and go away again, in the order that keeps the store
whole whatever instant a kill -9 or a full disk strikes.

Commit order of a put (what makes kill -9 at any instant safe):

1. the content is streamed into ``tmp/<random>.part`` while digest and size are computed, then
   fsynced and checked against what the sender announced;
2. the temp file is renamed to ``<stem>.data`` (invisible: no metadata names it yet);
3. the metadata is written to ``tmp/``, fsynced and renamed to ``<stem>.meta``;
4. the fan-out directory is fsynced: the version is now committed and ``put`` may return;
5. only then are the files of the previous version removed (metadata first, then content).

A crash before 4 leaves the old version untouched (plus debris); a crash after 4 leaves the new
one committed, possibly next to the old; recovery at start (``daemon.store_recovery``) deletes
the debris and all but the newest committed version of each name.

``daemon.store`` decides what is committed (versions, per-name locks, the index); what is here
writes and removes the files of one version.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import AsyncIterable
from pathlib import Path

from daemon.core.messages import Version
from daemon.store_files import TempFile, fsync_dir, in_thread, unlink_quietly
from daemon.store_layout import (
    META_FORMAT,
    ChecksumMismatch,
    StoredObject,
    StoreFull,
    io_error,
    show,
    show_version,
    version_files,
    write_meta,
)

log = logging.getLogger("kelipsfs.store")

#: Bytes gathered from the sender before one write+hash batch is handed to a worker thread.
WRITE_BATCH = 1 << 20


async def check_room(root: Path, name: str, size: int) -> None:
    """Refuse at once a write that cannot fit, instead of after streaming it all."""
    try:
        st = await in_thread(functools.partial(os.statvfs, root))
    except OSError:
        return  # the write itself will tell
    free = st.f_bavail * st.f_frsize
    if size > free:
        raise StoreFull(f"not enough space to store {show(name)} in {root}: it needs "
                        f"{size} bytes and only {free} are free; nothing was written")


async def fill(root: Path, temp: TempFile, name: str, chunks: AsyncIterable[bytes],
               expected_size: int | None) -> None:
    """Stream ``chunks`` into ``temp`` in ~WRITE_BATCH thread hops, then fsync it (step 1)."""
    pending: list[bytes] = []
    pending_bytes = 0
    received = 0

    async def flush() -> None:
        nonlocal pending, pending_bytes
        blocks, pending, pending_bytes = pending, [], 0
        try:
            await in_thread(functools.partial(temp.write, blocks))
        except OSError as exc:
            raise io_error(root, exc, f"cannot store {show(name)} (after writing "
                                      f"{temp.size} bytes)") from exc

    async for item in chunks:
        raw: object = item
        if type(raw) is bytes:
            chunk = raw
        elif isinstance(raw, bytes | bytearray | memoryview):
            chunk = bytes(raw)  # a copy: the sender may reuse its buffer once resumed
        else:
            raise TypeError(f"content chunks must be bytes, got {type(raw).__name__}")
        if not chunk:
            continue
        received += len(chunk)
        if expected_size is not None and received > expected_size:
            raise ChecksumMismatch(f"{show(name)}: the sender sent more than the "
                                   f"{expected_size} bytes announced; the data was discarded")
        pending.append(chunk)
        pending_bytes += len(chunk)
        if pending_bytes >= WRITE_BATCH:
            await flush()
    if pending:
        await flush()
    try:
        await in_thread(temp.finish)
    except OSError as exc:
        raise io_error(root, exc, f"cannot store {show(name)} ({temp.size} bytes)") from exc


def commit_version(objects: Path, tmp: Path, name: str, version: Version, mode: int,
                   mtime_ns: int, size: int, checksum: bytes, content: Path | None,
                   previous: StoredObject | None, attrs: bytes) -> StoredObject:
    """Steps 2-5 of the commit order (worker thread). ``content`` None means a tombstone.

    On failure everything this call made visible is removed again before raising.
    """
    data_path, meta_path = version_files(objects, name, version)
    directory = data_path.parent
    if not directory.is_dir():
        directory.mkdir(mode=0o700, exist_ok=True)
        fsync_dir(objects)
    doc = {"format": META_FORMAT, "name": name, "clock": version.clock,
           "writer": version.writer.hex(), "size": size, "checksum": checksum.hex(),
           "mode": mode, "mtime_ns": mtime_ns, "tombstone": content is None,
           "attrs": attrs.hex()}
    try:
        if content is not None:
            os.replace(content, data_path)
        write_meta(tmp, meta_path, doc)
        fsync_dir(directory)
    except BaseException:
        unlink_quietly(meta_path)
        if content is not None:
            unlink_quietly(data_path)
        raise
    if previous is not None and previous.version != version:
        try:
            remove_version(objects, previous, durable=False)
        except OSError as exc:  # the new version is committed anyway; recovery retries
            log.warning("could not remove superseded version %s of %s: %s",
                        show_version(previous.version), show(name), exc.strerror or exc)
    return StoredObject(name, version, size, checksum, mode, mtime_ns, content is None,
                        None if content is None else data_path, written_here=True,
                        attrs=attrs)


def remove_version(objects: Path, obj: StoredObject, *, durable: bool) -> None:
    """Remove a version's files, metadata first so a crash never leaves meta without data.

    Raises OSError only if the metadata could not be removed (the version is then still
    committed); a content file left behind is an orphan that recovery deletes.
    """
    data_path, meta_path = version_files(objects, obj.name, obj.version)
    meta_path.unlink(missing_ok=True)
    unlink_quietly(data_path)
    if durable:
        fsync_dir(meta_path.parent)
