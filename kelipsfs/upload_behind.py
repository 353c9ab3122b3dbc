"""Chunks a front-to-back writer has finished, uploaded while it goes on writing.

``cp`` of a large file into the mount writes it front to back and closes it. Left to the
close, every chunk would go up only then, and the close would take as long as the whole
upload. A chunk the writer has written to its end and moved past is uploaded at once in the
background instead (at most ``UPLOAD_WINDOW`` at a time: a writer faster than the uploads
waits for them), so the close only uploads the last chunks and the manifest.

An upload is only a candidate until the publish names it: a chunk written again after its
upload read it is uploaded again by the publish, and the earlier upload, which no manifest
will name, is retired at once (``daemon.chunks``).
"""

from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import trio

from daemon.chunks import Chunks
from daemon.core.manifest import CHUNK_SIZE, ChunkRef, chunk_name

log = logging.getLogger("kelipsfs.fuse")

#: Chunks uploaded at once, in the background or by a publish.
UPLOAD_WINDOW = 8


@dataclass(eq=False)
class _Upload:
    done: trio.Event = field(default_factory=trio.Event)
    ref: ChunkRef | None = None
    hole: bool = False  # the chunk was all zeros: nothing to upload
    stale: bool = False  # changed after the upload read it
    failed: bool = False


class UploadBehind:
    """The background uploads of one chunked copy (see the module docstring)."""

    def __init__(self, ino: int, path: Path, chunks: Chunks,
                 background: trio.Nursery | None, *, following: int = -1) -> None:
        self._ino = ino
        self._path = path
        self._chunks = chunks
        self._background = background
        self._uploads: dict[int, _Upload] = {}
        self._window = trio.CapacityLimiter(UPLOAD_WINDOW)
        self._end = following  # where the last write ended

    async def wrote(self, offset: int, written: int) -> None:
        """A write of ``written`` bytes at ``offset`` happened: if it went on from the last
        one, upload the chunks it finished."""
        following = offset == self._end
        self._end = offset + written
        if not following or self._background is None:
            return
        for index in range(offset // CHUNK_SIZE, self._end // CHUNK_SIZE):
            if index not in self._uploads:
                upload = _Upload()
                await self._window.acquire_on_behalf_of(upload)
                self._uploads[index] = upload
                self._background.start_soon(self._run, index, upload)

    def changed(self, index: int) -> None:
        """Chunk ``index`` changed: what was uploaded of it is void."""
        upload = self._uploads.pop(index, None)
        if upload is not None:
            upload.stale = True
            self._retire(index, upload)

    async def settle(self) -> dict[int, ChunkRef | None]:
        """Wait for the uploads under way; the chunks uploaded as they are now (None: a
        hole). They belong to the publish that asked from then on."""
        for upload in list(self._uploads.values()):
            await upload.done.wait()
        uploads, self._uploads = self._uploads, {}
        return {index: upload.ref for index, upload in uploads.items()
                if not upload.stale and not upload.failed and (upload.ref or upload.hole)}

    def abandon(self) -> None:
        """The copy goes away unpublished: every upload is void."""
        for index in list(self._uploads):
            self.changed(index)

    def _retire(self, index: int, upload: _Upload) -> None:
        if upload.ref is not None:
            self._chunks.retire(self._ino, [chunk_name(self._ino, index, upload.ref.gen)])

    async def _run(self, index: int, upload: _Upload) -> None:
        try:
            data = await trio.to_thread.run_sync(_read_chunk, self._path, index)
            if not data:
                upload.hole = True
                return
            upload.ref = await self._chunks.upload(self._ino, index, data)
            if upload.stale:  # changed while it was sent
                self._retire(index, upload)
        except Exception as exc:  # the publish uploads it again and reports what fails then
            upload.failed = True
            log.debug("inode %x: chunk %d not uploaded ahead: %s", self._ino, index, exc)
        finally:
            upload.done.set()
            self._window.release_on_behalf_of(upload)


def _read_chunk(path: Path, index: int) -> bytes:
    """Chunk ``index`` of the spool file without its trailing zeros (worker thread)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise OSError(errno.ESTALE, f"the local copy is gone: {exc}") from exc
    try:
        return os.pread(fd, CHUNK_SIZE, index * CHUNK_SIZE).rstrip(b"\0")
    finally:
        os.close(fd)
