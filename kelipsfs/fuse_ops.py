"""The FUSE callbacks of ``kelipsfs mount``: POSIX file operations on top of the cluster.

Model
-----
* An object name is a relative path; a file ``/a/b.txt`` in the mount is the object ``a/b.txt``.
* Directories are prefixes: ``a`` is a directory when some object starts with ``a/``. ``mkdir``
  stores an empty marker object ``a/.kelipsfs-dir`` so an empty directory persists; the marker
  is never shown. Directory mode and ownership are fixed (0755, the mounting user).
* Files are whole objects. An open file is a local copy: reads come from a cache file fetched
  (verified) at open, writes go to a spool file that is inserted into the cluster when the file
  is flushed (close), fsynced or released. This is close-to-open consistency, as in AFS/NFS:
  every open looks up the current version, and every close publishes the new one, so a file
  written through one mount is seen by the next open on any other. A failed insert makes
  ``close`` fail (EIO, or ENOSPC when a holder's disk is full): a write is never silently lost.
* All handles of one name on this mount share one local copy, so a program that opens a file
  twice sees its own writes (local POSIX semantics) before they are published. A writer that
  opens a file handles here are reading (the current version) moves them onto its copy: the
  kernel keeps one page cache per file for all handles, so they must all read the same bytes.
  Only a reader of a version another mount has replaced since keeps that snapshot.

* ``rename`` copies the object under the new name and deletes the old one (for a directory,
  every object under it): it is not atomic, and a crash in the middle can leave both names.
  RENAME_NOREPLACE is honoured; RENAME_EXCHANGE is refused (EINVAL). ``chmod`` and ``utimens``
  store the object again with the new metadata (a file open for writing on this mount just
  takes it with its content at close). Directory modes are fixed (0755); owners are always the
  mounting user. O_EXCL is checked against the cluster at create time, not atomically across
  mounts. Names are those ``daemon.names`` accepts: a component over 255 bytes is
  ENAMETOOLONG, bytes that are not UTF-8 EILSEQ, and ``.kelipsfs-dir`` / ``.fuse_hidden*``
  are reserved (EPERM). docs/posix.md has the measured POSIX behaviour.

Extended attributes
-------------------
Read-only, in ``user.kelips.*``: on the root ``node_id``, ``group``, ``k``, ``members`` (one
JSON object per line: id, address, group, state, heartbeat, role) and ``contacts`` (JSON, per
group); on a file ``group``, ``version`` (clock:writer), ``holders`` (JSON list of id and
address) and ``checksum`` (the content digest, BLAKE3, in hex). A value longer than the
kernel's 64 KiB limit is offered as ``NAME.0``, ``NAME.1``, ... (cut at line ends) instead of
``NAME``. Writes are refused with EPERM (``user.kelips.*``) or ENOTSUP (anything else); an
unknown name is ENODATA, never ENOSYS (which would make the kernel switch xattrs off for the
whole mount).

Threads
-------
libfuse calls these methods from its own worker threads. Anything that touches the node (the
sans-I/O core, the data plane) is a method of ``kelipsfs.cluster_view.ClusterView``, run in the
node's trio thread through ``trio.from_thread.run`` with the captured ``trio_token``; local file
I/O on spool and cache files (``pread``, ``pwrite``, hashing) happens right here in the FUSE
thread, so large reads and writes never pass through trio and never block the gossip loop. The
trio side never takes a lock of this module, so a callback that holds one while it waits for
trio cannot deadlock.

Caching
-------
The kernel's attribute and entry caches are switched off by the mount (``attr_timeout=0``,
``entry_timeout=0``, see ``kelipsfs.mount``): with several mounts on one cluster, a size or a
name cached by the kernel would be wrong as soon as another mount changes the file, and the
kernel could not be told. File attributes and directory listings are therefore always asked
fresh (a stat of an own-group name is a local tuple lookup; a listing asks one contact per
group, and libfuse buffers it for the life of one ``opendir``). The one cache kept here is
"this name is a directory" (``DIR_TTL``, dropped at once by a local rmdir or rename): with
``entry_timeout=0`` the kernel looks up every directory of a path on every access, and proving
that a name is a directory (not an object) costs a lookup miss plus a listing. A directory
removed through another mount may still be seen here for that long.

The other one is the attributes a listing just returned (``LISTED_TTL``): ``ls -l`` and
``find`` stat every entry right after ``readdir``, and one cluster lookup per entry made
``ls -l`` of 1,000 files cost 0.8 s. For that long after a listing its size/mode/mtime answer
``getattr``; any change made through this mount drops them all at once, so only a change made
through another mount within that second can be seen late (NFS's attribute cache keeps 3-60 s).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import secrets
import stat
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

os.environ["FUSE_LIBRARY_NAME"] = "fuse3"  # mfusepy picks libfuse at import time

import mfusepy
import trio

from daemon.core.messages import TupleEntry
from daemon.dataplane import DataError, InsertFailed, NotFound
from daemon.digest import EMPTY_DIGEST
from daemon.names import MAX_COMPONENT_BYTES, MAX_NAME_BYTES, NameError_, validate_name
from kelipsfs.cluster_view import XATTR_PREFIX, ClusterView, DirInfo, Fetched
from kelipsfs.fuse_buffers import answer_with_fd, tune_connection
from kelipsfs.local_copy import CorruptCopy, LocalCopy

log = logging.getLogger("kelipsfs.fuse")

#: The object that keeps an (empty) directory in existence; hidden from listings.
DIR_MARKER = ".kelipsfs-dir"
#: libfuse renames a file unlinked while open to a name starting with this, and unlinks that
#: name at the last close (its default instead of ``hard_remove``, with which fstat fails).
HIDDEN_PREFIX = ".fuse_hidden"
#: utimensat's special nanosecond values, as libfuse 3 passes them (tv_sec 0).
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2
#: renameat2 flags (linux/fs.h).
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
#: Seconds a name found to be a directory is believed to stay one (see the module docstring).
DIR_TTL = 1.0
#: Seconds a listing's attributes of its entries answer getattr (see "Caching" above).
LISTED_TTL = 1.0
_LISTED_PRUNE_AT = 50_000
#: Preferred I/O size reported in st_blksize: tools like cp size their buffers from it.
IO_BLOCK = 1 << 20
DIR_MODE = stat.S_IFDIR | 0o755

_T = TypeVar("_T")


def _fail(code: int) -> mfusepy.FuseOSError:
    return mfusepy.FuseOSError(code)


# --- local state of the mount ----------------------------------------------------------------

class _Handle:
    def __init__(self, file: LocalCopy, writable: bool, append: bool) -> None:
        self.file = file
        self.writable = writable
        self.append = append
        #: A copy this handle read before a writer's copy replaced it (``_writer_copy``): kept
        #: open until the handle is released, as a read in another thread may still use it.
        self.retired: LocalCopy | None = None


class _NameLock:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.users = 0


# --- the callbacks ---------------------------------------------------------------------------

class KelipsOperations(mfusepy.Operations):  # type: ignore[misc]
    """The mfusepy operations of a kelipsfs mount (see the module docstring).

    Private state lives only in attributes starting with '_': mfusepy registers any attribute
    named like a FUSE operation as that operation.
    """

    use_ns = True  # times as integer nanoseconds
    flag_utime_omit_ok = 1  # let UTIME_OMIT/UTIME_NOW through (libfuse 2; libfuse 3 always does)

    def __init__(self, cluster: ClusterView, token: trio.lowlevel.TrioToken, *, spool_dir: Path,
                 cache_dir: Path, readonly: bool = False, max_size: int = 1 << 40) -> None:
        super().__init__()
        self._cluster = cluster
        self._token = token
        self._spool_dir = spool_dir
        self._cache_dir = cache_dir
        self._readonly = readonly
        self._max_size = max_size
        self._uid = os.getuid()
        self._gid = os.getgid()
        self._started_ns = time.time_ns()
        self._mutex = threading.Lock()  # guards the dicts below (never held across a call)
        self._files: dict[str, LocalCopy] = {}
        self._handles: dict[int, _Handle] = {}
        self._hidden: dict[str, LocalCopy] = {}  # files unlinked while open, by libfuse's name
        self._next_fh = 1
        self._name_locks: dict[str, _NameLock] = {}
        self._dirs: dict[str, tuple[float, int]] = {}  # name -> (expires, mtime_ns)
        # name -> (expires, size, mode, mtime_ns) from the last readdir
        self._listed: dict[str, tuple[float, int, int, int]] = {}
        self._empty = spool_dir / "empty"
        self._empty.touch()

    # --- plumbing ---------------------------------------------------------------------------

    def _call(self, fn: Callable[..., Awaitable[_T]], *args: Any) -> _T:
        """Run ``fn`` in the node's trio thread and translate its failure into an errno."""
        try:
            return trio.from_thread.run(fn, *args, trio_token=self._token)
        except BaseException as exc:
            raise self._errno(exc) from exc

    def _call_sync(self, fn: Callable[..., _T], *args: Any) -> _T:
        try:
            return trio.from_thread.run_sync(fn, *args, trio_token=self._token)
        except BaseException as exc:
            raise self._errno(exc) from exc

    @staticmethod
    def _errno(exc: BaseException) -> mfusepy.FuseOSError:
        if isinstance(exc, mfusepy.FuseOSError):
            return exc
        if isinstance(exc, NotFound):
            return _fail(errno.ENOENT)
        if isinstance(exc, InsertFailed):
            log.warning("insert failed: %s", exc.message)
            return _fail(errno.ENOSPC if exc.full else errno.EIO)
        if isinstance(exc, DataError):
            log.warning("cluster error: %s", exc.message)
            return _fail(errno.EIO)
        if isinstance(exc, trio.RunFinishedError | trio.Cancelled):
            return _fail(errno.EIO)  # the node is shutting down
        if isinstance(exc, OSError) and exc.errno:
            return _fail(exc.errno)
        if isinstance(exc, Exception):
            log.exception("unexpected error in a FUSE callback")
            return _fail(errno.EIO)
        raise exc  # KeyboardInterrupt, SystemExit: not ours to swallow

    @staticmethod
    def _name(path: str | None) -> str:
        """The object name of a mount path ('' for the root); errno for names we cannot store."""
        if path is None:
            raise _fail(errno.EBADF)
        rel = path.strip("/")
        if not rel:
            return ""
        raw = rel.encode("utf-8", "surrogateescape")
        if len(raw) > MAX_NAME_BYTES or any(len(p) > MAX_COMPONENT_BYTES
                                            for p in raw.split(b"/")):
            raise _fail(errno.ENAMETOOLONG)
        if raw.decode("utf-8", "replace") != rel:
            raise _fail(errno.EILSEQ)  # bytes that are not UTF-8: names are stored as UTF-8
        try:
            return validate_name(rel)
        except NameError_:
            raise _fail(errno.EINVAL) from None

    def _writable_name(self, path: str | None) -> str:
        if self._readonly:
            raise _fail(errno.EROFS)
        name = self._name(path)
        if not name:
            raise _fail(errno.EPERM)  # the root itself
        if name.rsplit("/", 1)[-1].startswith((DIR_MARKER, HIDDEN_PREFIX)):
            raise _fail(errno.EPERM)  # reserved: directory markers, libfuse's hidden files
        return name

    @contextlib.contextmanager
    def _locked(self, *names: str) -> Iterator[None]:
        """Serialize operations that change a name (sorted order: no lock cycles)."""
        keys = sorted(set(names))
        with self._mutex:
            entries = []
            for key in keys:
                entry = self._name_locks.get(key)
                if entry is None:
                    entry = self._name_locks[key] = _NameLock()
                entry.users += 1
                entries.append(entry)
        held: list[_NameLock] = []
        try:
            for entry in entries:
                entry.lock.acquire()
                held.append(entry)
            yield
        finally:
            for entry in reversed(held):
                entry.lock.release()
            with self._mutex:
                for key, entry in zip(keys, entries, strict=True):
                    entry.users -= 1
                    if entry.users == 0:
                        del self._name_locks[key]

    def _forget_dirs(self) -> None:
        """After a local rmdir or rename: directories believed to exist may be gone."""
        with self._mutex:
            self._dirs.clear()

    def _forget_listed(self) -> None:
        with self._mutex:
            self._listed.clear()

    def _change(self, fn: Callable[..., Awaitable[_T]], *args: Any) -> _T:
        """Every change made through this mount goes here: listed attributes may be off now."""
        self._forget_listed()
        return self._call(fn, *args)

    def _listed_attrs(self, name: str) -> dict[str, Any] | None:
        with self._mutex:
            known = self._listed.get(name)
        if known is None or known[0] <= time.monotonic():
            return None
        _, size, mode, mtime_ns = known
        return self._base_attrs(stat.S_IFREG | (mode & 0o7777), 1, size, mtime_ns)

    def _remember_dir(self, name: str, mtime_ns: int) -> None:
        with self._mutex:
            self._dirs[name] = (time.monotonic() + DIR_TTL, mtime_ns)

    def _known_dir(self, name: str) -> DirInfo | None:
        with self._mutex:
            known = self._dirs.get(name)
        if known is None or known[0] <= time.monotonic():
            return None
        return DirInfo(known[1])

    def _local_busy(self, name: str) -> LocalCopy | None:
        with self._mutex:
            f = self._files.get(name)
        return f if f is not None and f.busy else None

    def _kind(self, name: str) -> TupleEntry | DirInfo | LocalCopy | None:
        """What ``name`` is right now: a local busy copy, a file tuple, a directory, nothing."""
        local = self._local_busy(name)
        if local is not None:
            return local
        with self._mutex:
            hidden = self._hidden.get(name)
        if hidden is not None:
            return hidden
        known = self._known_dir(name)
        if known is not None:
            return known
        kind = self._call(self._cluster.kind, name)
        if isinstance(kind, DirInfo):
            self._remember_dir(name, kind.mtime_ns)
        return kind

    # --- attributes -------------------------------------------------------------------------

    def _base_attrs(self, mode: int, nlink: int, size: int, mtime_ns: int) -> dict[str, Any]:
        return {"st_mode": mode, "st_nlink": nlink, "st_size": size, "st_uid": self._uid,
                "st_gid": self._gid, "st_mtime": mtime_ns, "st_atime": mtime_ns,
                "st_ctime": mtime_ns, "st_blocks": (size + 511) // 512, "st_blksize": IO_BLOCK}

    def _dir_attrs(self, mtime_ns: int) -> dict[str, Any]:
        return self._base_attrs(DIR_MODE, 2, 0, mtime_ns)

    def _file_attrs(self, f: LocalCopy) -> dict[str, Any]:
        size = f.size()
        return self._base_attrs(stat.S_IFREG | f.mode, 1, size, f.mtime_ns)

    def getattr(self, path: str | None, fh: int | None = None) -> dict[str, Any]:
        if fh is not None:
            handle = self._handles.get(fh)
            if handle is not None:
                return self._file_attrs(handle.file)
        name = self._name(path)
        if not name:
            return self._dir_attrs(self._started_ns)
        if name.rsplit("/", 1)[-1] == DIR_MARKER:
            raise _fail(errno.ENOENT)
        if self._local_busy(name) is None:
            listed = self._listed_attrs(name)
            if listed is not None:
                return listed
        kind = self._kind(name)
        if kind is None:
            raise _fail(errno.ENOENT)
        if isinstance(kind, LocalCopy):
            return self._file_attrs(kind)
        if isinstance(kind, DirInfo):
            return self._dir_attrs(kind.mtime_ns)
        return self._base_attrs(stat.S_IFREG | (kind.mode & 0o7777), 1, kind.size,
                                kind.mtime_ns)

    def readdir(self, path: str | None, fh: int) -> list[Any]:
        name = self._name(path)
        prefix = name + "/" if name else ""
        children: dict[str, bool] = {}  # name -> is a directory
        dir_mtimes: dict[str, int] = {}
        files: dict[str, tuple[int, int, int]] = {}
        for item in self._call(self._cluster.listing, prefix):
            rest = str(item["name"])[len(prefix):]
            head, sep, _ = rest.partition("/")
            if sep:
                children.setdefault(head, True)
                dir_mtimes[head] = max(dir_mtimes.get(head, 0), int(item["mtime_ns"]))
            elif rest != DIR_MARKER:
                children[head] = False  # a file wins over a same-named prefix, as in getattr
                files[head] = (int(item["size"]), int(item["mode"]), int(item["mtime_ns"]))
        with self._mutex:
            local = [n for n, f in self._files.items() if f.busy and n.startswith(prefix)]
        for other in local:
            head, sep, _ = other[len(prefix):].partition("/")
            children[head] = bool(sep) and children.get(head, True)
        # ls -l, find... look up every entry next: spare them proving each directory again
        expires = time.monotonic() + DIR_TTL
        listed_until = time.monotonic() + LISTED_TTL
        with self._mutex:
            for child, mtime_ns in dir_mtimes.items():
                if children[child]:
                    self._dirs[prefix + child] = (expires, mtime_ns)
            if len(self._listed) > _LISTED_PRUNE_AT:  # expired entries of earlier listings
                now = time.monotonic()
                self._listed = {k: v for k, v in self._listed.items() if v[0] > now}
            for child, (size, mode, mtime_ns) in files.items():
                if not children[child]:
                    self._listed[prefix + child] = (listed_until, size, mode, mtime_ns)
        entries: list[Any] = [".", ".."]
        for child, is_dir in sorted(children.items()):
            entries.append((child, {"st_mode": DIR_MODE if is_dir else stat.S_IFREG | 0o644}, 0))
        return entries

    def statfs(self, path: str | None) -> dict[str, int]:
        objects, used, free = self._call_sync(self._cluster.usage)
        block = 4096
        free_blocks = free // block
        return {"f_bsize": block, "f_frsize": block,
                "f_blocks": (used + free) // block, "f_bfree": free_blocks,
                "f_bavail": free_blocks, "f_files": objects + free_blocks,
                "f_ffree": free_blocks, "f_favail": free_blocks,
                "f_namemax": MAX_COMPONENT_BYTES}

    # --- directories ------------------------------------------------------------------------

    def mkdir(self, path: str | None, mode: int) -> int:
        name = self._writable_name(path)
        with self._locked(name):
            if self._kind(name) is not None:
                raise _fail(errno.EEXIST)
            now = time.time_ns()
            self._change(self._cluster.insert, f"{name}/{DIR_MARKER}", self._empty, 0,
                       EMPTY_DIGEST, mode & 0o7777, now)
        self._remember_dir(name, now)
        return 0

    def rmdir(self, path: str | None) -> int:
        name = self._writable_name(path)
        prefix = name + "/"
        marker = prefix + DIR_MARKER
        with self._locked(name):
            with self._mutex:
                if any(n.startswith(prefix) and f.busy for n, f in self._files.items()):
                    raise _fail(errno.ENOTEMPTY)
            items = self._call(self._cluster.complete_listing, prefix)
            if any(item["name"] != marker for item in items):
                raise _fail(errno.ENOTEMPTY)
            if not items:
                kind = self._call(self._cluster.kind, name)
                raise _fail(errno.ENOTDIR if isinstance(kind, TupleEntry) else errno.ENOENT)
            try:
                self._change(self._cluster.delete, marker)
            except mfusepy.FuseOSError as exc:
                if exc.errno != errno.ENOENT:
                    raise
        self._forget_dirs()
        return 0

    # --- names ------------------------------------------------------------------------------

    def unlink(self, path: str | None) -> int:
        if self._readonly:
            raise _fail(errno.EROFS)
        name = self._name(path)
        if name.rsplit("/", 1)[-1].startswith(HIDDEN_PREFIX):
            with self._mutex:  # libfuse's last close of a file unlinked while open
                self._hidden.pop(name, None)
            return 0
        name = self._writable_name(path)
        with self._locked(name):
            with self._mutex:
                f = self._files.pop(name, None)
            local_only = False
            if f is not None:
                with f.lock:
                    f.unlinked = True  # open handles keep working; nothing is re-inserted
                    local_only = f.clock is None
            try:
                self._change(self._cluster.delete, name)
            except mfusepy.FuseOSError as exc:
                if not (exc.errno == errno.ENOENT and local_only):
                    raise
        return 0

    def rename(self, old: str | None, new: str | None, flags: int = 0) -> int:
        old_name = self._writable_name(old)
        if self._name(new).rsplit("/", 1)[-1].startswith(HIDDEN_PREFIX):
            self._hide(old_name, self._name(new))
            return 0
        new_name = self._writable_name(new)
        if flags & RENAME_EXCHANGE or flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE):
            raise _fail(errno.EINVAL)  # exchanging two objects cannot be made atomic here
        if old_name == new_name:
            return 0
        if new_name.startswith(old_name + "/"):
            raise _fail(errno.EINVAL)  # a directory into itself
        with self._locked(old_name, new_name):
            src = self._kind(old_name)
            if src is None:
                raise _fail(errno.ENOENT)
            dst = self._kind(new_name)
            if dst is not None and flags & RENAME_NOREPLACE:
                raise _fail(errno.EEXIST)
            if isinstance(src, DirInfo):
                self._rename_dir(old_name, new_name, dst)
            else:
                self._rename_file(old_name, new_name, dst)
        self._forget_dirs()
        return 0

    def _hide(self, name: str, hidden: str) -> None:
        """libfuse's unlink of a file that is still open: the object goes from the cluster
        now; the open handles keep the local copy, reachable under the hidden name until
        libfuse unlinks that at the last close. It is never inserted again."""
        with self._locked(name):
            with self._mutex:
                f = self._files.pop(name, None)
                if f is not None:
                    self._hidden[hidden] = f
            local_only = False
            if f is not None:
                with f.lock:
                    f.unlinked = True
                    f.name = hidden
                    local_only = f.clock is None
            try:
                self._change(self._cluster.delete, name)
            except mfusepy.FuseOSError as exc:
                if not (exc.errno == errno.ENOENT and local_only):
                    raise

    def _rename_file(self, old: str, new: str, dst: object) -> None:
        if isinstance(dst, DirInfo):
            raise _fail(errno.EISDIR)
        with self._mutex:
            f = self._files.get(old)
        if f is not None and f.dirty:
            self._publish(f)  # the cluster copy must be the one the user sees
        self._change(self._cluster.move_file, old, new)
        with self._mutex:
            replaced = self._files.pop(new, None)
            moved = self._files.pop(old, None)
            if moved is not None:
                self._files[new] = moved
        if moved is not None:
            with moved.lock:  # its next publish goes under the new name
                moved.name = new
        if replaced is not None:
            with replaced.lock:
                replaced.unlinked = True

    def _rename_dir(self, old: str, new: str, dst: object) -> None:
        if dst is not None and not isinstance(dst, DirInfo):
            raise _fail(errno.ENOTDIR)
        prefix = old + "/"
        if isinstance(dst, DirInfo):
            marker = f"{new}/{DIR_MARKER}"
            items = self._call(self._cluster.complete_listing, new + "/")
            if any(item["name"] != marker for item in items):
                raise _fail(errno.ENOTEMPTY)
        with self._mutex:
            local = [f for n, f in self._files.items() if n.startswith(prefix)]
        for f in local:
            if f.dirty:
                self._publish(f)
        self._change(self._cluster.move_tree, old, new)
        with self._mutex:
            for f in local:
                if self._files.get(f.name) is f:
                    del self._files[f.name]
                    f.name = new + f.name[len(old):]
                    self._files[f.name] = f

    def symlink(self, target: str, source: str) -> int:
        raise _fail(errno.EPERM)  # objects are plain files

    def link(self, target: str, source: str) -> int:
        raise _fail(errno.EPERM)

    def mknod(self, path: str, mode: int, dev: int) -> int:
        raise _fail(errno.EPERM)

    # --- metadata ---------------------------------------------------------------------------

    def _meta_target(self, path: str | None, fh: int | None) -> tuple[LocalCopy | None, str | None]:
        """For fchmod/futimens (a handle) or chmod/utimens (a path): the local copy that takes
        the change (published with its content at close), else the name to rewrite."""
        if self._readonly:
            raise _fail(errno.EROFS)
        handle = self._handles.get(fh) if fh is not None else None
        if handle is not None:
            f = handle.file
            if f.spool:
                return f, None
            return None, None if f.unlinked else f.name
        if path is None:
            return None, None  # a file unlinked while open: nothing left to record it on
        name = self._writable_name(path)
        return self._local_busy(name), name

    def _set_meta(self, path: str | None, fh: int | None, mode: int | None,
                  mtime_ns: int | None) -> int:
        """chmod/utimens and their f- forms: an open local copy takes the change (published
        with its content at close); otherwise the object is stored again with it."""
        local, name = self._meta_target(path, fh)
        if local is None and name is not None:
            with self._locked(name):
                local = self._local_busy(name)
                if local is None:
                    kind = self._kind(name)
                    if kind is None:
                        raise _fail(errno.ENOENT)
                    changed = isinstance(kind, TupleEntry) and (
                        (mode is not None and kind.mode & 0o7777 != mode)
                        or (mtime_ns is not None and kind.mtime_ns != mtime_ns))
                    if changed:
                        self._change(self._cluster.rewrite, name, mode, mtime_ns)
                    return 0  # directories: fixed 0755 and no stored mtime (documented)
        if local is not None:
            with local.lock:
                if mode is not None:
                    local.mode = mode
                if mtime_ns is not None:
                    local.mtime_ns = mtime_ns
                local.dirty = True
        return 0

    def chmod(self, path: str | None, mode: int, fh: int | None = None) -> int:
        return self._set_meta(path, fh, mode & 0o7777, None)

    def chown(self, path: str | None, uid: int, gid: int) -> int:
        if uid not in (-1, self._uid) or gid not in (-1, self._gid):
            raise _fail(errno.EPERM)  # every object belongs to the mounting user
        return 0

    def utimens(self, path: str | None, times: tuple[int, int] | None = None,
                fh: int | None = None) -> int:
        mtime = time.time_ns() if times is None else times[1]
        if mtime == UTIME_OMIT:
            if self._readonly:
                raise _fail(errno.EROFS)
            return 0  # atime is not stored
        if mtime == UTIME_NOW:
            mtime = time.time_ns()
        return self._set_meta(path, fh, None, mtime)

    def truncate(self, path: str | None, length: int, fh: int | None = None) -> int:
        if self._readonly:
            raise _fail(errno.EROFS)
        if length < 0:
            raise _fail(errno.EINVAL)
        if length > self._max_size:
            raise _fail(errno.EFBIG)
        handle = self._handles.get(fh) if fh is not None else None
        if handle is not None:
            self._truncate_local(handle.file, length)
            return 0
        name = self._writable_name(path)
        with self._mutex:
            current = self._files.get(name)
            read_here = current is not None and current.refs > 0 and not current.busy
        if read_here:  # handles here read it: cut it through a writer's copy they then share
            fh = self.open(path, os.O_WRONLY | (os.O_TRUNC if length == 0 else 0))
            try:
                if length:
                    self._truncate_local(self._handles[fh].file, length)
                self.flush(path, fh)
            finally:
                self.release(path, fh)
            return 0
        with self._locked(name):
            local = self._local_busy(name)
            if local is not None:
                self._truncate_local(local, length)
                return 0
            kind = self._kind(name)
            if kind is None:
                raise _fail(errno.ENOENT)
            if isinstance(kind, DirInfo):
                raise _fail(errno.EISDIR)
            assert isinstance(kind, TupleEntry)
            if kind.size != length:
                self._change(self._cluster.truncate, name, length)
        return 0

    def _truncate_local(self, f: LocalCopy, length: int) -> None:
        if not f.spool:
            raise _fail(errno.EBADF)
        f.truncate(length)

    # --- open files -------------------------------------------------------------------------

    def _new_local(self, name: str, *, spool: bool) -> Path:
        return (self._spool_dir if spool else self._cache_dir) / secrets.token_hex(12)

    def _open_local(self, name: str, path: Path, meta: Fetched | None, *, spool: bool,
                    mode: int = 0o644) -> LocalCopy:
        flags = (os.O_RDWR if spool else os.O_RDONLY) | os.O_CLOEXEC
        if meta is None:
            fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600)
            return LocalCopy(name, path, fd, spool=True, clock=None, mode=mode,
                             mtime_ns=time.time_ns(), dirty=True)
        fd = os.open(path, flags)
        return LocalCopy(name, path, fd, spool=spool, clock=meta.clock, mode=meta.mode & 0o7777,
                         mtime_ns=meta.mtime_ns, dirty=False, checksum=meta.checksum,
                         size=meta.size, verify=meta.verify and not spool)

    def _fetch_local(self, name: str, *, spool: bool) -> LocalCopy:
        path = self._new_local(name, spool=spool)
        meta = self._call(functools.partial(self._cluster.fetch, link_ok=not spool), name, path)
        with self._mutex:  # fresher than any listing: stat must agree with what open saw
            self._listed.pop(name, None)
        try:
            return self._open_local(name, path, meta, spool=spool)
        except BaseException:
            path.unlink(missing_ok=True)
            raise

    def _install(self, f: LocalCopy, writable: bool, append: bool) -> int:
        with self._mutex:
            if not f.unlinked:
                self._files[f.name] = f
            fh = self._next_fh
            self._next_fh += 1
            self._handles[fh] = _Handle(f, writable, append)
            f.refs += 1
            if writable:
                f.writers += 1
        return fh

    def open(self, path: str | None, flags: int) -> int:
        name = self._name(path)
        if not name:
            raise _fail(errno.EISDIR)
        writable = flags & os.O_ACCMODE != os.O_RDONLY
        if writable and self._readonly:
            raise _fail(errno.EROFS)
        truncate = writable and bool(flags & os.O_TRUNC)
        append = bool(flags & os.O_APPEND)
        with self._locked(name), self._pinned(name) as current:
            with self._mutex:  # handles other than our pin: this mount reads the file now
                read_here = current is not None and current.refs > 1
            if current is not None and current.busy:
                f = current  # this mount's unpublished state wins
                if truncate:
                    self._truncate_local(f, 0)
            elif (writable and current is not None and read_here
                  and current.clock == self._stat_file(name).version.clock):
                f = self._writer_copy(current, truncate)
            elif truncate:
                mode = current.mode if current is not None else self._stat_file(name).mode
                f = self._open_local(name, self._new_local(name, spool=True), None, spool=True,
                                     mode=mode & 0o7777)
            elif writable:
                f = self._fetch_local(name, spool=True)
            elif (current is not None and read_here
                  and current.clock == self._stat_file(name).version.clock):
                f = current  # still the current version: share the copy already here
            else:
                f = self._fetch_local(name, spool=False)
            return self._install(f, writable, append)

    @contextlib.contextmanager
    def _pinned(self, name: str) -> Iterator[LocalCopy | None]:
        """This mount's copy of ``name`` (or None), held by an extra reference meanwhile: the
        kernel sends the release of a closed handle without waiting, so the last handle may
        be released while an open decides to share the copy, and must not close it then."""
        with self._mutex:
            current = self._files.get(name)
            if current is not None:
                current.refs += 1
        try:
            yield current
        finally:
            if current is not None:
                self._drop_ref(current, writable=False)

    def _writer_copy(self, current: LocalCopy, truncate: bool) -> LocalCopy:
        """A writer opens a file that handles on this mount are reading (``current``, the
        cluster's current version): they share the writer's copy from now on, as all handles
        of a name here do, so they see its writes, its O_TRUNC and its size. The kernel keeps
        one page cache per file for all of them; readers left on their own copy would read
        the writer's pages mixed with their old bytes."""
        if current.spool:
            f = current  # published spool copy: copies itself on its next write (LocalCopy)
            if truncate:
                self._truncate_local(f, 0)
            return f
        if truncate:
            f = self._open_local(current.name, self._new_local(current.name, spool=True), None,
                                 spool=True, mode=current.mode)
        else:
            f = self._fetch_local(current.name, spool=True)
        with self._mutex:
            for handle in self._handles.values():
                if handle.file is current and handle.retired is None:
                    handle.file, handle.retired = f, current
                    f.refs += 1
        return f

    def _stat_file(self, name: str) -> TupleEntry:
        kind = self._call(self._cluster.kind, name)
        if isinstance(kind, DirInfo):
            raise _fail(errno.EISDIR)
        if kind is None:
            raise _fail(errno.ENOENT)
        return kind

    def create(self, path: str | None, mode: int, flags: int = 0) -> int:
        name = self._writable_name(path)
        writable = flags & os.O_ACCMODE != os.O_RDONLY
        with self._locked(name), self._pinned(name) as current:
            if flags & os.O_EXCL and (current is not None or self._kind(name) is not None):
                raise _fail(errno.EEXIST)
            if current is not None and current.busy:
                f = current
                if flags & os.O_TRUNC:
                    self._truncate_local(f, 0)
            else:  # a new, empty file: published at the first flush even if nothing is written
                f = self._open_local(name, self._new_local(name, spool=True), None, spool=True,
                                     mode=mode & 0o7777)
            fh = self._install(f, writable, bool(flags & os.O_APPEND))
        return fh

    def init_with_config(self, conn_info: Any, config_3: Any) -> None:
        tune_connection(conn_info)

    def read_buf(self, path: str | None, bufpp: Any, size: int, offset: int, fh: int) -> int:
        """Tell libfuse which descriptor and offset to read (see ``kelipsfs.fuse_buffers``)."""
        handle = self._handles.get(fh)
        if handle is None:
            raise _fail(errno.EBADF)
        try:
            fd = handle.file.readable_fd(size, offset)
        except CorruptCopy as exc:
            raise _fail(errno.EIO) from exc
        answer_with_fd(bufpp, fd, size, offset)
        return 0

    def write(self, path: str | None, data: bytes, offset: int, fh: int) -> int:
        handle = self._handles.get(fh)
        if handle is None or not handle.writable or not handle.file.spool:
            raise _fail(errno.EBADF)
        try:
            return handle.file.write(data, offset, handle.append, self._max_size)
        except OSError as exc:
            raise _fail(exc.errno or errno.EIO) from exc

    def _publish(self, f: LocalCopy) -> None:
        """Insert a dirty local copy into the cluster; errno on failure (it stays dirty)."""
        with f.lock:
            if not f.dirty or f.unlinked:
                return
            size = f.size()
            checksum = f.checksum()
            entry = self._change(self._cluster.insert, f.name, f.path, size, checksum, f.mode,
                                 f.mtime_ns)
            f.published(entry.version.clock, linked=True)

    def flush(self, path: str | None, fh: int) -> int:
        handle = self._handles.get(fh)
        # close(2) returns this errno: a write is never lost silently. A reader closing while
        # another handle is still writing does not publish that writer's half-done content.
        if handle is not None and (handle.writable or handle.file.writers == 0):
            self._publish(handle.file)
        return 0

    def fsync(self, path: str | None, datasync: int, fh: int) -> int:
        return self.flush(path, fh)

    def release(self, path: str | None, fh: int) -> int:
        with self._mutex:
            handle = self._handles.pop(fh, None)
        if handle is None:
            return 0
        if handle.retired is not None:
            self._drop_ref(handle.retired, writable=False)
        self._drop_ref(handle.file, handle.writable)
        return 0

    def _drop_ref(self, f: LocalCopy, writable: bool) -> None:
        """One handle (or pin) less on ``f``; the last one stores what is still unpublished
        (normally nothing: flush did it) and closes it."""
        try:
            if f.refs == 1:
                self._publish(f)
        except mfusepy.FuseOSError as exc:
            log.error("could not store %s when it was closed: %s", f.name,
                      os.strerror(exc.errno or errno.EIO))
        finally:
            with self._mutex:
                f.refs -= 1
                if writable:
                    f.writers -= 1
                last = f.refs == 0
                if last and self._files.get(f.name) is f:
                    del self._files[f.name]
                if last and self._hidden.get(f.name) is f:
                    del self._hidden[f.name]
            if last:
                f.close()

    # --- extended attributes ----------------------------------------------------------------

    def _xattrs(self, path: str | None) -> dict[str, bytes]:
        name = self._name(path)
        if not name:
            return self._call_sync(self._cluster.root_xattrs)
        local = self._local_busy(name)
        if local is not None and local.clock is None:  # not stored yet: only its group is known
            group = self._call_sync(self._cluster.group_of, name)
            return {XATTR_PREFIX + "group": str(group).encode()}
        return self._call(self._cluster.file_xattrs, name)

    def getxattr(self, path: str | None, name: str, position: int = 0) -> bytes:
        if not name.startswith(XATTR_PREFIX):
            raise _fail(errno.ENODATA)  # cheap: the kernel asks for security.* on every write
        value = self._xattrs(path).get(name)
        if value is None:
            raise _fail(errno.ENODATA)
        return value

    def listxattr(self, path: str | None) -> list[str]:
        return sorted(self._xattrs(path))

    def setxattr(self, path: str | None, name: str, value: bytes, options: int,
                 position: int = 0) -> int:
        raise _fail(errno.EPERM if name.startswith(XATTR_PREFIX) else errno.ENOTSUP)

    def removexattr(self, path: str | None, name: str) -> int:
        raise _fail(errno.EPERM if name.startswith(XATTR_PREFIX) else errno.ENOTSUP)


