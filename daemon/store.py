"""The on-disk object store of one node: versioned objects that survive kill -9 and a full disk.

``ObjectStore`` keeps the index of the newest version of every name, moves versions only
forward, and stores, reads, deletes and drops objects. Its parts live beside it: how a version
is named and recorded on disk, the stored object and the errors (``daemon.store_layout``); the
order in which a version's files are written, committed and removed, so that kill -9 at any
instant is safe (``daemon.store_commit``); the recovery at start that deletes what a crash left
behind (``daemon.store_recovery``); which objects go to the record log instead
(``daemon.store_log``); the verified bytes of small objects kept in memory
(``daemon.small_cache``); reading what is stored (``daemon.store_reads``).

The daemon is trio-based and its event loop also runs gossip, so every async method does its
blocking file I/O (open, write, fsync, rename, unlink, read) in ``trio.to_thread.run_sync``,
in batches of about 1 MiB so thread hops stay cheap; an object is never held in memory whole.
The small synchronous methods (``get``, ``names``, ``objects``, ``usage``, ``open_content``)
touch only the in-memory index, one statvfs or one open; the constructor runs recovery and
blocks, so the daemon builds the store in a worker thread.

Only the trio thread changes the index. Commits and deletions of one name are serialized by a
per-name lock; streaming the content happens outside it, so slow senders of different versions
do not wait on each other, and the version check is repeated under the lock before committing.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import secrets
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Callable
from pathlib import Path
from typing import BinaryIO

from daemon.core.keys import is_legacy, is_metadata
from daemon.core.messages import Version
from daemon.digest import DIGEST_SIZE, EMPTY_DIGEST, digest_of
from daemon.quick_lock import QuickLock, QuickLocks
from daemon.record_log import RecordLog
from daemon.small_cache import SMALL_CACHE_BYTES, SmallCache
from daemon.store_commit import (
    WRITE_BATCH,
    check_room,
    commit_version,
    fill,
    remove_version,
)
from daemon.store_files import (
    TempFile,
    fsync_dir,
    in_thread,
    link_synced,
    open_read,
    read_small_file,
    shielded,
    unlink_quietly,
)
from daemon.store_layout import (
    ChecksumMismatch,
    StaleVersion,
    StoredObject,
    StoreError,
    check_name,
    check_version,
    io_error,
    show,
    show_version,
    version_files,
    with_log,
)
from daemon.store_log import frame_of, gather, is_logged, logged_object
from daemon.store_reads import StoreReader
from daemon.store_recovery import recover

log = logging.getLogger("kelipsfs.store")

#: The record log is rewritten (compacted) when it is at least this large and superseded
#: frames fill more than half of it.
COMPACT_MIN = 32 << 20


class ObjectStore:
    """Versioned objects on local disk, newest version per name, crash- and ENOSPC-safe.

    Versions only move forward: a put or delete of a version lower than the one held raises
    StaleVersion, and one of exactly the held version returns what is held (a version names a
    single write, so whatever is held under it *is* that write).
    """

    def __init__(self, root: Path, small_cache_bytes: int = SMALL_CACHE_BYTES) -> None:
        """Open (creating if needed) the store at ``root`` and recover from any crash.

        Blocks on disk I/O (a directory scan and some unlinks): from trio, construct it with
        ``await trio.to_thread.run_sync(ObjectStore, root)``.
        """
        self.root = Path(root)
        self._objects = self.root / "objects"
        self._tmp = self.root / "tmp"
        self._index: dict[str, StoredObject] = {}
        self._live = 0
        self._bytes = 0
        self._legacy: set[str] = set()  # live objects named by path (``keys.is_legacy``)
        self._locks: QuickLocks[str] = QuickLocks()  # commits of a name, one at a time
        # name -> the verified bytes of the index's object for it; see read_small
        self._small = SmallCache(small_cache_bytes)
        self._frames: dict[str, int] = {}  # name -> size of its frame in the log
        self._log_turn = QuickLock()  # appends wait while the log is compacted
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            created = not (self._objects.is_dir() and self._tmp.is_dir())
            self._objects.mkdir(mode=0o700, exist_ok=True)
            self._tmp.mkdir(mode=0o700, exist_ok=True)
            if created:  # the fan-out directories are made durable by their first commit
                fsync_dir(self.root)
            self._log = RecordLog(self.root / "records.log")
            self._reads = StoreReader(self._index, self._log, self._small)
            for obj in recover(self.root, self._objects, self._tmp):
                self._install(obj)
            self._replay_log()
        except OSError as exc:
            raise StoreError(f"cannot open the object store at {self.root}: "
                             f"{exc.strerror or exc} ({exc.filename or self.root})") from exc

    # --- queries (in-memory index; no disk I/O except usage's statvfs) ---------------------

    def get(self, name: str) -> StoredObject | None:
        """The newest version held of ``name`` (a tombstone if deleted), or None."""
        return self._index.get(name)

    def objects(self) -> list[StoredObject]:
        """The newest held version of every name, tombstones included, sorted by name."""
        return [self._index[name] for name in sorted(self._index)]

    def legacy(self) -> list[StoredObject]:
        """The live objects named by their path, as an earlier version stored files."""
        return [self._index[name] for name in sorted(self._legacy)]

    def names(self, prefix: str = "") -> list[str]:
        """Sorted names of live (non-tombstone) objects starting with ``prefix``."""
        return sorted(name for name, obj in self._index.items()
                      if not obj.tombstone and name.startswith(prefix))

    def usage(self) -> tuple[int, int, int]:
        """(live objects, content bytes they hold, bytes free to this process on the filesystem).

        Objects are file contents and raw objects: the namespace's inode, entry and
        extended-attribute records are not counted. Tombstones count as neither objects nor
        bytes; free space is statvfs ``f_bavail``.
        """
        st = os.statvfs(self.root)
        return self._live, self._bytes, st.f_bavail * st.f_frsize

    def files_for(self, name: str, version: Version) -> tuple[Path, Path]:
        """Where the (content, metadata) files of a version of ``name`` live (tools, tests)."""
        return version_files(self._objects, name, version)

    # --- reads (``daemon.store_reads``) ----------------------------------------------------

    def open_content(self, obj: StoredObject) -> BinaryIO:
        """``StoreReader.open_content``."""
        return self._reads.open_content(obj)

    def read_chunks(self, obj: StoredObject, chunk_size: int = 1 << 20, *, offset: int = 0,
                    verify: bool = True) -> AsyncIterator[bytes]:
        """``StoreReader.read_chunks``."""
        return self._reads.read_chunks(obj, chunk_size, offset=offset, verify=verify)

    async def read_range(self, obj: StoredObject, offset: int, length: int,
                         checksum: bytes | None = None) -> bytes:
        """``StoreReader.read_range``."""
        return await self._reads.read_range(obj, offset, length, checksum)

    def read_small(self, obj: StoredObject, limit: int) -> bytes | None:
        """``StoreReader.read_small``."""
        return self._reads.read_small(obj, limit)

    # --- writes -------------------------------------------------------------------------------

    async def put(self, name: str, version: Version, mode: int, mtime_ns: int,
                  chunks: AsyncIterable[bytes],
                  expected_checksum: bytes | Callable[[], bytes] | None = None,
                  expected_size: int | None = None, attrs: bytes = b"",
                  trusted: bool = False) -> StoredObject:
        """Store ``version`` of ``name`` with the content streamed from ``chunks``.

        The content goes to a temp file (never whole in memory), is fsynced and checked against
        ``expected_checksum`` (digest) and ``expected_size``, then committed atomically (see
        ``daemon.store_commit``) and older versions of the name are removed.

        Raises StaleVersion if a newer version is held, ChecksumMismatch if the bytes do not
        match (a sender exceeding ``expected_size`` is cut off at once), StoreFull on ENOSPC /
        EDQUOT (also up front when ``expected_size`` exceeds the free space), StoreError on
        other I/O errors; in every failure the temp file is removed and what was held before
        is untouched. Errors raised by ``chunks`` itself propagate unchanged, with the same
        clean-up. If this exact version is already held, it is returned *without reading
        ``chunks``*: no bytes are pulled for data already on disk, and the caller, who owns
        the stream, closes it. That also holds when StaleVersion is raised before streaming.

        A callable ``expected_checksum`` is a digest known only once ``chunks`` has ended (it
        came after the body, ``peers.LateDigest``): called then, before the commit; whatever it
        raises propagates, with the same clean-up.

        ``trusted``: the caller computed ``expected_checksum`` itself from the bytes it
        streams, held in its memory (this node's own copy of its own write): they are not
        hashed again.
        """
        check_name(name)
        version = check_version(version)
        late = expected_checksum if callable(expected_checksum) else None
        early = expected_checksum if isinstance(expected_checksum, bytes) else None
        if early is not None and len(early) != DIGEST_SIZE:
            raise ValueError(f"expected_checksum must be a 32-byte content digest, "
                             f"got {len(early)} bytes")
        if expected_size is not None and expected_size < 0:
            raise ValueError(f"expected_size must not be negative, got {expected_size}")
        if trusted and early is None:
            raise ValueError("a trusted put needs the digest of its bytes")
        held = self._held(name, version, early)
        if held is not None:
            return held
        if expected_size is not None and is_logged(name, expected_size):
            return await self._put_logged(name, version, mode, mtime_ns, chunks, late, early,
                                          expected_size, attrs)
        if expected_size is not None:
            await check_room(self.root, name, expected_size)

        try:
            temp = await in_thread(functools.partial(TempFile, self._tmp, not trusted))
        except OSError as exc:
            raise io_error(self.root, exc, f"cannot start writing {show(name)}") from exc
        committed = False
        try:
            await fill(self.root, temp, name, chunks, expected_size)
            if expected_size is not None and temp.size != expected_size:
                raise ChecksumMismatch(f"{show(name)}: received {temp.size} bytes but "
                                       f"{expected_size} were announced; the data was discarded")
            checksum = temp.hasher.digest() if temp.hasher is not None else early
            assert checksum is not None
            want = late() if late is not None else early
            if want is not None and checksum != want:
                raise ChecksumMismatch(
                    f"{show(name)}: the received content has digest {checksum.hex()[:16]}..., "
                    f"not the expected {want.hex()[:16]}...; the data was discarded")
            obj, committed = await self._commit_temp(name, version, mode, mtime_ns, temp.size,
                                                     checksum, temp.path, want, attrs)
            if committed and temp.small is not None:  # (hashed above; installed by then)
                self._small.remember(obj, temp.small, temp.signature)
            return obj
        finally:
            if not committed:
                await shielded(temp.discard)

    async def _commit_temp(self, name: str, version: Version, mode: int, mtime_ns: int,
                           size: int, checksum: bytes, temp_path: Path,
                           expected_checksum: bytes | None, attrs: bytes
                           ) -> tuple[StoredObject, bool]:
        """Commit a verified, fsynced temp file under the name's lock; (object, committed).

        Not committed (the caller removes the temp file) when the same version was committed
        while the content was being written: that one is returned.
        """
        async with self._locks.hold(name):
            held = self._held(name, version, expected_checksum)
            if held is not None:
                return held, False
            previous = self._index.get(name)
            commit = functools.partial(commit_version, self._objects, self._tmp, name, version,
                                       mode, mtime_ns, size, checksum, temp_path, previous,
                                       attrs)
            try:
                obj = await in_thread(commit)
            except OSError as exc:
                raise io_error(self.root, exc, f"cannot commit {show(name)}") from exc
            self._install(obj)  # no checkpoint between the commit and the index update
        # A file's content is durable from here: so are the records logged before it (its
        # inode and name, on the nodes that hold them with it).
        await self.sync()
        return obj, True

    async def adopt_file(self, name: str, version: Version, mode: int, mtime_ns: int,
                         source: Path, size: int, checksum: bytes, attrs: bytes = b""
                         ) -> StoredObject:
        """Store ``version`` of ``name`` as a hard link to the local file ``source``: no copy.

        For a caller on this machine that wrote ``source`` itself, computed its digest from
        the bytes it wrote and never writes that inode again (the mount's spool copies itself
        before a later write): copying and re-hashing hundreds of MiB would double the cost of
        every write through the mount. The link is fsynced (the bytes may still be only in the
        page cache) and its size checked, then committed exactly like ``put``. Where a link is
        impossible (another file system, a link limit) it falls back to ``put_file``'s copy,
        checked against ``checksum``.
        """
        check_name(name)
        version = check_version(version)
        held = self._held(name, version, checksum)
        if held is not None:
            return held
        if is_logged(name, size):  # small: its bytes go to the log, no link
            try:
                data = read_small_file(source, size)  # from the page cache: no thread hop
            except OSError as exc:
                raise StoreError(f"cannot read {source}: {exc.strerror or exc}") from exc
            return await self._log_bytes(name, version, mode, mtime_ns, data, size, checksum,
                                         attrs)
        temp_path = self._tmp / f"{secrets.token_hex(16)}.part"
        try:
            linked = await in_thread(functools.partial(link_synced, source, temp_path))
        except OSError as exc:
            await shielded(functools.partial(unlink_quietly, temp_path))
            if exc.errno in (errno.EXDEV, errno.EMLINK, errno.EPERM):
                return await self.put_file(name, version, mode, mtime_ns, source,
                                           expected_checksum=checksum, expected_size=size,
                                           attrs=attrs)
            raise io_error(self.root, exc, f"cannot store {show(name)} from {source}") from exc
        committed = False
        try:
            if linked != size:
                raise ChecksumMismatch(f"{show(name)}: {source} has {linked} bytes, not the "
                                       f"{size} announced; nothing was stored")
            obj, committed = await self._commit_temp(name, version, mode, mtime_ns, size,
                                                     checksum, temp_path, checksum, attrs)
            return obj
        finally:
            if not committed:
                await shielded(functools.partial(unlink_quietly, temp_path))

    async def put_file(self, name: str, version: Version, mode: int, mtime_ns: int,
                       source: Path, expected_checksum: bytes | None = None,
                       expected_size: int | None = None, attrs: bytes = b"") -> StoredObject:
        """Store ``version`` of ``name`` with a copy of the local file ``source``.

        Same rules as ``put`` (the copy streams in 1 MiB blocks); if ``source`` cannot be read
        a StoreError naming it is raised and nothing is stored.
        """
        async def blocks() -> AsyncGenerator[bytes, None]:
            try:
                f = await in_thread(functools.partial(open_read, source))
            except OSError as exc:
                raise StoreError(f"cannot read {source}: {exc.strerror or exc}") from exc
            try:
                while True:
                    try:
                        block = await in_thread(functools.partial(f.read, WRITE_BATCH))
                    except OSError as exc:
                        raise StoreError(f"cannot read {source}: {exc.strerror or exc}") from exc
                    if not block:
                        return
                    yield block
            finally:
                await shielded(f.close)

        async with contextlib.aclosing(blocks()) as stream:
            return await self.put(name, version, mode, mtime_ns, stream,
                                  expected_checksum=expected_checksum,
                                  expected_size=expected_size, attrs=attrs)

    async def delete(self, name: str, version: Version, *, mtime_ns: int = 0) -> StoredObject:
        """Commit a tombstone for ``name`` at ``version`` and remove older versions' content.

        A tombstone is a version like any other (metadata only, size 0), so a stale put cannot
        resurrect the name; ``drop`` forgets it once it has expired. StaleVersion if a newer
        version is held; if exactly ``version`` is held, that is returned unchanged.
        """
        check_name(name)
        version = check_version(version)
        async with self._locks.hold(name):
            held = self._held(name, version, None)
            if held is not None:
                return held
            if is_logged(name, 0):
                return await self._append(StoredObject(
                    name, version, 0, EMPTY_DIGEST, 0, mtime_ns, True, None,
                    written_here=True), b"")
            previous = self._index.get(name)
            commit = functools.partial(commit_version, self._objects, self._tmp, name, version,
                                       0, mtime_ns, 0, EMPTY_DIGEST, None, previous, b"")
            try:
                obj = await in_thread(commit)
            except OSError as exc:
                raise io_error(self.root, exc,
                               f"cannot record the deletion of {show(name)}") from exc
            self._install(obj)
            return obj

    async def drop(self, name: str, *, version: Version | None = None) -> None:
        """Forget ``name`` entirely (tombstone expiry): its files go, durably.

        With ``version``, only that exact version is dropped, so a newer write that arrived
        after the caller decided to drop survives. Dropping an unknown name does nothing.
        """
        async with self._locks.hold(name):
            held = self._index.get(name)
            if held is None or (version is not None and held.version != version):
                return
            if held.log is not None:  # its frame is garbage now: compaction drops it
                self._uninstall(name)
                return
            try:
                await in_thread(functools.partial(remove_version, self._objects, held,
                                                  durable=True))
            except OSError as exc:
                raise io_error(self.root, exc, f"cannot drop {show(name)}") from exc
            self._uninstall(name)

    # --- the record log ---------------------------------------------------------------------

    async def _put_logged(self, name: str, version: Version, mode: int, mtime_ns: int,
                          chunks: AsyncIterable[bytes], late: Callable[[], bytes] | None,
                          early: bytes | None, size: int, attrs: bytes) -> StoredObject:
        data = await gather(name, chunks, size)
        return await self._log_bytes(name, version, mode, mtime_ns, data, size,
                                     late() if late is not None else early, attrs)

    async def _log_bytes(self, name: str, version: Version, mode: int, mtime_ns: int,
                         data: bytes, size: int, want: bytes | None, attrs: bytes
                         ) -> StoredObject:
        """Check ``data`` (``size`` bytes announced, digest ``want``) and log it."""
        if len(data) != size:
            raise ChecksumMismatch(f"{show(name)}: received {len(data)} bytes but {size} were "
                                   "announced; the data was discarded")
        checksum = digest_of(data)
        if want is not None and checksum != want:
            raise ChecksumMismatch(f"{show(name)}: the received content does not match its "
                                   "digest; the data was discarded")
        async with self._locks.hold(name):
            held = self._held(name, version, want)
            if held is not None:
                return held
            logged = await self._append(StoredObject(name, version, size, checksum, mode,
                                                     mtime_ns, False, None, written_here=True,
                                                     attrs=attrs), data)
        if not is_metadata(name):  # a file's content: durable before the put returns
            await self.sync()
        return logged

    async def _append(self, obj: StoredObject, content: bytes) -> StoredObject:
        """Log ``obj`` (call with its name's lock held): in the page cache at once, durable
        at the next ``sync``."""
        frame = frame_of(obj)
        async with self._log_turn:
            try:
                ref, size = self._log.append(frame, content)
            except OSError as exc:
                raise io_error(self.root, exc, f"cannot log {show(obj.name)}") from exc
        previous = self._index.get(obj.name)
        logged = with_log(obj, ref)
        self._install(logged)
        self._frames[obj.name] = size
        self._log.live += size
        if previous is not None and previous.log is None:  # a version stored as files
            await shielded(functools.partial(remove_version, self._objects, previous,
                                             durable=False))
        return logged

    async def sync(self) -> None:
        """Every record logged before the call is durable when it returns (StoreError if
        the disk refuses)."""
        if self._log.dirty:
            try:
                await self._log.sync()
            except OSError as exc:
                raise io_error(self.root, exc, "cannot make the record log durable") from exc

    async def maintain(self) -> None:
        """Make the log durable, and rewrite it when superseded frames fill most of it (a
        node calls this every second or so)."""
        await self.sync()
        log_ = self._log
        if log_.size < COMPACT_MIN or log_.live * 2 > log_.size:
            return
        async with self._log_turn:
            names = [name for name, obj in self._index.items() if obj.log is not None]
            objs = [self._index[name] for name in names]
            live = [(frame_of(o), log_.read(o.log) if o.log is not None else b"")
                    for o in objs]
            try:
                compacted = await in_thread(functools.partial(log_.compact, live))
            except OSError as exc:
                log.warning("could not compact the record log of %s: %s", self.root, exc)
                return
            log_.adopt(compacted)
            kept = 0
            for name, obj, (ref, size) in zip(names, objs, compacted.refs, strict=True):
                # (A name dropped meanwhile, or given a version kept as files, stays so.)
                if self._index.get(name) is obj:
                    self._index[name] = with_log(obj, ref)
                    self._frames[name] = size
                    kept += size
            log_.live = kept

    def _replay_log(self) -> None:
        """Install what the record log holds, newer versions over older ones (worker thread,
        at start, after the files' recovery)."""
        for frame, ref, size in self._log.replay():
            obj = logged_object(frame, ref)
            current = self._index.get(frame.name)
            if current is not None and current.version >= obj.version:
                continue
            if current is not None and current.log is None:
                remove_version(self._objects, current, durable=False)
            self._install(obj)
            self._frames[frame.name] = size
            self._log.live += size

    # --- internals ----------------------------------------------------------------------------

    def _held(self, name: str, version: Version,
              expected_checksum: bytes | None) -> StoredObject | None:
        """The held object if it *is* ``version``; None if ``version`` is newer; else raise."""
        held = self._index.get(name)
        if held is None or held.version < version:
            return None
        if held.version > version:
            raise StaleVersion(f"{show(name)}: version {show_version(version)} is older than "
                               f"the version {show_version(held.version)} already stored",
                               held.version)
        if (expected_checksum is not None and not held.tombstone
                and held.checksum != expected_checksum):
            raise ChecksumMismatch(
                f"{show(name)}: version {show_version(version)} is already stored with "
                f"digest {held.checksum.hex()[:16]}..., not {expected_checksum.hex()[:16]}...")
        return held

    def _install(self, obj: StoredObject) -> None:
        self._uninstall(obj.name)
        self._index[obj.name] = obj
        if not obj.tombstone:
            self._live += not is_metadata(obj.name)
            self._bytes += obj.size
            if is_legacy(obj.name):
                self._legacy.add(obj.name)

    def _uninstall(self, name: str) -> None:
        self._small.forget(name)
        self._log.live -= self._frames.pop(name, 0)
        old = self._index.pop(name, None)
        if old is not None and not old.tombstone:
            self._live -= not is_metadata(name)
            self._bytes -= old.size
        self._legacy.discard(name)
