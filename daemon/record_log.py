"""The store's log of small records: appended to one file, made durable in groups.

A namespace operation writes a few records of a few dozen bytes each (an inode, an entry, its
directory). Stored as files of their own, each cost a temp file, three fsyncs, two renames and
as many hops to a worker thread; appended here, each costs one ``write`` to the page cache, and
one ``fdatasync`` makes every record appended before it durable (``sync``): whoever needs
durability waits for the next one, and callers that arrive while one runs share the one after.

Every frame is ``length u32 | crc32 u32 | payload``; the payload holds the record's fields
and its content (``Frame``). At start ``replay`` reads the frames back in order; a frame cut
short or failing its checksum (a crash in the middle of a write) ends the log there, and the
file is cut back to the last whole frame. Frames of superseded versions stay until ``compact``
rewrites the live ones into a new file (written, fsynced, renamed over the old one).

Blocking calls (``open``, ``replay``, ``compact``) run in worker threads; ``append`` and
``read`` touch only the page cache and are called on the event loop. ``fdatasync`` runs on the
event loop too while it is quick (the last one took at most ``INLINE_SYNC_MAX``): a hop to a
worker thread and back costs more than a quick sync, and one small file's close waits for one.
A slow one sends the next ones to a worker thread until one is quick again, so a slow disk
holds up the loop once, for one sync.
"""

from __future__ import annotations

import os
import struct
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import trio

_HEAD = struct.Struct(">II")  # payload length, crc32 of the payload
_NAME = struct.Struct(">H")
_FIXED = struct.Struct(">Q20sQIqB")  # clock, writer, size, mode, mtime_ns, tombstone
_SHORT = struct.Struct(">B")
_CONTENT = struct.Struct(">I")
#: Largest payload a frame may announce (a replayed length beyond it is a torn frame).
MAX_PAYLOAD = 4 << 20
#: Bytes allocated at a time past the end of the log.
PREALLOCATE = 4 << 20
#: Seconds an fdatasync may take for the next one to run on the event loop.
INLINE_SYNC_MAX = 0.002


class Frame(NamedTuple):
    """A record's fields as the log keeps them (its content travels beside)."""

    name: str
    clock: int
    writer: bytes
    size: int
    mode: int
    mtime_ns: int
    tombstone: bool
    checksum: bytes
    attrs: bytes


class LogRef(NamedTuple):
    """Where a record's content lies in the log: offset and length in the file of one
    ``generation`` (a compaction starts the next one, and moves every live record)."""

    offset: int
    length: int
    generation: int = 0


class MovedRecord(LookupError):
    """A reference taken before the log was compacted: the record is elsewhere now (or
    gone), and its holder must look it up again."""


class Compacted(NamedTuple):
    """A compacted log, written and renamed into place, not yet in use (``RecordLog.adopt``)."""

    fd: int
    size: int
    #: The new place of each live record's content and the size of its frame, in order.
    refs: list[tuple[LogRef, int]]


def encode(frame: Frame, content: bytes) -> tuple[bytes, int]:
    """The frame's bytes, and the offset of the content within them."""
    raw = frame.name.encode("utf-8")
    payload = b"".join([
        _NAME.pack(len(raw)), raw,
        _FIXED.pack(frame.clock, frame.writer, frame.size, frame.mode, frame.mtime_ns,
                    1 if frame.tombstone else 0),
        _SHORT.pack(len(frame.checksum)), frame.checksum,
        _SHORT.pack(len(frame.attrs)), frame.attrs,
        _CONTENT.pack(len(content))])
    head = _HEAD.pack(len(payload) + len(content), zlib.crc32(content, zlib.crc32(payload)))
    return head + payload + content, len(head) + len(payload)


def decode(payload: bytes) -> tuple[Frame, int, int]:
    """(frame, content offset within the payload, content length); ValueError if malformed."""
    try:
        (n,) = _NAME.unpack_from(payload, 0)
        at = _NAME.size
        name = payload[at:at + n].decode("utf-8")
        at += n
        clock, writer, size, mode, mtime_ns, tomb = _FIXED.unpack_from(payload, at)
        at += _FIXED.size
        (n,) = _SHORT.unpack_from(payload, at)
        checksum = payload[at + 1:at + 1 + n]
        at += 1 + n
        (n,) = _SHORT.unpack_from(payload, at)
        attrs = payload[at + 1:at + 1 + n]
        at += 1 + n
        (length,) = _CONTENT.unpack_from(payload, at)
        at += _CONTENT.size
    except (struct.error, UnicodeDecodeError) as exc:
        raise ValueError(f"malformed log frame: {exc}") from exc
    if at + length != len(payload):
        raise ValueError("malformed log frame: its content length does not add up")
    return Frame(name, clock, writer, size, mode, mtime_ns, bool(tomb), checksum, attrs), \
        at, length


