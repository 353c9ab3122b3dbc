"""Reading what the object store holds: a stream in worker threads, a small object whole on
the event loop (from the record log, the verified bytes kept in memory, or its file), and a
record of the log looked up again when a compaction moved it since it was taken.

Kept apart from ``daemon.store``, which owns the index and every change to it; a reader only
looks at the index (``StoreReader`` shares it and the log with the store).
"""

from __future__ import annotations

import functools
import io
import os
from collections.abc import AsyncIterator
from typing import BinaryIO

from daemon.digest import digest_of, new_hasher
from daemon.record_log import MovedRecord, RecordLog
from daemon.small_cache import SmallCache
from daemon.store_files import in_thread, open_read, read_hashed, shielded, stat_signature
from daemon.store_layout import ChecksumMismatch, StoredObject, StoreError, show, show_version

_SMALL_READ = 256 * 1024  # objects up to this size are read in one thread hop


class StoreReader:
    """The reads of one ``ObjectStore`` (its index, record log and small-object memory)."""

    def __init__(self, index: dict[str, StoredObject], log: RecordLog,
                 small: SmallCache) -> None:
        self._index = index
        self._log = log
        self._small = small

    def open_content(self, obj: StoredObject) -> BinaryIO:
        """Open the content of ``obj`` for reading; the caller closes it.

        Blocks for one open() (call it from a thread in async code, as ``read_chunks`` does).
        An open file stays readable even if a newer version replaces ``obj`` meanwhile; opening
        after that raises StoreError, and so does opening a tombstone.
        """
        if obj.log is not None:
            return io.BytesIO(self._logged(obj))
        if obj.tombstone or obj.path is None:
            raise StoreError(f"{show(obj.name)} is deleted (tombstone of version "
                             f"{show_version(obj.version)}): it has no content")
        try:
            return open_read(obj.path)
        except FileNotFoundError:
            raise StoreError(f"version {show_version(obj.version)} of {show(obj.name)} is no "
                             "longer stored (replaced by a newer version or dropped)") from None
        except OSError as exc:
            raise StoreError(f"cannot read {show(obj.name)}: {exc.strerror or exc}") from exc

    async def read_chunks(self, obj: StoredObject, chunk_size: int = 1 << 20, *,
                          offset: int = 0, verify: bool = True) -> AsyncIterator[bytes]:
        """Stream the content of ``obj`` from ``offset`` in chunks of at most ``chunk_size``.

        Exactly ``obj.size - offset`` bytes are read (a resumed transfer passes the offset it
        already has). With ``verify`` (the default) and a read from offset 0, the digest is
        checked as the bytes go by and ChecksumMismatch is raised after the last chunk if the
        file was damaged on disk, so the consumer can abort what it forwarded; a partial read
        cannot be hashed without re-reading the skipped prefix, so it only checks the length.
        """
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        if not 0 <= offset <= obj.size:
            raise ValueError(f"offset must be within 0..{obj.size}, got {offset}")
        if obj.log is not None:
            data = self._logged(obj)
            if verify and digest_of(data) != obj.checksum:
                raise ChecksumMismatch(f"the logged content of {show(obj.name)} does not match "
                                       "its checksum: it is corrupt")
            if data[offset:]:
                yield data[offset:]
            return
        if obj.size - offset <= min(chunk_size, _SMALL_READ):
            # Small objects (the common case for metadata-heavy work) in one thread hop.
            block = await in_thread(functools.partial(self._read_part, obj, offset,
                                                      obj.size - offset))
            if len(block) != obj.size - offset:
                raise ChecksumMismatch(
                    f"stored content of {show(obj.name)} (version "
                    f"{show_version(obj.version)}) is truncated on disk")
            if verify and offset == 0 and digest_of(block) != obj.checksum:
                raise ChecksumMismatch(
                    f"stored content of {show(obj.name)} (version {show_version(obj.version)}) "
                    "is corrupt: its digest no longer matches the one recorded at write time")
            if block:
                yield block
            return
        f = await in_thread(functools.partial(self.open_content, obj))
        try:
            if offset:
                await in_thread(functools.partial(f.seek, offset))
            hasher = new_hasher()
            remaining = obj.size - offset
            while remaining > 0:
                want = min(chunk_size, remaining)
                try:
                    block = await in_thread(functools.partial(read_hashed, f, want, hasher))
                except OSError as exc:
                    raise StoreError(f"cannot read {show(obj.name)}: "
                                     f"{exc.strerror or exc}") from exc
                if not block:
                    raise ChecksumMismatch(
                        f"stored content of {show(obj.name)} (version "
                        f"{show_version(obj.version)}) is truncated: "
                        f"{obj.size - remaining} of {obj.size} bytes on disk")
                remaining -= len(block)
                yield block
            if verify and offset == 0 and hasher.digest() != obj.checksum:
                raise ChecksumMismatch(
                    f"stored content of {show(obj.name)} (version {show_version(obj.version)}) "
                    "is corrupt: its digest no longer matches the one recorded at write time")
        finally:
            await shielded(f.close)

    async def read_range(self, obj: StoredObject, offset: int, length: int,
                         checksum: bytes | None = None) -> bytes:
        """``length`` bytes of the content of ``obj`` from ``offset``: not verified (a part
        cannot be checked against the whole's digest), unless the caller gives the part's
        own ``checksum`` (ChecksumMismatch if they do not match it: checked in the thread
        that read them)."""
        if not (offset >= 0 and length >= 0 and offset + length <= obj.size):
            raise ValueError(f"range {offset}+{length} is outside {show(obj.name)} "
                             f"({obj.size} bytes)")
        if obj.log is not None:
            return _part_checked(obj, self._logged(obj)[offset:offset + length], offset,
                                 length, checksum)
        return await in_thread(lambda: _part_checked(
            obj, self._read_part(obj, offset, length), offset, length, checksum))

    def read_small(self, obj: StoredObject, limit: int) -> bytes | None:
        """The whole verified content of a small object, read in the calling thread; None if
        it is larger than ``limit``, a tombstone, gone, unreadable or corrupt.

        For the one-datagram lookup, which answers from the event loop: one open() and read()
        of at most ``limit`` bytes (8 KiB) served from the page cache costs less than the
        thread hop ``read_chunks`` makes, and a reader that gets None simply falls back.
        What a put stored or a read verified is kept in memory (``daemon.small_cache``) and
        served instead of the file while ``obj`` is the index's entry for its name (a new
        version, a delete or a drop replaces the entry and forgets the bytes) and the file
        is unchanged since (one stat).
        """
        if obj.log is not None and not obj.tombstone and obj.size <= limit:
            try:
                data = self._logged(obj)
            except StoreError:
                return None
            return data if digest_of(data) == obj.checksum else None
        if obj.tombstone or obj.path is None or obj.size > limit:
            return None
        kept = self._small.get(obj)
        if kept is not None:
            return kept
        try:
            with self.open_content(obj) as fh:
                signature = stat_signature(os.fstat(fh.fileno()))
                data = fh.read(obj.size)
        except (StoreError, OSError):
            return None
        if len(data) != obj.size or digest_of(data) != obj.checksum:
            return None
        if self._index.get(obj.name) is obj:
            self._small.remember(obj, data, signature)
        return data

    def _logged(self, obj: StoredObject) -> bytes:
        """The content of a record of the log (on the event loop, where the log is
        compacted): where the index has it now if a compaction moved it since ``obj`` was
        taken; StoreError if that version is no longer held."""
        assert obj.log is not None
        try:
            return self._log.read(obj.log)
        except MovedRecord:
            current = self._index.get(obj.name)
            if current is None or current.version != obj.version or current.log is None:
                raise StoreError(f"version {show_version(obj.version)} of {show(obj.name)} "
                                 "is no longer stored (replaced by a newer version or "
                                 "dropped)") from None
            return self._log.read(current.log)

    def _read_part(self, obj: StoredObject, offset: int, length: int) -> bytes:
        with self.open_content(obj) as fh:
            if offset:
                fh.seek(offset)
            try:
                return fh.read(length)
            except OSError as exc:
                raise StoreError(f"cannot read {show(obj.name)}: "
                                 f"{exc.strerror or exc}") from exc


def _part_checked(obj: StoredObject, block: bytes, offset: int, length: int,
                  checksum: bytes | None) -> bytes:
    """``block``, read as bytes ``offset``..+``length`` of ``obj``, if it is whole and, given
    the part's own ``checksum``, matches it (ChecksumMismatch otherwise)."""
    if len(block) != length:
        raise ChecksumMismatch(f"stored content of {show(obj.name)} (version "
                               f"{show_version(obj.version)}) is truncated on disk")
    if checksum is not None and digest_of(block) != checksum:
        raise ChecksumMismatch(f"bytes {offset}+{length} of {show(obj.name)} do not match "
                               "their digest")
    return block
