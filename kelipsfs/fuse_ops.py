"""The FUSE callbacks of ``kelipsfs mount``: a thin pyfuse3 adapter over the namespace.

pyfuse3 speaks FUSE's low-level, inode-based protocol and runs every request as a task on
the node's own trio loop: a callback awaits the namespace (``daemon.namespace.vfs``) and the
open-file table (``kelipsfs.open_files``) directly, with no thread between them. FUSE inode
numbers are the namespace's inode numbers (the root is 1), so hard links are one inode to
the kernel as well, with one page cache.

What the kernel does itself: with ``default_permissions`` it checks every access against the
mode bits, owners and the sticky bit, and with no lock callbacks it keeps ``flock`` and
``fcntl`` locks itself (so they hold between the processes of one mount only); FIFOs, sockets
and device nodes are opened by the kernel, never by us. What is done here: POSIX rules only a
filesystem knows (a setuid bit cleared by chown and by a truncate of another user's file,
times of entries and parents), error codes, and the read-only ``user.kelips.*`` view
(``kelipsfs.xattr_view``).

Caching: the kernel keeps entries, attributes and pages of records of this node's own group,
whose every change reaches this node and is invalidated at once (``kelipsfs.invalidation``);
those of other groups are given with a timeout of 0 and asked again at each use. Either way a
change made through another mount is seen by the next open (close-to-open consistency).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import stat
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, replace
from typing import Any, ParamSpec, TypeVar

import pyfuse3
import trio

from daemon.core.inodes import AttrChange, Entry, FsError, Inode
from daemon.core.keys import ROOT_INO, inode_name
from daemon.data_errors import DataError
from daemon.namespace.vfs import Caller, Namespace
from kelipsfs import xattr_view
from kelipsfs.invalidation import CACHE_SECONDS, KernelInodes, own_change
from kelipsfs.open_files import FileError, OpenFiles

log = logging.getLogger("kelipsfs.fuse")

#: Preferred I/O size reported in st_blksize: tools like cp size their buffers from it.
IO_BLOCK = 1 << 20
#: The longest name of one directory entry (bytes).
NAME_MAX = 255
#: relatime: an access is recorded when the last one is older than this, even if nothing
#: changed since.
RELATIME_AGE_NS = 24 * 3600 * 1_000_000_000
#: Extended attributes the mount does not keep (EOPNOTSUPP): POSIX ACLs, SELinux labels.
UNSUPPORTED_XATTRS = ("system.", "security.selinux")
#: Accesses waiting to be recorded at most (see ``KelipsOperations._accessed``).
ATIME_BACKLOG = 256
_T = TypeVar("_T")
_P = ParamSpec("_P")


def _changes(method: Callable[_P, Awaitable[_T]]) -> Callable[_P, Coroutine[Any, Any, _T]]:
    """A request that changes records: its changes are not notified back to the kernel
    (``kelipsfs.invalidation.own_change``)."""
    @functools.wraps(method)
    async def changing(*args: _P.args, **kwargs: _P.kwargs) -> _T:
        with own_change():
            return await method(*args, **kwargs)
    return changing


def _fail(code: int) -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(code)


def _name(raw: bytes) -> str:
    """A name as the namespace stores it (UTF-8 text); EILSEQ for bytes that are not."""
    if len(raw) > NAME_MAX:
        raise _fail(errno.ENAMETOOLONG)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _fail(errno.EILSEQ) from None


@dataclass
class _DirHandle:
    ino: int
    listing: list[tuple[bytes, pyfuse3.EntryAttributes]] | None = None


class KelipsOperations(pyfuse3.Operations):
    """The pyfuse3 operations of a kelipsfs mount (see the module docstring)."""

    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, namespace: Namespace, files: OpenFiles, runtime: Any, *,
                 readonly: bool = False, record_atime: bool = False,
                 background: trio.Nursery | None = None,
                 kernel: KernelInodes | None = None) -> None:
        super().__init__()
        self._kernel = kernel if kernel is not None else KernelInodes()
        self._ns = namespace
        self._files = files
        self._rt = runtime
        self._readonly = readonly
        self._record_atime = record_atime
        self._background = background
        self._atime_pending: set[int] = set()
        self._atime_turn = trio.Lock()
        self._dirs: dict[int, _DirHandle] = {}
        # The last attributes seen of each inode open here: fstat of a file unlinked while
        # open answers from them (with no links left).
        self._last: dict[int, Inode] = {}
        self._next_dir = 1

    # --- plumbing -------------------------------------------------------------------------

    async def _call(self, fn: Callable[..., Awaitable[_T]], *args: Any) -> _T:
        """Await a namespace or file call, its failure as an errno."""
        try:
            return await fn(*args)
        except pyfuse3.FUSEError:
            raise
        except FsError as exc:
            if exc.errno == errno.EIO:
                log.warning("%s", exc.message)
            raise _fail(exc.errno) from exc
        except FileError as exc:
            raise _fail(exc.errno or errno.EIO) from exc
        except DataError as exc:
            log.warning("cluster error: %s", exc.message)
            raise _fail(errno.EIO) from exc
        except (trio.Cancelled, trio.RunFinishedError):
            raise
        except OSError as exc:
            raise _fail(exc.errno or errno.EIO) from exc

    def _writable(self) -> None:
        if self._readonly:
            raise _fail(errno.EROFS)

    def _cached(self, ino: int) -> float:
        """How long the kernel may keep the records of ``ino``: ``CACHE_SECONDS`` when a
        change of them reaches this node (its own group: ``kelipsfs.invalidation``), else 0."""
        node = self._rt.node
        return CACHE_SECONDS if node.group_of(inode_name(ino)) == node.group else 0.0

    def _attrs(self, inode: Inode, directory: int | None = None) -> pyfuse3.EntryAttributes:
        """The attributes of ``inode``; ``directory``: the one whose entry named it (the
        entry's cache time is the directory's)."""
        busy = self._files.busy(inode.ino)
        size, mtime = inode.size, inode.mtime_ns
        stored = inode.stored if inode.stored is not None else size
        if busy is not None:
            size, stored = busy.size(), busy.stored()
            if busy.mtime_ns:
                mtime = busy.mtime_ns
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode.ino
        a.generation = 0
        a.attr_timeout = 0.0 if busy is not None else self._cached(inode.ino)
        a.entry_timeout = self._cached(inode.ino if directory is None else directory)
        a.st_mode = inode.mode
        a.st_nlink = inode.nlink
        a.st_uid = inode.uid
        a.st_gid = inode.gid
        a.st_rdev = inode.rdev
        a.st_size = size
        a.st_blksize = IO_BLOCK
        a.st_blocks = (stored + 511) // 512
        a.st_atime_ns = inode.atime_ns
        a.st_mtime_ns = mtime
        a.st_ctime_ns = max(inode.ctime_ns, mtime) if busy is not None else inode.ctime_ns
        return a

    def _entry(self, inode: Inode, directory: int | None = None) -> pyfuse3.EntryAttributes:
        """The attributes of an entry reply: the kernel now holds ``inode`` once more."""
        self._kernel.handed(inode.ino)
        return self._attrs(inode, directory)

    async def _inode(self, ino: int) -> Inode:
        return await self._call(self._ns.getattr, ino)

    # --- lookups and attributes -----------------------------------------------------------

    async def lookup(self, parent_inode: int, name: bytes, ctx: Any) -> pyfuse3.EntryAttributes:
        if name == b".":
            return self._entry(await self._inode(parent_inode))
        if name == b"..":
            parent = await self._inode(parent_inode)
            return self._entry(await self._inode(parent.parent))
        found = await self._call(self._find, parent_inode, _name(name))
        if found is None:
            if self._cached(parent_inode):
                return self._negative(parent_inode)
            raise _fail(errno.ENOENT)
        return self._entry(found, parent_inode)

    async def _find(self, directory: int, name: str) -> Inode | None:
        try:
            return await self._ns.lookup(directory, name)
        except FsError as exc:
            if exc.errno == errno.ENOENT:
                return None
            raise

    def _negative(self, directory: int) -> pyfuse3.EntryAttributes:
        """No such name, and the kernel may remember so (the entry's creation anywhere
        invalidates it): every create starts with a lookup of a name that is not there."""
        a = pyfuse3.EntryAttributes()
        a.st_ino = 0
        a.entry_timeout = self._cached(directory)
        return a


    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for ino, count in inode_list:
            self._kernel.forgotten(ino, count)

    async def getattr(self, inode: int, ctx: Any) -> pyfuse3.EntryAttributes:
        last = self._last.get(inode)
        if last is not None and self._files.is_unlinked(inode):
            return self._attrs(replace(last, nlink=0))
        try:
            found = await self._ns.getattr(inode)
        except FsError as exc:
            if exc.errno == errno.ENOENT and last is not None and self._files.is_open(inode):
                return self._attrs(replace(last, nlink=0))  # removed through another mount
            raise _fail(exc.errno) from exc
        if self._files.is_open(inode):
            self._last[inode] = found
        return self._attrs(found)

    @_changes
    async def setattr(self, inode: int, attr: Any, fields: Any, fh: int | None,
                      ctx: Any) -> pyfuse3.EntryAttributes:
        self._writable()
        last = self._last.get(inode)
        if last is not None and self._files.is_unlinked(inode):
            return await self._setattr_unlinked(last, attr, fields)
        current = await self._inode(inode)
        mode: int | None = None
        if fields.update_size:
            if current.is_dir:
                raise _fail(errno.EISDIR)
            await self._truncate(current, attr.st_size)
            if ctx.uid != 0 and current.mode & (stat.S_ISUID | stat.S_ISGID):
                mode = _killpriv(current.mode)
        if fields.update_mode:
            mode = attr.st_mode & 0o7777
        uid = attr.st_uid if fields.update_uid else None
        gid = attr.st_gid if fields.update_gid else None
        if (uid is not None or gid is not None) and not current.is_dir:
            mode = _killpriv(current.mode if mode is None else mode)  # as chown(2) on Linux
        change = AttrChange(
            mode=mode, uid=uid, gid=gid,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None)
        if fields.update_mtime:
            self._files.set_mtime(inode, attr.st_mtime_ns)
        if change == AttrChange():
            if fields.update_size or fields.update_ctime:
                change = AttrChange(touch=True)
            else:
                return self._attrs(current)
        return self._attrs(await self._call(self._ns.setattr, inode, change))

    async def _setattr_unlinked(self, last: Inode, attr: Any,
                                fields: Any) -> pyfuse3.EntryAttributes:
        """ftruncate, fchmod... of a file unlinked while open: its local copy and the
        attributes this mount last saw take the change (nothing is stored any more)."""
        if fields.update_size:
            await self._call(self._files.truncate, last.ino, attr.st_size)
        changed = replace(
            last, nlink=0,
            mode=stat.S_IFMT(last.mode) | (attr.st_mode & 0o7777) if fields.update_mode
            else last.mode,
            uid=attr.st_uid if fields.update_uid else last.uid,
            gid=attr.st_gid if fields.update_gid else last.gid,
            atime_ns=attr.st_atime_ns if fields.update_atime else last.atime_ns,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else last.mtime_ns)
        self._last[last.ino] = changed
        return self._attrs(changed)

    async def _truncate(self, inode: Inode, length: int) -> None:
        if length < 0:
            raise _fail(errno.EINVAL)
        if await self._call(self._files.truncate, inode.ino, length):
            return
        if length == inode.size and inode.content is not None:
            return
        fh = await self._call(self._files.open, inode.ino, True, length == 0, False)
        try:
            if length:
                await self._call(self._files.truncate, inode.ino, length)
            await self._call(self._files.flush, fh)
        finally:
            await self._files.release(fh)

    async def readlink(self, inode: int, ctx: Any) -> bytes:
        return await self._call(self._ns.readlink, inode)

    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        objects, used, free = self._rt.store.usage()
        block = 4096
        free_blocks = free // block
        s = pyfuse3.StatvfsData()
        s.f_bsize = block
        s.f_frsize = block
        s.f_blocks = (used + free) // block
        s.f_bfree = free_blocks
        s.f_bavail = free_blocks
        s.f_files = objects + free_blocks
        s.f_ffree = free_blocks
        s.f_favail = free_blocks
        s.f_namemax = NAME_MAX
        return s

    # --- making and removing names --------------------------------------------------------

    @_changes
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: Any) -> pyfuse3.EntryAttributes:
        self._writable()
        made = await self._call(self._ns.mknod, parent_inode, _name(name), mode,
                                Caller(ctx.uid, ctx.gid), rdev)
        return self._entry(made)

    @_changes
    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: Any) -> pyfuse3.EntryAttributes:
        self._writable()
        made = await self._call(self._ns.mkdir, parent_inode, _name(name), mode,
                                Caller(ctx.uid, ctx.gid))
        return self._entry(made)

    @_changes
    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: Any) -> pyfuse3.EntryAttributes:
        self._writable()
        made = await self._call(self._ns.symlink, parent_inode, _name(name), target,
                                Caller(ctx.uid, ctx.gid))
        return self._entry(made)

    @_changes
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: Any) -> pyfuse3.EntryAttributes:
        self._writable()
        linked = await self._call(self._ns.link, inode, new_parent_inode, _name(new_name))
        return self._entry(linked)

    @_changes
    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        self._writable()
        removed: Entry = await self._call(self._ns.unlink, parent_inode, _name(name))
        await self._gone_if_unlinked(removed.ino)

    @_changes
    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        self._writable()
        await self._call(self._ns.rmdir, parent_inode, _name(name))

    @_changes
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: Any) -> None:
        self._writable()
        new = _name(name_new)
        replaced = None
        with contextlib.suppress(FsError, DataError):
            replaced = await self._ns.records.entry(parent_inode_new, new)
        await self._call(self._ns.rename, parent_inode_old, _name(name_old), parent_inode_new,
                         new, flags)
        if replaced is not None and not flags & pyfuse3.RENAME_EXCHANGE:
            await self._gone_if_unlinked(replaced.ino)

    async def _gone_if_unlinked(self, ino: int) -> None:
        """A copy open here of an inode that lost its last link is never published again."""
        if self._files.is_open(ino):
            try:
                await self._ns.getattr(ino)
            except FsError:
                await self._files.unlinked(ino)

    # --- files ----------------------------------------------------------------------------

    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        writable = flags & os.O_ACCMODE != os.O_RDONLY
        if writable:
            self._writable()
        found = await self._inode(inode)
        if found.is_dir:
            raise _fail(errno.EISDIR)
        if not stat.S_ISREG(found.mode):
            raise _fail(errno.EINVAL)
        truncate = writable and bool(flags & os.O_TRUNC)
        fh = await self._call(self._files.open, inode, writable, truncate,
                              bool(flags & os.O_APPEND))
        previous = self._last.get(inode)
        self._last[inode] = found
        if flags & os.O_ACCMODE != os.O_WRONLY:
            self._accessed(found)
        # The kernel keeps the file's pages from one open to the next where a change of its
        # content made elsewhere reaches this node (kelipsfs.invalidation drops them), unless
        # the content changed since the last open here: a write closed through another mount
        # just before this open is read even if its invalidation has not run yet.
        unchanged = previous is None or previous.content == found.content
        return pyfuse3.FileInfo(fh=fh, keep_cache=bool(self._cached(inode)) and unchanged)

    def _accessed(self, inode: Inode) -> None:
        """relatime (``-o relatime``; else nothing): the first read after a change (or a day
        after the last) records the access time, in the background so the open does not wait
        for it, one at a time and at most ``ATIME_BACKLOG`` waiting (beyond that an access
        goes unrecorded: the next one records it)."""
        if not self._record_atime:
            return
        now = time.time_ns()
        due = (inode.atime_ns <= max(inode.mtime_ns, inode.ctime_ns)
               or now - inode.atime_ns > RELATIME_AGE_NS)
        if (not due or self._readonly or self._background is None
                or inode.ino in self._atime_pending
                or len(self._atime_pending) >= ATIME_BACKLOG):
            return
        self._atime_pending.add(inode.ino)

        async def record() -> None:
            try:
                async with self._atime_turn:
                    await self._ns.setattr(inode.ino, AttrChange(atime_ns=now, access=True))
            except (FsError, DataError) as exc:
                log.debug("access time of %x not recorded: %s", inode.ino, exc)
            finally:
                self._atime_pending.discard(inode.ino)

        self._background.start_soon(record)

    @_changes
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: Any) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        self._writable()
        made = await self._call(self._ns.mknod, parent_inode, _name(name),
                                stat.S_IFREG | (mode & 0o7777), Caller(ctx.uid, ctx.gid))
        writable = flags & os.O_ACCMODE != os.O_RDONLY
        fh = await self._files.create(made.ino, writable, bool(flags & os.O_APPEND))
        self._last[made.ino] = made
        attrs = self._entry(made, parent_inode)
        # Exactly known (empty, just made here), so the kernel may keep them like any other:
        # it drops the size and times itself at each write through this mount, and the open
        # that follows the create checks its permissions without asking again.
        attrs.attr_timeout = self._cached(made.ino)
        return (pyfuse3.FileInfo(fh=fh, keep_cache=bool(self._cached(made.ino))), attrs)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        return await self._call(self._files.read, fh, off, size)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return await self._call(self._files.write, fh, off, buf)

    @_changes
    async def flush(self, fh: int) -> None:
        await self._call(self._files.flush, fh)

    @_changes
    async def fsync(self, fh: int, datasync: bool) -> None:
        if not await self._call(self._files.fsync, fh) and not datasync:
            # nothing to publish (which makes the inode's records durable with it): its
            # attributes may still wait in the holders' record logs
            await self._call(self._ns.sync, self._files.ino_of(fh))

    @_changes
    async def release(self, fh: int) -> None:
        ino = self._files.ino_of(fh) if self._files.has(fh) else None
        await self._files.release(fh)
        if ino is not None and not self._files.is_open(ino):
            self._last.pop(ino, None)

    # --- directories ----------------------------------------------------------------------

    async def opendir(self, inode: int, ctx: Any) -> int:
        found = await self._inode(inode)
        if not found.is_dir:
            raise _fail(errno.ENOTDIR)
        self._accessed(found)
        fh = self._next_dir
        self._next_dir += 1
        self._dirs[fh] = _DirHandle(inode)
        return fh

    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        handle = self._dirs.get(fh)
        if handle is None:
            raise _fail(errno.EBADF)
        if handle.listing is None or start_id == 0:
            handle.listing = await self._listing(handle.ino)
        for index in range(start_id, len(handle.listing)):
            name, attrs = handle.listing[index]
            if not pyfuse3.readdir_reply(token, name, attrs, index + 1):
                return
            if name not in (b".", b".."):  # (READDIRPLUS: the kernel holds each entry's inode)
                self._kernel.handed(attrs.st_ino)

    async def _listing(self, ino: int) -> list[tuple[bytes, pyfuse3.EntryAttributes]]:
        """The entries with what READDIRPLUS hands the kernel: their attributes where the
        kernel may keep them (``_cached``), so ``ls -l`` and ``find`` need no request per
        entry; else only the inode number and type (it asks for the rest when it needs it)."""
        directory = await self._inode(ino)
        parent = directory if ino == ROOT_INO else await self._inode(directory.parent)
        out = [(b".", self._attrs(directory)), (b"..", self._attrs(parent))]
        for entry in await self._call(self._ns.readdir, ino):
            if self._cached(entry.ino):
                found = await self._ns.records.inode(entry.ino)
                if found is None:  # (an entry whose inode is gone is not shown)
                    continue
                out.append((entry.name.encode("utf-8"), self._attrs(found, ino)))
                continue
            a = pyfuse3.EntryAttributes()
            a.st_ino = entry.ino
            a.st_mode = entry.kind
            a.entry_timeout = 0
            a.attr_timeout = 0
            out.append((entry.name.encode("utf-8"), a))
        return out

    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        """A directory's entries and attributes made durable on their holders (a change of
        the namespace is durable within a second anyway, as a local journal commits)."""
        handle = self._dirs.get(fh)
        if handle is None:
            raise _fail(errno.EBADF)
        await self._call(self._ns.sync, handle.ino)

    # --- extended attributes --------------------------------------------------------------

    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        key = name.decode("utf-8", "surrogateescape")
        if key.startswith(xattr_view.PREFIX):
            values = await self._call(xattr_view.inode_values, self._rt,
                                      await self._inode(inode))
            if key not in values:
                raise _fail(errno.ENODATA)
            return values[key]
        if key.startswith(UNSUPPORTED_XATTRS):
            # No POSIX ACLs (the mode bits are the whole story) and no SELinux labels, as on a
            # filesystem mounted without them: EOPNOTSUPP, which `ls -l` remembers for the
            # whole mount instead of asking again for every file.
            raise _fail(errno.EOPNOTSUPP)
        return await self._call(self._ns.getxattr, inode, key)

    async def listxattr(self, inode: int, ctx: Any) -> list[bytes]:
        values = await self._call(self._ns.listxattr, inode)
        return [k.encode("utf-8", "surrogateescape") for k in sorted(values)]

    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: Any) -> None:
        self._writable()
        key = name.decode("utf-8", "surrogateescape")
        if key.startswith(xattr_view.PREFIX):
            raise _fail(errno.EPERM)
        if key.startswith(UNSUPPORTED_XATTRS):
            raise _fail(errno.EOPNOTSUPP)
        await self._call(self._ns.setxattr, inode, key, value, 0)

    async def removexattr(self, inode: int, name: bytes, ctx: Any) -> None:
        self._writable()
        key = name.decode("utf-8", "surrogateescape")
        if key.startswith(xattr_view.PREFIX):
            raise _fail(errno.EPERM)
        await self._call(self._ns.setxattr, inode, key, None, 0)


def _killpriv(mode: int) -> int:
    """The permission bits with setuid cleared, and setgid when it means 'group executes'."""
    bits = mode & 0o7777 & ~stat.S_ISUID
    if mode & stat.S_IXGRP:
        bits &= ~stat.S_ISGID
    return bits