class RecordLog:
    """One append-only file of records (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        """Open (creating) the log; blocks: construct it in a worker thread."""
        self.path = path
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._end = 0
        self._synced = 0  # everything before this offset is durable
        self._syncing: trio.Event | None = None
        self._quick = True  # the last fdatasync took at most INLINE_SYNC_MAX
        self.generation = 0  # of the file in use: one more at each compaction
        self._retired: list[int] = []  # descriptors of replaced files a sync still uses
        self.live = 0  # bytes of frames still holding a current record (kept by the store)

    @property
    def size(self) -> int:
        return self._end

    def replay(self) -> Iterator[tuple[Frame, LogRef, int]]:
        """Every whole frame in order: (frame, where its content is, the frame's size). A
        torn tail is cut off (blocks: from a worker thread, once, before any append)."""
        with open(self.path, "rb") as fh:
            data = fh.read()
        at = 0
        while at + _HEAD.size <= len(data):
            length, crc = _HEAD.unpack_from(data, at)
            start = at + _HEAD.size
            if length > MAX_PAYLOAD or start + length > len(data):
                break
            payload = data[start:start + length]
            if zlib.crc32(payload) != crc:
                break
            try:
                frame, offset, size = decode(payload)
            except ValueError:
                break
            yield frame, LogRef(start + offset, size, self.generation), _HEAD.size + length
            at = start + length
        if at != len(data):
            os.ftruncate(self._fd, at)
            os.fsync(self._fd)
        self._end = self._synced = self._allocated = at

    def append(self, frame: Frame, content: bytes) -> tuple[LogRef, int]:
        """Append a record (to the page cache: durable at the next ``sync``); where its
        content lies, and the frame's size."""
        data, offset = encode(frame, content)
        if self._end + len(data) > self._allocated:
            self._allocate(len(data))
        written = os.pwrite(self._fd, data, self._end)
        if written != len(data):
            raise OSError(28, "short write to the record log")  # ENOSPC in practice
        ref = LogRef(self._end + offset, len(content), self.generation)
        self._end += len(data)
        return ref, len(data)

    def _allocate(self, needed: int) -> None:
        """Allocate the file ``PREALLOCATE`` bytes past what the next append needs (where
        the file system cannot, the appends grow the file as they go)."""
        try:
            os.posix_fallocate(self._fd, self._end, needed + PREALLOCATE)
        except OSError:
            return
        self._allocated = self._end + needed + PREALLOCATE

    def read(self, ref: LogRef) -> bytes:
        """The content at ``ref``; MovedRecord if a compaction moved it since."""
        if ref.generation != self.generation:
            raise MovedRecord(f"record moved by a compaction of {self.path}")
        return os.pread(self._fd, ref.length, ref.offset) if ref.length else b""

    @property
    def dirty(self) -> bool:
        return self._synced < self._end

    async def sync(self) -> None:
        """Return once every record appended before the call is durable (one fdatasync,
        shared by every caller waiting for it; a compaction meanwhile made them durable in
        the new file)."""
        target, generation = self._end, self.generation
        while self.generation == generation and self._synced < target:
            if self._syncing is not None:
                await self._syncing.wait()
                continue
            self._syncing = done = trio.Event()
            upto, fd = self._end, self._fd
            try:
                started = time.perf_counter()
                if self._quick:
                    os.fdatasync(fd)
                else:
                    await trio.to_thread.run_sync(os.fdatasync, fd)
                self._quick = time.perf_counter() - started <= INLINE_SYNC_MAX
                if self.generation == generation:
                    self._synced = max(self._synced, upto)
            finally:
                self._syncing = None
                while self._retired:  # a file replaced by a compaction while this ran
                    os.close(self._retired.pop())
                done.set()

    def compact(self, live: list[tuple[Frame, bytes]]) -> Compacted:
        """Write a log of only ``live``, fsynced and renamed over this one (blocks: a worker
        thread, with no append meanwhile). Reads go on from the old file, still open, until
        ``adopt`` (on the event loop) switches to the new one: a read never meets a
        descriptor being swapped, and a reference taken before raises MovedRecord after."""
        generation = self.generation + 1
        fresh = self.path.with_suffix(".compact")
        fd = os.open(fresh, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        refs: list[tuple[LogRef, int]] = []
        at = 0
        try:
            chunks: list[bytes] = []
            for frame, content in live:
                data, offset = encode(frame, content)
                refs.append((LogRef(at + offset, len(content), generation), len(data)))
                chunks.append(data)
                at += len(data)
            os.pwrite(fd, b"".join(chunks), 0)
            os.fsync(fd)
            os.replace(fresh, self.path)
            dfd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except BaseException:
            os.close(fd)
            fresh.unlink(missing_ok=True)
            raise
        return Compacted(fd, at, refs)

    def adopt(self, compacted: Compacted) -> None:
        """Switch to a compacted log (on the event loop, with no append meanwhile)."""
        old, self._fd = self._fd, compacted.fd
        self.generation += 1
        self._end = self._synced = self._allocated = self.live = compacted.size
        if self._syncing is None:
            os.close(old)
        else:  # an fdatasync of it runs in a worker thread: closed when it ends
            self._retired.append(old)

    def close(self) -> None:
        os.close(self._fd)
        while self._retired:
            os.close(self._retired.pop())
