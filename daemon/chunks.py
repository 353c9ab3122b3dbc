"""Chunked files on the data plane: chunks up and down, manifests, and reclaiming old chunks.

A large file's content record holds a manifest (``daemon.core.manifest``) and its bytes live
in chunk objects spread over the groups. This module moves them: ``upload`` stores one chunk
on its holders (fsynced on the write quorum, like any insert), ``fetch`` reads one back and
checks it against the digest the manifest gives, ``publish`` stores a manifest as the file's
content, and ``stream`` reads a whole file in order, a window of chunks at a time in parallel.

Chunks no manifest names any more -- replaced by a write, cut by a truncate, left by a
removed file or by an upload that never got its manifest published -- are reclaimed here:

* a writer that replaced chunks hands them to ``retire``: ``chunk_retire_grace`` seconds later
  (readers on other mounts that opened the older manifest keep finding them meanwhile) they
  are deleted if the file's current manifest does not name them;
* each node also sweeps the chunks it holds: a chunk whose inode is deleted is dropped once
  ``chunk_retire_grace`` old, one its current manifest does not name once ``ORPHAN_AGE`` old (an
  upload whose manifest is still to come is never that slow).

Only definite answers delete: a lookup that cannot reach the inode's group keeps the chunk.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Collection, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from daemon.core.inodes import clock_ns
from daemon.core.keys import CHUNK, data_name, inode_name
from daemon.core.manifest import (
    CHUNK_SIZE,
    RUN_CHUNKS,
    ChunkRef,
    Manifest,
    chunk_name,
    is_manifest,
    parse_chunk_name,
)
from daemon.core.messages import TupleEntry
from daemon.data_errors import ContentMismatch, DataError, NotFound
from daemon.digest import digest_of, new_hasher

if TYPE_CHECKING:
    from daemon.dataplane import Located, ObjectMeta
    from daemon.runtime import NodeRuntime

log = logging.getLogger("kelipsfs.data")

#: Age in seconds past which a chunk of a live file that its manifest does not name is an
#: orphan (an upload that crashed or lost to another writer).
ORPHAN_AGE = 3600.0
#: Seconds between two sweeps of the chunks this node holds.
SWEEP_PERIOD = 20.0
#: Inodes looked up per sweep (the rest wait for the next ones, in turn).
SWEEP_INODES = 64
#: Runs of a client's upload sent to their holders at once (each held in memory).
UPLOAD_RUNS = 2
#: Chunks read at once by ``stream``.
STREAM_WINDOW = 8


class ChunkMissing(DataError):
    """A chunk a manifest names is gone (reclaimed after the file was overwritten)."""


@dataclass
class _Retired:
    due: float
    ino: int
    names: frozenset[str]


def spread_reads(found: Located, index: int, me: bytes) -> None:
    """Order a chunk's holders for its read: this node first when it holds it (no
    transfer), else the live holders in turn by the chunk's index, so the chunks of one
    file come from all their holders at once rather than all from the nearest."""
    holders = found.holders
    if not holders or holders[0].node_id == me:
        return
    turn = index % len(holders)
    found.holders = holders[turn:] + holders[:turn]


def _digests(data: bytes) -> tuple[bytes, list[tuple[int, bytes]]]:
    """The digest of a run's object and (length, digest) of each of its chunks."""
    view = memoryview(data)
    parts = [view[start:start + CHUNK_SIZE] for start in range(0, len(data), CHUNK_SIZE)]
    return digest_of(data), [(len(part), digest_of(part)) for part in parts]


def _spanned(data: bytes, span: int) -> bytes:
    """A chunk's stored bytes as the ``span`` bytes of the file it covers (zeros after)."""
    return data + bytes(span - len(data)) if len(data) < span else data[:span]


def _is_zero(data: bytes, start: int, end: int) -> bool:
    if start >= end:
        return True
    if data[start] or data[end - 1]:  # (the common case, data: no scan)
        return False
    return data.count(0, start, end) == end - start


def _holes(data: bytes, first: int, count: int, with_data: Collection[int] | None
           ) -> list[bool]:
    """Which of the ``count`` chunks of ``data`` (chunk ``first`` on) are holes (worker
    thread: a scan of zeros costs a millisecond per chunk)."""
    return [(with_data is not None and first + lead not in with_data)
            or _is_zero(data, lead * CHUNK_SIZE, min(len(data), (lead + 1) * CHUNK_SIZE))
            for lead in range(count)]


