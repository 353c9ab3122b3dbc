"""The local copy of one file open on a mount: the bytes the FUSE callbacks read and write.

Every handle of one name on a mount shares one ``LocalCopy`` (see ``kelipsfs.fuse_ops``). A
*spool* copy is private and writable, and is inserted into the cluster at flush; a *cache*
copy is only read: bytes fetched from a holder, or a hard link to this node's own store file.

Two things keep large files fast without giving up verification:

* **Hashing as it is written.** An object's digest (``daemon.digest``) goes with every insert.
  ``cp`` writes a file front to back, so the copy hashes each write that extends its verified
  prefix, and the flush only finishes that hash instead of reading hundreds of MiB back. Any
  other write (a seek back, a hole, a truncate to a non-zero length) drops the running hash and
  the flush hashes the file once, as before.
* **Handing the spool to the store.** On a node that holds the object, the store keeps a hard
  link to the published spool file instead of a copy (``ObjectStore.adopt_file``). From then on
  the inode is the store's and must never change: the next write or truncate first moves this
  copy to a new file (copy on write). Descriptors of the old file stay open until the copy is
  closed, because another FUSE thread may be reading through one at that moment.
* **Checking while it is read.** A cache copy that is a link to this node's store file is not
  hashed before open returns (that would read the whole file before the first byte is
  served); a thread hashes it while the reader reads (libfuse copies the bytes straight from
  the descriptor, see ``kelipsfs.fuse_buffers``), and the read that reaches the end of the file
  waits for that check and fails with EIO if the content does not match its checksum. So a
  reader never reaches the end of a corrupt file without an error.
"""

from __future__ import annotations

import errno
import logging
import os
import queue
import secrets
import shutil
import threading
import time
from pathlib import Path

from daemon.digest import Stopped, fd_digest, file_digest, new_hasher
from daemon.writeback import advance_writeback

log = logging.getLogger("kelipsfs.fuse")

#: Bytes per read of the background check.
CHECK_BLOCK = 1 << 20
#: A write at least this large starts the copy's hashing thread (smaller ones hash inline).
HASH_THREAD_MIN = 256 * 1024
#: Seconds a descriptor replaced by copy on write stays open for a read already handed it.
RETIRED_GRACE = 5.0
#: At most this many are kept (each one outlived a publish since: long past any such read).
RETIRED_MAX = 16
#: Written blocks waiting for the hashing thread before a writer waits for it.
HASH_QUEUE_BLOCKS = 32
class CorruptCopy(OSError):
    """The local copy does not match the checksum it was stored with (an EIO to the reader)."""

    def __init__(self, name: str) -> None:
        super().__init__(errno.EIO, f"{name}: the local copy does not match its checksum")


