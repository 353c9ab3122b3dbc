"""The content of regular files, between the cluster and a mount's local files.

A file's bytes are the content record ``d/<ino>`` (``daemon.core.keys``), written whole at
every publish (the last writer wins) and read whole into a local file at open. ``fetch`` puts
the current version into a new local file (a hard link to this node's own store file when it
holds that version, else streamed from the nearest live holder, verified); ``publish`` stores a
local file as the new version on the inode's holders (acknowledged once the write quorum has it
fsynced). Disk work runs in worker threads, so the event loop never waits on the disk.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, cast

import trio

from daemon.chunks import Chunks
from daemon.core.keys import data_name
from daemon.core.manifest import Manifest, is_manifest
from daemon.core.messages import TupleEntry
from daemon.data_errors import NotFound, TransferFailed
from daemon.digest import file_digest
from daemon.store_files import stream_to_new_file, write_all

if TYPE_CHECKING:
    from daemon.dataplane import Located
    from daemon.runtime import NodeRuntime

log = logging.getLogger("kelipsfs.fuse")

#: Bytes gathered from a remote holder before one write to the local file.
FETCH_BATCH = 1 << 20


class Fetched(NamedTuple):
    """What was fetched into a local file."""

    size: int
    checksum: bytes
    clock: int
    #: A link to a store file this process did not write: check it while it is read.
    verify: bool = False
    #: The content itself, when it was asked for in memory (and no file was made).
    data: bytes | None = None
    #: The file is stored in chunks: its manifest (and no file was made).
    manifest: Manifest | None = None


def _write_new(dest: Path, data: bytes) -> None:
    """Write ``data`` to the new file ``dest`` (worker thread)."""
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        write_all(fd, data)
    finally:
        os.close(fd)


def _materialize(source: Path, dest: Path, checksum: bytes, link: bool) -> bool:
    """Make ``dest`` a copy of a local store file (worker thread); False if that failed.

    A hard link when ``link`` (no bytes copied: the store never writes a committed file
    again, and the link keeps the inode when the store replaces the version; its reads are
    checked as they go, ``kelipsfs.local_copy``); otherwise a real copy, verified now.
    """
    try:
        if link:
            os.link(source, dest)
            return True
        shutil.copyfile(source, dest)
        if file_digest(dest) == checksum:
            return True
        log.warning("local copy %s does not match its checksum; fetching instead", source)
    except OSError as exc:
        log.debug("cannot use the local copy %s: %s", source, exc)
    dest.unlink(missing_ok=True)
    return False


class Content:
    """Fetch and publish the content records of regular files through one node."""

    def __init__(self, runtime: NodeRuntime) -> None:
        self._rt = runtime

    async def fetch(self, ino: int, dest: Path, *, link_ok: bool,
                    in_memory: bool = False) -> Fetched | None:
        """Put the current content of ``ino`` into the new file ``dest``; None (and no file)
        if the inode has no content record yet (a file never written: empty). ``in_memory``:
        a small content of this node's record log is returned as ``data`` instead (no
        file)."""
        name = data_name(ino)
        store = self._rt.store
        obj = store.get(name)
        if obj is not None and not obj.tombstone and (obj.path is not None
                                                       or obj.log is not None):
            entry = await self._rt.dataplane.find(name)
            if entry is None or entry.tombstone:
                return None
            if is_manifest(entry.attrs):
                return await self._manifest(name)
            if obj.version >= entry.version:
                if obj.log is not None:  # a small content of the record log (checked)
                    data = store.read_small(obj, obj.size)
                    if data is not None and in_memory:
                        return Fetched(obj.size, obj.checksum, obj.version.clock, data=data)
                    if data is not None:
                        await trio.to_thread.run_sync(_write_new, dest, data)
                        return Fetched(obj.size, obj.checksum, obj.version.clock)
                elif obj.path is not None and await trio.to_thread.run_sync(
                        _materialize, obj.path, dest, obj.checksum, link_ok):
                    return Fetched(obj.size, obj.checksum, obj.version.clock,
                                   verify=link_ok and not obj.written_here)
        try:
            return await self._streamed(name, dest)
        except NotFound:
            return None
        except TransferFailed as exc:  # e.g. the copy read was replaced by a newer write
            log.info("%s; reading it again", exc.message)
            return await self._streamed(name, dest)

    async def _manifest(self, name: str, plan: tuple[Located, bytes | None] | None = None
                        ) -> Fetched:
        manifest, meta = await self._rt.chunks.read_manifest(name, plan)
        return Fetched(manifest.size, meta.checksum, meta.clock, manifest=manifest)

    async def _streamed(self, name: str, dest: Path) -> Fetched:
        plan = await self._rt.dataplane.read_plan(name)
        entry = plan[0].entry
        if entry is not None and not entry.tombstone and is_manifest(entry.attrs):
            return await self._manifest(name, plan)
        meta, stream_of = await self._rt.dataplane.open_read(name, plan)
        # An async generator (DataPlane._stream): closing it releases the holder's connection.
        chunks = cast(AsyncGenerator[bytes, None], stream_of)

        async def batched() -> AsyncIterator[bytes]:
            pending: list[bytes] = []
            size = 0
            async with contextlib.aclosing(chunks) as stream:
                async for chunk in stream:
                    pending.append(chunk)
                    size += len(chunk)
                    if size >= FETCH_BATCH:
                        yield b"".join(pending)
                        pending, size = [], 0
            if pending:
                yield b"".join(pending)

        await stream_to_new_file(dest, batched())
        return Fetched(meta.size, meta.checksum, meta.clock)

    @property
    def chunks(self) -> Chunks:
        return self._rt.chunks

    @property
    def background(self) -> trio.Nursery | None:
        """Where uploads that outlive a write request run."""
        return self._rt.background

    async def current(self, ino: int) -> TupleEntry | None:
        """The content record's tuple (None: never written, or removed)."""
        entry = await self._rt.dataplane.find(data_name(ino))
        return None if entry is None or entry.tombstone else entry

    async def publish(self, ino: int, source: Path | bytes, size: int, checksum: bytes,
                      mtime_ns: int) -> TupleEntry:
        """Store a local file this mount wrote and will not write again (``Writes.insert``'s
        ``link_ok``: the local copy copies itself before a later write), or a small content
        held in memory, as the content of ``ino``."""
        entry: TupleEntry = await self._rt.dataplane.writes.insert(
            data_name(ino), source, size, checksum, 0, mtime_ns, link_ok=True)
        return entry
