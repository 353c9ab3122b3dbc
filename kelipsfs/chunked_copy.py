"""The local copy of a file stored in chunks: fetched a chunk at a time, published by chunk.

The copy is a sparse spool file as long as the file. A chunk the manifest names is fetched
into it the first time a read (or a write that covers it only in part) needs it, with the
next few chunks when the reads go front to back, all at once from their holders; a hole is
never fetched (the spool reads zeros there). The chunks a write or truncate changed are
remembered, and a publish uploads only those -- a chunk that became all zeros becomes a hole
-- then the new manifest; the chunks it no longer names are retired (``daemon.chunks``). A
chunk changed only by a few small writes is not uploaded: the bytes written go in the manifest
as patches (``daemon.core.manifest``), until the patches outgrow their bounds and the most
patched chunks are uploaded whole again.

When another mount published the file since this copy's manifest, a publish re-uploads every
chunk instead of naming the older manifest's chunks: those are reclaimed once no manifest
names them, and this copy cannot know that the current one still does.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from pathlib import Path

import trio

from daemon.chunks import Chunks
from daemon.core.manifest import (
    CHUNK_SIZE,
    PATCH_CHUNK_MAX,
    PATCH_COUNT_MAX,
    PATCH_TOTAL_MAX,
    RUN_CHUNKS,
    ChunkRef,
    Manifest,
)
from daemon.core.messages import TupleEntry
from kelipsfs.local_copy import LocalCopy
from kelipsfs.upload_behind import UPLOAD_WINDOW, UploadBehind, data_chunks

log = logging.getLogger("kelipsfs.fuse")

#: Chunks fetched at once, ahead of a read that goes front to back.
READ_AHEAD = 16


class ChunkedCopy(LocalCopy):
    """A ``LocalCopy`` of a chunked file (see the module docstring)."""

    def __init__(self, name: str, ino: int, path: Path, fd: int, base: Manifest, *,
                 clock: int | None, chunks: Chunks, background: trio.Nursery | None = None,
                 changed: set[int] | None = None, dirty: bool = False, mtime_ns: int = 0,
                 following: int = 0, whole: bool = False) -> None:
        super().__init__(name, path, fd, spool=True, clock=clock, mtime_ns=mtime_ns,
                         dirty=False)
        self.dirty = dirty
        self.ino = ino
        self.base = base
        self._chunks = chunks
        #: Chunks whose bytes the spool holds (fetched, written, or cut by a truncate).
        self.present: set[int] = set(changed or ())
        #: Chunks changed since ``base``: uploaded (or made holes) by the next publish.
        self.changed: set[int] = set(changed or ())
        #: For a changed chunk only small writes touched: the spans of the file they wrote
        #: (sorted, apart), published as patches. A changed chunk not here goes up whole.
        self._spans: dict[int, list[tuple[int, int]]] = {}
        self._loading: dict[int, trio.Event] = {}
        self._behind = UploadBehind(ino, path, chunks, background, following=following,
                                    whole=whole)
        self._background = background
        self._closed = False
        self._next_read = -1  # where the last read ended: the next one there goes on in order

    @classmethod
    async def open(cls, name: str, ino: int, path: Path, base: Manifest, clock: int,
                   chunks: Chunks, background: trio.Nursery | None) -> ChunkedCopy:
        """A copy of the manifest ``base``: an empty sparse spool of the file's size."""
        def make() -> int:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            os.ftruncate(fd, base.size)
            return fd
        fd = await trio.to_thread.run_sync(make)
        return cls(name, ino, path, fd, base, clock=clock, chunks=chunks, background=background)

    @classmethod
    def adopt(cls, copy: LocalCopy, ino: int, chunks: Chunks,
              background: trio.Nursery | None = None, following: int = -1) -> ChunkedCopy:
        """Take over a whole file's spool copy grown past a chunk: every chunk is new.
        ``following``: where the write that made it grow began (the writes go on from
        there)."""
        path, fd = copy.hand_over()
        return cls(copy.name, ino, path, fd, Manifest(0), clock=copy.clock, chunks=chunks,
                   background=background, changed=data_chunks(fd), dirty=True,
                   mtime_ns=copy.mtime_ns, following=following, whole=True)

    def memory(self) -> bytes | None:
        return None

    def stored(self) -> int:
        """Bytes the content stores (holes excluded), as far as this copy knows: the
        manifest's, with each changed chunk counted whole (asked at every getattr of a file
        being written: the changed chunks only, not every chunk of the file)."""
        size = self.size()
        total = self.base.stored
        for index in self.changed:  # (a truncate marks every chunk it cut as changed)
            ref = self.base.chunks.get(index)
            total += max(0, min(CHUNK_SIZE, size - index * CHUNK_SIZE)) - (
                ref.extent if ref is not None else 0)
        return total

    # --- fetching -------------------------------------------------------------------------

    def _missing(self, offset: int, size: int) -> list[int]:
        end = min(offset + size, self.size())
        if end <= offset:
            return []
        return [i for i in range(offset // CHUNK_SIZE, (end - 1) // CHUNK_SIZE + 1)
                if i not in self.present and i in self.base.chunks]

    async def load(self, offset: int, size: int) -> None:
        """Fetch what a read of ``size`` bytes at ``offset`` needs (and the chunks after it
        when the reads go front to back)."""
        wanted = self._missing(offset, size)
        ahead: list[int] = []
        if offset == self._next_read or offset == 0:
            last = (offset + size) // CHUNK_SIZE
            ahead = [i for i in range(last + 1, last + 1 + READ_AHEAD)
                     if i not in self.present and i in self.base.chunks and i not in wanted]
        self._next_read = offset + size
        if self._background is None:
            wanted += ahead
        else:  # fetched while the reader goes on; a failure is met again by the read itself
            for index in ahead:
                if index not in self._loading:
                    self._background.start_soon(self._fetch_ahead, index)
        if wanted:
            await self._fetch(wanted)

    async def _fetch_ahead(self, index: int) -> None:
        with contextlib.suppress(OSError):
            await self._fetch_one(index)

    async def load_edges(self, offset: int, size: int) -> None:
        """Fetch what a write of [offset, offset + size) needs: the chunks it covers only in
        part, but those it may be laid over unfetched (``_overlay_fits``)."""
        await self._fetch([i for i in self._edges(offset, size)
                           if not self._overlay_fits(i, offset, size)])

    def _edges(self, offset: int, size: int) -> list[int]:
        """The stored chunks not here that [offset, offset + size) covers only in part."""
        if size <= 0:
            return []
        edges = {offset // CHUNK_SIZE, (offset + size - 1) // CHUNK_SIZE}
        return [i for i in sorted(edges)
                if i not in self.present and i in self.base.chunks
                and not (offset <= i * CHUNK_SIZE and (i + 1) * CHUNK_SIZE <= offset + size)]

    def _overlay_fits(self, index: int, offset: int, size: int) -> bool:
        """Whether a write of [offset, offset + size) may go into the spool over chunk
        ``index`` without fetching it first: the spans written since the manifest stay
        patch-sized, so the publish sends them as patches, and a read fetches the chunk
        then with them laid over it (``_fetch_one``)."""
        if index in self.changed and index not in self._spans:
            return False  # (changed whole: only a chunk that is here is)
        spans = list(self._spans.get(index, ()))
        start = max(offset, index * CHUNK_SIZE)
        end = min(offset + size, (index + 1) * CHUNK_SIZE)
        ref = self.base.chunks[index]
        return (_add_span(spans, start, end) and ref.patch_bytes
                + sum(e - s for s, e in spans) <= PATCH_CHUNK_MAX)

    async def load_all(self) -> None:
        await self._fetch([i for i in self.base.chunks if i not in self.present])

    async def load_cut(self, length: int) -> None:
        """Fetch the chunk a truncate to ``length`` cuts or extends in the middle."""
        end = min(length, self.size())
        if end % CHUNK_SIZE:
            await self._fetch(self._edges(end, 1))

    async def _fetch(self, indexes: list[int]) -> None:
        """Fetch ``indexes``, ``READ_AHEAD`` at once (OSError if one fails)."""
        failures: list[BaseException] = []
        window = trio.CapacityLimiter(READ_AHEAD)

        async def one(index: int) -> None:
            async with window:
                try:
                    await self._fetch_one(index)
                except OSError as exc:
                    failures.append(exc)

        async with trio.open_nursery() as nursery:
            for index in indexes:
                nursery.start_soon(one, index)
        if failures:
            raise failures[0]

    async def _fetch_one(self, index: int) -> None:
        loading = self._loading.get(index)
        if loading is not None:  # another read or write is fetching it: wait for that
            await loading.wait()
            if index not in self.present and index in self.base.chunks:
                raise OSError(errno.EIO, f"chunk {index} of inode {self.ino:x} not fetched")
            return
        ref = self.base.chunks.get(index)
        if ref is None or index in self.present:
            return
        done = self._loading[index] = trio.Event()
        try:
            data = await self._chunks.fetch(self.ino, ref)
            # Written only if nothing changed the chunk meanwhile (a write or truncate makes
            # it present and authoritative), and only the part the file still covers, the
            # spans written over it unfetched kept. On the event loop, not in a thread: a
            # close in between would leave a thread writing through a descriptor number a new
            # file may have been given by then.
            if not self._closed and index not in self.present and (
                    self.base.chunks.get(index) is ref):
                room = max(0, self.size() - index * CHUNK_SIZE)
                if room:
                    written = [(start, os.pread(self.fd, end - start, start))
                               for start, end in self._spans.get(index, ())]
                    os.pwrite(self.fd, data[:room], index * CHUNK_SIZE)
                    for start, kept in written:
                        os.pwrite(self.fd, kept, start)
                self.present.add(index)
        except OSError:
            raise
        except Exception as exc:
            log.warning("inode %x: %s", self.ino, exc)
            raise OSError(errno.EIO, str(exc)) from exc
        finally:
            del self._loading[index]
            done.set()

    # --- changes --------------------------------------------------------------------------

    def write(self, data: bytes, offset: int, append: bool, max_size: int) -> int:
        if append:
            offset = self.size()
        written = super().write(data, offset, False, max_size)
        self._touch(offset, written, spans=True)
        return written

    def truncate(self, length: int) -> None:
        old = self.size()
        super().truncate(length)
        self._drop_hash()  # (chunks are hashed one by one when published)
        if length < old:
            self._touch(length, old - length)
        elif length > old and old % CHUNK_SIZE:
            self._touch(old, 1)  # the old last chunk now reads zeros to its end

    def _touch(self, offset: int, size: int, spans: bool = False) -> None:
        """Mark what [offset, offset + size) covers changed; ``spans``: by a write, whose
        spans may become patches (a truncate changes its chunks whole)."""
        if size <= 0:
            return
        for index in range(offset // CHUNK_SIZE, (offset + size - 1) // CHUNK_SIZE + 1):
            if spans and (index not in self.changed or index in self._spans):
                start = max(offset, index * CHUNK_SIZE)
                end = min(offset + size, (index + 1) * CHUNK_SIZE)
                if not _add_span(self._spans.setdefault(index, []), start, end) and (
                        index in self.present):  # (kept while they are all it has here)
                    del self._spans[index]  # too much for patches: it goes up whole
            else:
                self._spans.pop(index, None)
            # A truncate leaves what it cut zeros and fetched the chunk it cuts in the
            # middle first (``load_cut``); a write that covers a chunk whole replaces it.
            if (not spans or index in self.present or index not in self.base.chunks
                    or (offset <= index * CHUNK_SIZE
                        and (index + 1) * CHUNK_SIZE <= offset + size)):
                self.present.add(index)
            else:  # laid over a chunk not fetched (``load_edges``): no run may read it
                self._behind.partial(index)
            self.changed.add(index)
            self._behind.changed(index)

    async def after_write(self, offset: int, written: int) -> None:
        await self._behind.wrote(offset, written)

    # --- publishing -----------------------------------------------------------------------

    async def publish(self, mtime_ns: int, latest_clock: int | None) -> TupleEntry:
        """Upload the changed chunks and the new manifest; ``latest_clock``: the version the
        cluster holds now (another than this copy's: every chunk goes up again)."""
        size = self.size()
        count = -(-size // CHUNK_SIZE)
        if latest_clock is not None and latest_clock != self.clock:
            await self._fetch([i for i in range(count) if i in self.base.chunks])
            self.changed.update(range(count))
            self._spans.clear()
        refs = {i: r for i, r in self.base.chunks.items() if i < count and i not in self.changed}
        ahead, uploaded = await self._behind.settle()
        window = trio.CapacityLimiter(UPLOAD_WINDOW)
        errors: list[BaseException] = []

        async def upload(first: int, number: int) -> None:
            async with window:
                span = min(number * CHUNK_SIZE, size - first * CHUNK_SIZE)
                data = await trio.to_thread.run_sync(os.pread, self.fd, span,
                                                     first * CHUNK_SIZE)
                try:
                    got, names = await self._chunks.upload_run(self.ino, first, data)
                except Exception as exc:
                    errors.append(exc)
                    return
                uploaded.update(names)
                refs.update((i, r) for i, r in got.items() if r is not None)

        todo: list[int] = []
        for index in sorted(i for i in self.changed if i < count):
            if index in ahead:  # uploaded while the writer went on
                if (ref := ahead[index]) is not None:
                    refs[index] = ref
            elif (patched := self._patched(index, size)) is not None:
                refs[index] = patched
            else:
                todo.append(index)
        if todo:  # (a chunk the spool has no data in is a hole)
            with_data = await trio.to_thread.run_sync(data_chunks, self.fd)
            todo = [index for index in todo if index in with_data]
        todo += await self._fold(refs)
        await self._fetch([i for i in todo if i not in self.present])
        if todo:
            async with trio.open_nursery() as nursery:
                for first, number in _runs(sorted(todo)):
                    nursery.start_soon(upload, first, number)
        manifest = Manifest(size, refs)
        try:
            if errors:
                raise errors[0]
            entry = await self._chunks.publish(self.ino, manifest, mtime_ns)
        except BaseException:  # what this publish uploaded is named by no manifest
            self._chunks.retire(self.ino, Manifest(0).unnamed(self.ino, self.base, uploaded))
            raise
        self._chunks.retire(self.ino, self.base.unnamed(self.ino, manifest, uploaded))
        self.base = manifest
        self.changed.clear()
        self._spans.clear()
        return entry

    def _patched(self, index: int, size: int) -> ChunkRef | None:
        """The chunk ``index`` with what small writes changed in it as patches, or None if
        it goes up whole."""
        spans = self._spans.get(index)
        if spans is None:
            return None
        start_of_chunk = index * CHUNK_SIZE
        changes = [(start - start_of_chunk, os.pread(self.fd, min(end, size) - start, start))
                   for start, end in spans if start < size]
        ref = self.base.chunks.get(index) or ChunkRef.patches_only(index, ())
        ref = ref.patched(changes)
        if not ref.patches and not ref.has_object:
            return None
        if ref.patch_bytes > PATCH_CHUNK_MAX or len(ref.patches) > PATCH_COUNT_MAX:
            return None
        return ref

    async def _fold(self, refs: dict[int, ChunkRef]) -> list[int]:
        """Keep the manifest's patches within ``PATCH_TOTAL_MAX``: past it, the most patched
        chunks (fetched first if this copy lacks them) leave ``refs`` to go up whole, until
        half of it is left. Their indexes."""
        total = sum(ref.patch_bytes for ref in refs.values() if ref.patches)
        if total <= PATCH_TOTAL_MAX:
            return []
        folded: list[int] = []
        for ref in sorted(refs.values(), key=lambda r: r.patch_bytes, reverse=True):
            if total <= PATCH_TOTAL_MAX // 2:
                break
            total -= ref.patch_bytes
            folded.append(ref.index)
        await self._fetch([i for i in folded if i not in self.present])
        for index in folded:
            del refs[index]
            self.changed.add(index)  # (if this publish fails, the next one uploads it)
            self._spans.pop(index, None)
        return folded

    def close(self) -> None:
        self._closed = True
        self._behind.abandon()
        super().close()

    def checksum(self) -> bytes:
        raise AssertionError("a chunked copy is published by chunk, not hashed whole")


def _add_span(spans: list[tuple[int, int]], start: int, end: int) -> bool:
    """Add [start, end) to the sorted, apart ``spans`` of one chunk; False once they are
    more than patches should carry."""
    kept = [(s, e) for s, e in spans if e < start or s > end]
    for s, e in spans:
        if not (e < start or s > end):
            start, end = min(start, s), max(end, e)
    kept.append((start, end))
    kept.sort()
    spans[:] = kept
    return (len(kept) <= PATCH_COUNT_MAX
            and sum(e - s for s, e in kept) <= PATCH_CHUNK_MAX)


def _runs(indexes: list[int]) -> list[tuple[int, int]]:
    """Sorted chunk indexes as runs of consecutive ones, at most RUN_CHUNKS long: (first,
    number)."""
    runs: list[tuple[int, int]] = []
    for index in indexes:
        if runs and runs[-1][0] + runs[-1][1] == index and runs[-1][1] < RUN_CHUNKS:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((index, 1))
    return runs