class LocalCopy:
    """One name's local file and what is known about it (every method may block: FUSE thread).

    ``clock`` is the cluster version the content corresponds to (None: never inserted);
    ``dirty`` means the content or metadata changed since then.
    """

    def __init__(self, name: str, path: Path, fd: int, *, spool: bool, clock: int | None,
                 mtime_ns: int, dirty: bool, checksum: bytes | None = None,
                 size: int = 0, verify: bool = False, shared: bool = False) -> None:
        self.name = name
        self.path = path
        self.fd = fd
        self.spool = spool
        self.clock = clock
        self.mtime_ns = mtime_ns
        self.dirty = dirty
        self.unlinked = False  # deleted while open: keep serving the handles, never re-insert
        self.lock = threading.Lock()  # serializes writes against the insert that publishes them
        # Running digest of the prefix [0, _hashed) of a spool copy; None once lost.
        self._hasher: SequentialHash | None = SequentialHash() if spool and dirty else None
        self._hashed = 0
        self._written_out = 0  # the prefix already handed to advance_writeback
        self._shared = shared  # the inode is also the store's committed object
        #: (when, descriptor) of files replaced by copy on write, closed after RETIRED_GRACE
        self._retired: list[tuple[float, int]] = []
        # A cache copy linked to this node's store file is checked while it is read.
        self._size = size
        self._check = (_BackgroundCheck(fd, size, checksum, name)
                       if verify and checksum is not None else None)
        self._handed_over = False

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def memory(self) -> bytes | None:
        """The content, when it is held in memory (``kelipsfs.memory_copy``); else None."""
        return None

    # --- what a read or a change needs first (a chunked copy fetches it) ------------------

    async def load(self, offset: int, size: int) -> None:
        """Make the bytes a read of ``size`` at ``offset`` returns local (here: they are)."""

    async def load_edges(self, offset: int, size: int) -> None:
        """Make local what a write of ``size`` bytes at ``offset`` does not overwrite whole."""

    async def after_write(self, offset: int, written: int) -> None:
        """A write of ``written`` bytes at ``offset`` is done (a chunked copy may upload what
        it finished)."""

    async def load_all(self) -> None:
        """Make the whole content local."""

    async def load_cut(self, length: int) -> None:
        """Make local what a truncate to ``length`` keeps of a partly cut block."""

    def stored(self) -> int:
        """Bytes the content takes in the cluster (a chunked file's holes take none)."""
        return self.size()

    def hand_over(self) -> tuple[Path, int]:
        """Give the spool file and its descriptor to a new owner (``ChunkedCopy.adopt``):
        this copy no longer closes or removes them."""
        with self.lock:
            if self._check is not None:
                self._check.stop()
            self._drop_hash()
            for _, fd in self._retired:
                os.close(fd)
            self._retired.clear()
            path, fd = self.path, self.fd
            self.fd, self._handed_over = -1, True
            return path, fd

    # --- writes (spool copies) ------------------------------------------------------------

    def write(self, data: bytes, offset: int, append: bool, max_size: int) -> int:
        """pwrite ``data`` (at the end when ``append``); returns the bytes written."""
        with self.lock:
            self._unshare()
            if append:
                offset = os.fstat(self.fd).st_size
            if offset + len(data) > max_size:
                raise OSError(errno.EFBIG, os.strerror(errno.EFBIG))
            written = os.pwrite(self.fd, data, offset)
            if self._hasher is not None:
                if offset == self._hashed:
                    self._hasher.feed(data if written == len(data) else data[:written])
                    self._hashed += written
                    self._written_out = advance_writeback(self.fd, self._written_out,
                                                          self._hashed)
                else:
                    self._drop_hash()  # not a front-to-back write: hash at flush instead
            self.dirty = True
            self.mtime_ns = time.time_ns()
        return written

    def truncate(self, length: int) -> None:
        with self.lock:
            self._unshare()
            os.ftruncate(self.fd, length)  # sparse: a hole costs no memory and no disk
            if length == 0:
                self._drop_hash()
                self._hasher, self._hashed, self._written_out = SequentialHash(), 0, 0
            elif length < self._hashed:
                self._drop_hash()  # a longer file keeps its prefix: hashed whole at flush
            self.dirty = True
            self.mtime_ns = time.time_ns()

    def locked_checksum(self) -> bytes:
        """``checksum`` taking the lock itself (for a worker thread)."""
        with self.lock:
            return self.checksum()

    def checksum(self) -> bytes:
        """Digest of the whole content (call with ``lock`` held)."""
        if self._hasher is not None and self._hashed == os.fstat(self.fd).st_size:
            return self._hasher.digest()
        return file_digest(self.path)

    def _drop_hash(self) -> None:
        if self._hasher is not None:
            self._hasher.close()
            self._hasher = None

    def published(self, clock: int, linked: bool) -> None:
        """The content is now version ``clock``; ``linked``: the store may hold this inode
        (call with ``lock`` held)."""
        self.dirty = False
        self.clock = clock
        self._shared = self._shared or linked

    @property
    def shared(self) -> bool:
        """The next write or truncate copies the file first (``unshare``)."""
        return self._shared

    def unshare(self) -> None:
        """Copy on write, ahead of a write (a caller on an event loop runs it in a thread)."""
        with self.lock:
            self._unshare()

    def _unshare(self) -> None:
        """Copy on write: move to a private file before changing an inode the store holds."""
        if not self._shared:
            return
        fresh = self.path.with_name(f"{self.path.name.split('.')[0]}.{secrets.token_hex(4)}")
        shutil.copyfile(self.path, fresh)
        fd = os.open(fresh, os.O_RDWR | os.O_CLOEXEC)
        now = time.monotonic()
        # A reader in another thread may still be using the old descriptor (libfuse reads
        # from it right after ``readable_fd`` returned): closed once that moment is long past.
        self._retired.append((now, self.fd))
        while self._retired and (now - self._retired[0][0] > RETIRED_GRACE
                                 or len(self._retired) > RETIRED_MAX):
            os.close(self._retired.pop(0)[1])
        self.path.unlink(missing_ok=True)
        self.path, self.fd, self._shared = fresh, fd, False

    # --- reads ----------------------------------------------------------------------------

    def check_pending(self, size: int, offset: int) -> bool:
        """Whether ``readable_fd`` for this range would wait for the background check."""
        check = self._check
        return check is not None and offset + size >= self._size and not check.done

    def readable_fd(self, size: int, offset: int) -> int:
        """The descriptor to read ``size`` bytes at ``offset`` from, once it is safe to: a
        range that reaches the end of a copy still being checked waits for the check, and
        raises CorruptCopy (EIO) if the content does not match its checksum."""
        check = self._check
        if check is not None and offset + size >= self._size and not check.matches():
            raise CorruptCopy(self.name)
        return self.fd

    def read(self, size: int, offset: int) -> bytes:
        """``size`` bytes at ``offset`` (``readable_fd``'s wait and check included)."""
        return os.pread(self.readable_fd(size, offset), size, offset)

    def close(self) -> None:
        """Close every descriptor and remove the local file (the store keeps its own link)."""
        if self._handed_over:
            return
        if self._check is not None:
            self._check.stop()
        self._drop_hash()
        for fd in [self.fd, *(fd for _, fd in self._retired)]:
            os.close(fd)
        self._retired.clear()
        self.path.unlink(missing_ok=True)