class KelipsFUSE(mfusepy.FUSE):  # type: ignore[misc]
    """mfusepy's FUSE with the libfuse 3 arguments it drops passed on.

    ``rename`` gets its flags (RENAME_NOREPLACE must not replace; RENAME_EXCHANGE is
    refused); ``truncate``, ``chmod`` and ``utimens`` get their file handle, so
    ftruncate/fchmod/futimens change the local copy that handle writes.
    """

    def rename_fuse_3(self, old: bytes, new: bytes, flags: int) -> int:
        result: int = self.operations.rename(old.decode(self.encoding, self.errors),
                                             new.decode(self.encoding, self.errors), flags)
        return result

    def _decode(self, path: bytes | None) -> str | None:
        return None if path is None else path.decode(self.encoding, self.errors)

    def truncate_fuse_3(self, path: bytes | None, length: int, fip: Any) -> int:
        fh = fip.contents.fh if fip else None
        result: int = self.operations.truncate(self._decode(path), length, fh)
        return result

    def chmod_fuse_3(self, path: bytes | None, mode: int, fip: Any) -> int:
        fh = fip.contents.fh if fip else None
        result: int = self.operations.chmod(self._decode(path), mode, fh)
        return result

    def utimens_fuse_3(self, path: bytes | None, buf: Any, fip: Any) -> int:
        fh = fip.contents.fh if fip else None
        times = None
        if buf:
            atime = mfusepy.time_of_timespec(buf.contents.actime, use_ns=True)
            mtime = mfusepy.time_of_timespec(buf.contents.modtime, use_ns=True)
            times = (int(atime), int(mtime))
        result: int = self.operations.utimens(self._decode(path), times, fh)
        return result


def serve(operations: KelipsOperations, mountpoint: Path, options: dict[str, Any]) -> None:
    """Mount and run the FUSE loop until unmounted (blocks: run it in a worker thread).

    Always in the foreground: libfuse's own daemonizing forks, and the Python code after it
    would never run in the parent.
    """
    KelipsFUSE(operations, str(mountpoint), foreground=True, **options)