class Chunks:
    """Chunks and manifests through one node (see the module docstring)."""

    def __init__(self, runtime: NodeRuntime) -> None:
        self._rt = runtime
        self._retired: list[_Retired] = []
        self._sweep_from = ""  # the next sweep starts after this inode's chunks

    # --- chunks ---------------------------------------------------------------------------

    async def upload(self, ino: int, first: int, data: bytes) -> list[ChunkRef]:
        """Store ``data`` as new chunks of ``ino`` from index ``first`` on, in one object (a
        run: every chunk whole but the last); acknowledged at the write quorum."""
        gen = secrets.randbits(64)
        whole, parts = await trio.to_thread.run_sync(_digests, data)
        refs = [ChunkRef(first + lead, gen, length, digest, lead)
                for lead, (length, digest) in enumerate(parts)]
        await self._rt.dataplane.writes.insert(chunk_name(ino, first, gen), data, len(data),
                                                whole, 0, time.time_ns())
        return refs

    async def upload_run(self, ino: int, first: int, data: bytes,
                         with_data: Collection[int] | None = None
                         ) -> tuple[dict[int, ChunkRef | None], set[str]]:
        """Upload ``data``, chunks ``first`` on (whole chunks but the last), as runs split at
        the chunks that are all zeros (holes: stored nowhere); (the refs by index, None for a
        hole; the objects uploaded). ``with_data``: the chunks the caller's sparse file has
        data in (the others are holes without a look at their bytes)."""
        count = -(-len(data) // CHUNK_SIZE)
        holes = await trio.to_thread.run_sync(_holes, data, first, count, with_data)
        refs: dict[int, ChunkRef | None] = {first + lead: None for lead in range(count)
                                            if holes[lead]}
        names: set[str] = set()
        lead = 0
        while lead < count:
            if holes[lead]:
                lead += 1
                continue
            end = lead
            while end < count and not holes[end]:
                end += 1
            last = data[(end - 1) * CHUNK_SIZE:end * CHUNK_SIZE]
            stop = (end - 1) * CHUNK_SIZE + len(last.rstrip(b"\0"))  # (zeros read back)
            try:
                uploaded = await self.upload(ino, first + lead, data[lead * CHUNK_SIZE:stop])
            except BaseException:
                self.retire(ino, names)  # (named by no manifest)
                raise
            refs.update((ref.index, ref) for ref in uploaded)
            names.add(uploaded[0].object_name(ino))
            lead = end
        return refs, names

    async def store_stream(self, ino: int, body: AsyncIterable[bytes], size: int,
                           checksum: bytes | Callable[[], bytes], mtime_ns: int
                           ) -> TupleEntry:
        """A client's upload of a file of ``size`` bytes, stored as chunks while it arrives
        (runs of ``RUN_CHUNKS``, ``UPLOAD_RUNS`` at a time), then its manifest as the content
        of ``ino``; ContentMismatch, and nothing named, if the bytes are not ``size`` long
        or do not hash to ``checksum`` (known once the body ended when it is a callable)."""
        run_bytes = RUN_CHUNKS * CHUNK_SIZE
        hasher = new_hasher()
        refs: dict[int, ChunkRef] = {}
        names: set[str] = set()
        errors: list[BaseException] = []
        window = trio.Semaphore(UPLOAD_RUNS)
        pending = bytearray()
        received = 0
        first = 0

        async def upload(at: int, data: bytes) -> None:
            try:
                got, uploaded = await self.upload_run(ino, at, data)
                names.update(uploaded)
                refs.update((i, r) for i, r in got.items() if r is not None)
            except Exception as exc:
                errors.append(exc)
            finally:
                window.release()

        try:
            async with trio.open_nursery() as nursery:
                async for block in body:
                    received += len(block)
                    if received > size:
                        raise ContentMismatch(f"inode {ino:x}: the upload sent more than the "
                                              f"{size} bytes announced; nothing was stored")
                    hasher.update(block)
                    pending += block
                    while len(pending) >= run_bytes or (received == size and pending):
                        data = bytes(pending[:run_bytes])
                        del pending[:run_bytes]
                        await window.acquire()
                        if errors:
                            raise errors[0]
                        nursery.start_soon(upload, first, data)
                        first += RUN_CHUNKS
            if errors:
                raise errors[0]
            want = checksum() if callable(checksum) else checksum
            if received != size or hasher.digest() != want:
                raise ContentMismatch(f"inode {ino:x}: the upload's {received} bytes do not "
                                      f"match its size ({size}) or digest; nothing was stored")
            return await self.publish(ino, Manifest(size, refs), mtime_ns)
        except BaseException:
            self.retire(ino, names)  # (named by no manifest)
            raise

    async def fetch(self, ino: int, ref: ChunkRef) -> bytes:
        """The bytes of a chunk (its patches laid over them), verified against the manifest's
        digest."""
        if not ref.has_object:
            return ref.apply(b"")
        name = ref.object_name(ino)
        try:
            plan = await self._rt.dataplane.read_plan(name)
            spread_reads(plan[0], ref.index, self._rt.node.node_id)
            data = await self._rt.dataplane.read_part(name, ref.offset(), ref.length,
                                                      ref.checksum, plan)
            return ref.apply(data)
        except NotFound as exc:
            raise ChunkMissing(f"{name}: chunk gone (the file was overwritten since it was "
                               f"opened)") from exc

    async def _read(self, name: str, plan: tuple[Located, bytes | None] | None = None
                    ) -> tuple[bytes, ObjectMeta]:
        meta, stream = await self._rt.dataplane.open_read(name, plan)
        data = b"".join([block async for block in stream])
        if len(data) != meta.size:
            raise DataError(f"{name}: short read")
        return data, meta

    # --- manifests ------------------------------------------------------------------------

    async def read_manifest(self, name: str, plan: tuple[Located, bytes | None] | None = None
                            ) -> tuple[Manifest, ObjectMeta]:
        """The manifest content record ``name`` holds now (``plan``: its lookup, made)."""
        data, meta = await self._read(name, plan)
        try:
            return Manifest.decode(data), meta
        except ValueError as exc:
            raise DataError(f"{name}: {exc}") from exc

    async def publish(self, ino: int, manifest: Manifest, mtime_ns: int) -> TupleEntry:
        """Store ``manifest`` as the content of ``ino`` (the write that finishes last stays)."""
        data = manifest.encode()
        entry: TupleEntry = await self._rt.dataplane.writes.insert(
            data_name(ino), data, len(data), digest_of(data), 0, mtime_ns,
            attrs=manifest.attrs())
        return entry

    async def stream(self, ino: int, manifest: Manifest) -> AsyncIterator[bytes]:
        """The file's bytes in order (holes as zeros), each chunk checked; up to
        ``STREAM_WINDOW`` chunks are fetched ahead of the one being sent, by a task of the
        node's background nursery (an async generator cannot hold a nursery across its
        yields), cancelled when the reader stops early."""
        count = manifest.count
        background = self._rt.background
        if background is None:
            raise DataError("the node is not running")
        got: dict[int, bytes | Exception] = {}
        ready = [trio.Event() for _ in range(count)]
        window = trio.Semaphore(STREAM_WINDOW)
        scope = trio.CancelScope()

        async def one(index: int) -> None:
            ref = manifest.chunks.get(index)
            try:
                got[index] = await self.fetch(ino, ref) if ref is not None else b""
            except Exception as exc:  # (handed to the reader: never raised in background)
                got[index] = exc
            ready[index].set()

        async def ahead() -> None:
            with scope:
                async with trio.open_nursery() as nursery:
                    for index in range(count):
                        await window.acquire()
                        nursery.start_soon(one, index)

        background.start_soon(ahead)
        try:
            for index in range(count):
                await ready[index].wait()
                data = got.pop(index)
                if isinstance(data, Exception):
                    raise data
                window.release()
                yield _spanned(data, manifest.span(index))
        finally:
            scope.cancel()

    async def stream_checked(self, ino: int, manifest: Manifest) -> AsyncIterator[bytes]:
        """The file's bytes (``stream``) and then their digest, ``DIGEST_SIZE`` bytes more: for
        a client that checks what it received as it does a whole object's, without the file
        gathered anywhere first (each chunk is checked here against its own digest)."""
        hasher = new_hasher()
        async for block in self.stream(ino, manifest):
            hasher.update(block)
            yield block
        yield hasher.digest()

    # --- reclaiming -----------------------------------------------------------------------

    @property
    def _grace(self) -> float:
        return self._rt.settings.chunk_retire_grace

    def retire(self, ino: int, names: Iterable[str]) -> None:
        """Chunks of ``ino`` a new manifest no longer names: deleted after ``chunk_retire_grace``
        unless the manifest current by then names them again."""
        names = frozenset(names)
        if names:
            self._retired.append(_Retired(self._rt.now() + self._grace, ino, names))

    async def loop(self) -> None:
        """Delete retired chunks when due, and sweep this node's own chunks."""
        period = min(SWEEP_PERIOD, max(1.0, self._grace))
        next_sweep = self._rt.now() + period
        while True:
            await trio.sleep(1.0)
            now = self._rt.now()
            due = [r for r in self._retired if r.due <= now]
            self._retired = [r for r in self._retired if r.due > now]
            for retired in due:
                await self._reclaim(retired.ino, retired.names, orphans_too=True)
            if now >= next_sweep:
                next_sweep = now + period
                await self.sweep()

    async def sweep(self) -> int:
        """One pass over (part of) the chunks this node stores; the number deleted."""
        by_ino: dict[int, list[str]] = {}
        grace_ns = int(self._grace * 1e9)
        now_ns = time.time_ns()
        store, node = self._rt.store, self._rt.node
        for name in store.names(CHUNK):
            parsed = parse_chunk_name(name)
            obj = store.get(name)
            entry = node.tuples.get(name)
            if parsed is None or obj is None or entry is None:
                continue
            live = {h.node_id for h in node.live_holders(entry)}
            first = next((nid for nid in entry.holders if nid in live), node.node_id)
            if first != node.node_id:
                continue  # its first live holder sweeps it
            if now_ns - clock_ns(obj.version.clock) >= grace_ns:
                by_ino.setdefault(parsed[0], []).append(name)
        order = sorted(by_ino)
        later = [ino for ino in order if f"{ino:016x}" > self._sweep_from]
        batch = (later + [ino for ino in order if ino not in set(later)])[:SWEEP_INODES]
        deleted = 0
        for ino in batch:
            self._sweep_from = f"{ino:016x}"
            deleted += await self._reclaim(ino, frozenset(by_ino[ino]), orphans_too=False)
        if len(batch) == len(order):
            self._sweep_from = ""
        return deleted

    async def _reclaim(self, ino: int, names: frozenset[str], *, orphans_too: bool) -> int:
        """Delete those of ``names`` (chunks of ``ino``) that nothing can read any more.

        ``orphans_too``: the caller knows they were replaced (a retired set): delete them
        once the current manifest does not name them, whatever their age."""
        try:
            keep = await self._still_named(ino)
        except DataError as exc:
            log.debug("chunks of inode %x kept: %s", ino, exc.message)
            return 0
        if keep is None:
            return 0
        doomed: list[str] = []
        orphan_ns = int(ORPHAN_AGE * 1e9)
        now_ns = time.time_ns()
        for name in names - keep.names:
            obj = self._rt.store.get(name)
            old = obj is not None and now_ns - clock_ns(obj.version.clock) >= orphan_ns
            if keep.inode_gone or orphans_too or old or obj is None:
                doomed.append(name)
        deleted = 0
        for name in doomed:
            try:
                await self._rt.dataplane.writes.delete(name)
                deleted += 1
            except NotFound:
                pass
            except DataError as exc:
                log.info("chunk %s not deleted yet: %s", name, exc.message)
        if deleted:
            self._rt.metrics.inc("kelips_chunks_reclaimed_total", deleted)
        return deleted

    async def _still_named(self, ino: int) -> _Named | None:
        """What of ``ino``'s chunks is still in use; None when that is not known for sure."""
        inode = await self._rt.dataplane.find(inode_name(ino))
        if inode is None:
            return None  # not reached, or never made: no definite answer
        if inode.tombstone:
            return _Named(frozenset(), inode_gone=True)
        content = await self._rt.dataplane.find(data_name(ino))
        # (no content record: a first upload still under way, or one that crashed -- the
        # inode's holders answered for the inode, and hold its content record too)
        if content is None or content.tombstone or not is_manifest(content.attrs):
            return _Named(frozenset(), inode_gone=False)
        manifest, _ = await self.read_manifest(content.name)
        return _Named(frozenset(manifest.names(ino)), inode_gone=False)


@dataclass(frozen=True)
class _Named:
    names: frozenset[str]
    inode_gone: bool
