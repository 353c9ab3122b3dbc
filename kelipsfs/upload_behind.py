"""Chunks a front-to-back writer has finished, uploaded while it goes on writing.

``cp`` of a large file into the mount writes it front to back and closes it. Left to the
close, every chunk would go up only then, and the close would take as long as the whole
upload. Each time the writer has finished ``RUN_CHUNKS`` chunks past the last run, they are
uploaded at once in the background as one run (one object, ``daemon.core.manifest``), at most
``UPLOAD_WINDOW`` runs at a time (a writer faster than the uploads waits for them), so the
close only uploads the last chunks and the manifest.

An upload is only a candidate until the publish names it: a chunk written again after its
upload read it is uploaded again by the publish, and the objects uploaded here that the
published manifest does not name are retired then (``daemon.chunks``).
"""

from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import trio

from daemon.chunks import Chunks
from daemon.core.manifest import CHUNK_SIZE, RUN_CHUNKS, ChunkRef

log = logging.getLogger("kelipsfs.fuse")

#: Runs uploaded at once, in the background or by a publish (each up to RUN_CHUNKS chunks
#: read into memory).
UPLOAD_WINDOW = 4


@dataclass(eq=False)
class _Upload:
    first: int
    count: int
    done: trio.Event = field(default_factory=trio.Event)
    refs: dict[int, ChunkRef | None] = field(default_factory=dict)  # None: a hole
    stale: set[int] = field(default_factory=set)  # changed after the upload read them
    failed: bool = False


class UploadBehind:
    """The background uploads of one chunked copy (see the module docstring)."""

    def __init__(self, ino: int, path: Path, chunks: Chunks,
                 background: trio.Nursery | None, *, following: int = 0,
                 whole: bool = False) -> None:
        """``following``: where a write goes on in order (a copy's first write at 0 does);
        ``whole``: the spool holds every chunk (a whole file's copy grown into chunks), so
        the first run may start before the first write it sees."""
        self._ino = ino
        self._path = path
        self._chunks = chunks
        self._background = background
        self._uploads: dict[int, _Upload] = {}  # by each chunk it covers
        self._names: set[str] = set()  # objects uploaded, not yet handed to a publish
        self._window = trio.CapacityLimiter(UPLOAD_WINDOW)
        self._end = following  # where the last write ended
        # the first finished chunk no run has taken yet (None: where the writer starts)
        self._run_from: int | None = 0 if whole else None
        self._abandoned = False

    async def wrote(self, offset: int, written: int) -> None:
        """A write of ``written`` bytes at ``offset`` happened: if it went on from the last
        one, upload the runs of chunks it finished."""
        following = offset == self._end
        self._end = offset + written
        if not following or self._background is None:
            self._run_from = None
            return
        start = offset // CHUNK_SIZE if self._run_from is None else self._run_from
        finished = self._end // CHUNK_SIZE
        while finished - start >= RUN_CHUNKS:
            if not any(i in self._uploads for i in range(start, start + RUN_CHUNKS)):
                upload = _Upload(start, RUN_CHUNKS)
                await self._window.acquire_on_behalf_of(upload)
                for index in range(start, start + RUN_CHUNKS):
                    self._uploads[index] = upload
                self._background.start_soon(self._run, upload)
            start += RUN_CHUNKS
        self._run_from = start

    def partial(self, index: int) -> None:
        """Chunk ``index`` was written without being fetched: the spool holds only what
        was written of it, so no run of the writer's may take it."""
        if self._run_from is None or self._run_from <= index:
            self._run_from = index + 1

    def changed(self, index: int) -> None:
        """Chunk ``index`` changed: what was uploaded of it is void."""
        upload = self._uploads.pop(index, None)
        if upload is not None:
            upload.stale.add(index)

    async def settle(self) -> tuple[dict[int, ChunkRef | None], set[str]]:
        """Wait for the uploads under way; the chunks uploaded as they are now (None: a
        hole), and every object uploaded. They belong to the publish that asked from then
        on: it retires the objects its manifest does not name."""
        for upload in set(self._uploads.values()):
            await upload.done.wait()
        uploads, self._uploads = self._uploads, {}
        names, self._names = self._names, set()
        self._run_from = None
        refs = {index: upload.refs[index] for index, upload in uploads.items()
                if not upload.failed and index not in upload.stale and index in upload.refs}
        return refs, names

    def abandon(self) -> None:
        """The copy goes away unpublished: every upload is void."""
        self._abandoned = True
        self._uploads.clear()
        self._retire_names()

    def _retire_names(self) -> None:
        names, self._names = self._names, set()
        self._chunks.retire(self._ino, names)

    async def _run(self, upload: _Upload) -> None:
        try:
            data, with_data = await trio.to_thread.run_sync(_read_run, self._path,
                                                            upload.first, upload.count)
            if with_data:
                refs, names = await self._chunks.upload_run(self._ino, upload.first, data,
                                                            with_data)
            else:  # (all holes: nothing read, nothing to store)
                refs = {i: None for i in range(upload.first, upload.first + upload.count)}
                names = set()
            upload.refs = refs
            self._names |= names
            if self._abandoned:  # gone while it was sent
                self._retire_names()
        except Exception as exc:  # the publish uploads it again and reports what fails then
            upload.failed = True
            log.debug("inode %x: chunks %d+%d not uploaded ahead: %s", self._ino, upload.first,
                      upload.count, exc)
        finally:
            upload.done.set()
            self._window.release_on_behalf_of(upload)


def _read_run(path: Path, first: int, count: int) -> tuple[bytes, set[int]]:
    """Chunks ``first`` .. ``first + count`` of the spool file, and which of them it has
    data in (worker thread); no bytes read when it has none (a run of holes)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise OSError(errno.ESTALE, f"the local copy is gone: {exc}") from exc
    try:
        with_data = data_chunks(fd, first, first + count)
        if not with_data:
            return b"", with_data
        return os.pread(fd, count * CHUNK_SIZE, first * CHUNK_SIZE), with_data
    finally:
        os.close(fd)


def data_chunks(fd: int, start: int = 0, end: int | None = None) -> set[int]:
    """The chunks of a sparse local file, from ``start`` to ``end`` (its last by default),
    that hold data: the holes the local filesystem reports are holes of the file, and never
    read."""
    size = os.fstat(fd).st_size
    stop = size if end is None else min(size, end * CHUNK_SIZE)
    found: set[int] = set()
    offset = start * CHUNK_SIZE
    while offset < stop:
        try:
            begin = os.lseek(fd, offset, os.SEEK_DATA)
            finish = os.lseek(fd, begin, os.SEEK_HOLE)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data after offset
                break
            return set(range(start, -(-stop // CHUNK_SIZE)))  # no SEEK_DATA here: all of it
        if begin >= stop:
            break
        found.update(range(begin // CHUNK_SIZE, (min(finish, stop) - 1) // CHUNK_SIZE + 1))
        offset = finish
    return found