class SequentialHash:
    """Digest of the bytes written front to back, hashed beside the writes.

    Hashing a MiB costs about as much as receiving it from the kernel; done inline it would
    double the time each write request holds the writer. Large writes go to a thread of their
    own (in order, through a bounded queue, so memory stays bounded), small ones are hashed
    inline until the first large one arrives.
    """

    def __init__(self) -> None:
        self._hasher = new_hasher()
        self._queue: queue.Queue[bytes | threading.Event | None] | None = None

    def feed(self, data: bytes) -> None:
        if self._queue is None and len(data) < HASH_THREAD_MIN:
            self._hasher.update(data)
            return
        if self._queue is None:
            self._queue = queue.Queue(HASH_QUEUE_BLOCKS)
            threading.Thread(target=self._run, args=(self._queue,), name="spool hash",
                             daemon=True).start()
        self._queue.put(data)

    def _run(self, blocks: queue.Queue[bytes | threading.Event | None]) -> None:
        while True:
            item = blocks.get()
            if item is None:
                return
            if isinstance(item, threading.Event):
                item.set()
            else:
                self._hasher.update(item)

    def digest(self) -> bytes:
        """The digest of everything fed so far (waits for the thread to catch up)."""
        if self._queue is not None:
            caught_up = threading.Event()
            self._queue.put(caught_up)
            caught_up.wait()
        return self._hasher.copy().digest()

    def close(self) -> None:
        if self._queue is not None:
            self._queue.put(None)
            self._queue = None


class _BackgroundCheck:
    """Digest of a file computed in a thread of its own, on a duplicate descriptor."""

    def __init__(self, fd: int, size: int, checksum: bytes, name: str) -> None:
        self._fd = os.dup(fd)
        self._size = size
        self._checksum = checksum
        self._name = name
        self._stopped = False
        self._ok = False
        self._done = threading.Event()
        threading.Thread(target=self._run, name=f"check {name}", daemon=True).start()

    def _run(self) -> None:
        try:
            found = fd_digest(self._fd, self._size, CHECK_BLOCK, stop=lambda: self._stopped)
            self._ok = found == self._checksum
            if not self._ok:
                log.error("%s: the local copy does not match its checksum", self._name)
        except EOFError:  # shorter than recorded
            log.error("%s: the local copy does not match its checksum", self._name)
        except Stopped:
            pass
        except OSError as exc:
            log.error("%s: cannot check the local copy: %s", self._name, exc)
        finally:
            os.close(self._fd)
            self._done.set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def matches(self) -> bool:
        """Wait for the result (at disk or page-cache speed, for the rest of the file)."""
        self._done.wait()
        return self._ok

    def stop(self) -> None:
        self._stopped = True
