"""The namespace as POSIX sees it: inodes and names, independent of FUSE and of transport.

``Namespace`` composes the one-inode operations of ``daemon.core.inodes`` (each atomic at the
primary of its inode, ``daemon.namespace.primary``) into the calls a filesystem answers:
lookup, create, mkdir, symlink, mknod, link, unlink, rmdir, rename in every form, setattr,
extended attributes. The FUSE callbacks (``kelipsfs.fuse_ops``) and the node's HTTP API are
thin adapters over it; the tests drive it with the in-memory records of
``daemon.namespace.memory``, without root, sockets or a mount.

An operation that spans two inodes runs its steps in an order that a crash between them can
only leave an extra link, never a name without its inode: the new inode before its entry, the
new entry of a rename before the old one is removed, the entry removed before the link count
drops. A step refused after an earlier one succeeded undoes that one. Within one process,
``Namespace`` serialises changes to one directory, so two renames or a create and an unlink
on one mount never interleave; across mounts, each primary serialises its own inode.
"""

from __future__ import annotations

import errno
import random
import stat
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Protocol

import trio

from daemon.core.inodes import (
    HAS_XATTRS,
    MAX_LINKS,
    MAX_SYMLINK_BYTES,
    AttrChange,
    Entry,
    FsError,
    Inode,
    decode_xattrs,
    valid_entry_name,
)
from daemon.core.keys import MAX_INO, ROOT_INO, inode_name, xattrs_name
from daemon.namespace.ops import Op, Result
from daemon.quick_lock import QuickLocks

#: renameat2 flags (linux/fs.h).
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
RENAME_WHITEOUT = 4
#: Mode of the root directory made by the first node of a cluster.
ROOT_MODE = stat.S_IFDIR | 0o755
#: Directories walked up at most when checking that a directory is not moved into itself.
MAX_DEPTH = 4096
#: Inode numbers drawn at most to find one placed with its directory (about as many as the
#: members of a group are needed).
PLACE_TRIES = 64
#: Lookups of a directory another writer made at the same moment, before giving up
#: (``make_or_find_dir``), the n-th after ``n * FIND_MADE_STEP`` seconds.
FIND_MADE_TRIES = 10
FIND_MADE_STEP = 0.05


class Records(Protocol):
    """What the namespace reads from and asks of the cluster."""

    async def inode(self, ino: int) -> Inode | None:
        """The inode with its content joined (``Inode.join``), or None if it is gone."""

    async def bare_inode(self, ino: int) -> Inode | None:
        """The inode's own record, its content not joined (no size or content mtime), or
        None if it is gone: for what needs only its mode, owner and flags."""

    async def entry(self, directory: int, name: str) -> Entry | None:
        """The entry ``name`` of ``directory``, or None."""

    async def entries(self, directory: int) -> list[Entry]:
        """Every entry of ``directory``, sorted by name."""

    async def small_content(self, name: str) -> bytes:
        """The content of a small record (a symbolic link's target, extended attributes)."""

    async def apply(self, op: Op) -> Result:
        """Run ``op`` at the primary of ``op.key``; FsError if its rule refuses."""

    def placed_with(self, directory: int, ino: int) -> bool:
        """Whether inode ``ino`` would have ``directory``'s primary (a create is then one
        operation)."""

    def primary_here(self, ino: int) -> bool | None:
        """Whether this node would be the primary of inode ``ino``; None when ``ino`` is not
        of this node's group (no node of it is to be preferred)."""

    async def sync(self, ino: int) -> None:
        """Return once every record of ``ino`` (and of the entries of a directory) changed
        before the call is durable on its holders."""


@dataclass(frozen=True)
class Caller:
    """Who asks: the owner of what they create."""

    uid: int = 0
    gid: int = 0


class Namespace:
    """POSIX operations over ``Records`` (see the module docstring)."""

    def __init__(self, records: Records, rng: random.Random | None = None) -> None:
        self.records = records
        self._rng = rng or random.SystemRandom()
        self._dir_locks: QuickLocks[int] = QuickLocks()

    async def sync(self, ino: int) -> None:
        """fsync(2) of an inode's records: its attributes and, for a directory, its entries."""
        await self.records.sync(ino)

    # --- reads ----------------------------------------------------------------------------

    async def getattr(self, ino: int) -> Inode:
        found = await self.records.inode(ino)
        if found is None:
            raise FsError(errno.ENOENT, f"inode {ino:x} does not exist")
        return found

    async def lookup(self, directory: int, name: str) -> Inode:
        """The inode ``name`` names in ``directory`` (ENOENT, ENOTDIR, ENAMETOOLONG)."""
        valid_entry_name(name)
        entry = await self.records.entry(directory, name)
        if entry is None:
            parent = await self.getattr(directory)
            if not parent.is_dir:
                raise FsError(errno.ENOTDIR, f"inode {directory:x} is not a directory")
            raise FsError(errno.ENOENT, f"{name!r} does not exist")
        found = await self.records.inode(entry.ino)
        if found is None:  # an entry left by a crash or a lost race: the name is gone
            raise FsError(errno.ENOENT, f"{name!r} names a removed inode")
        return found

    async def readdir(self, directory: int) -> list[Entry]:
        parent = await self.getattr(directory)
        if not parent.is_dir:
            raise FsError(errno.ENOTDIR, f"inode {directory:x} is not a directory")
        return await self.records.entries(directory)

    async def readlink(self, ino: int) -> bytes:
        found = await self.getattr(ino)
        if not stat.S_ISLNK(found.mode):
            raise FsError(errno.EINVAL, f"inode {ino:x} is not a symbolic link")
        return await self.records.small_content(inode_name(ino))

    async def resolve(self, path: str) -> Inode:
        """The inode of a '/'-separated path from the root (no symbolic links followed)."""
        current = await self.getattr(ROOT_INO)
        for part in (p for p in path.split("/") if p):
            current = await self.lookup(current.ino, part)
        return current

    # --- creating -------------------------------------------------------------------------

    async def ensure_root(self, caller: Caller) -> Inode:
        """The root directory, made now if the cluster has none yet (idempotent)."""
        result = await self.records.apply(Op("make_inode", ROOT_INO, {
            "ino": ROOT_INO, "mode": ROOT_MODE, "uid": caller.uid, "gid": caller.gid,
            "rdev": 0, "parent": ROOT_INO, "exist_ok": True}))
        assert result.inode is not None
        return result.inode

    def new_ino(self) -> int:
        while True:
            ino = self._rng.randrange(2, MAX_INO)
            if ino != ROOT_INO:
                return ino

    def _dir_ino(self) -> int:
        """A new directory's inode number. Its group is drawn at random, so directories
        spread over the groups; when that is this node's own group, the number is drawn
        until this node is its primary. The files made in it are placed with it, so the
        work done through one mount -- a tree unpacked, built, removed -- is applied by that
        mount's own node, one hop less per operation (GlusterFS's NUFA places files on the
        local brick for the same reason), while the other holders keep their copies."""
        first = self.new_ino()
        if self.records.primary_here(first) is None:
            return first
        for _ in range(PLACE_TRIES):
            ino = self.new_ino()
            if self.records.primary_here(ino):
                return ino
        return first

    async def _owner(self, directory: int, caller: Caller, mode: int) -> tuple[int, int, int]:
        """(uid, gid, mode) of a new inode: the group and, for a directory, the setgid bit
        come from a setgid parent (BSD group semantics, as Linux does)."""
        parent = await self.getattr(directory)
        if not parent.is_dir:
            raise FsError(errno.ENOTDIR, f"inode {directory:x} is not a directory")
        if parent.mode & stat.S_ISGID:
            if stat.S_ISDIR(mode):
                mode |= stat.S_ISGID
            return caller.uid, parent.gid, mode
        return caller.uid, caller.gid, mode

    async def mknod(self, directory: int, name: str, mode: int, caller: Caller, rdev: int = 0,
                    target: bytes = b"") -> Inode:
        """A new inode of any type named ``name`` in ``directory`` (EEXIST if taken)."""
        valid_entry_name(name)
        kind = stat.S_IFMT(mode)
        if kind not in (stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, stat.S_IFIFO, stat.S_IFSOCK,
                        stat.S_IFCHR, stat.S_IFBLK):
            raise FsError(errno.EINVAL, f"cannot make an inode of mode {mode:o}")
        async with self._locked(directory):
            if await self.records.entry(directory, name) is not None:
                raise FsError(errno.EEXIST, f"{name!r} exists")
            uid, gid, mode = await self._owner(directory, caller, mode)
            if kind == stat.S_IFDIR:  # (a directory has a primary of its own: _dir_ino)
                ino = self._dir_ino()
                if self.records.placed_with(directory, ino):  # (made where its parent was)
                    placed = await self._create(directory, name, ino, mode, uid, gid, rdev,
                                                target)
                    if placed is not None:
                        return placed
            else:
                placed = await self._create_placed(directory, name, mode, uid, gid, rdev,
                                                   target)
                if placed is not None:
                    return placed
                ino = self.new_ino()
            made = await self.records.apply(Op("make_inode", ino, {
                "ino": ino, "mode": mode, "uid": uid, "gid": gid, "rdev": rdev,
                "parent": directory, "target": target}))
            try:
                await self.records.apply(Op("add_entry", directory, {
                    "directory": directory, "name": name, "child": ino, "kind": kind}))
            except BaseException:
                with trio.CancelScope(shield=True):
                    await self.drop_links(ino, 2 if kind == stat.S_IFDIR else 1)
                raise
        assert made.inode is not None
        return made.inode

    async def _create_placed(self, directory: int, name: str, mode: int, uid: int, gid: int,
                             rdev: int, target: bytes) -> Inode | None:
        """A new inode placed with its directory, made with its entry in one operation; None
        when no such inode number was found or the placement moved meanwhile (the caller
        makes it in two steps)."""
        for _ in range(PLACE_TRIES):
            ino = self.new_ino()
            if self.records.placed_with(directory, ino):
                return await self._create(directory, name, ino, mode, uid, gid, rdev, target)
        return None

    async def _create(self, directory: int, name: str, ino: int, mode: int, uid: int,
                      gid: int, rdev: int, target: bytes) -> Inode | None:
        """Inode ``ino``, placed with ``directory``, made with its entry in one operation;
        None if the placement moved meanwhile."""
        try:
            result = await self.records.apply(Op("create", directory, {
                "directory": directory, "name": name, "ino": ino, "mode": mode, "uid": uid,
                "gid": gid, "rdev": rdev, "target": target}))
        except FsError as exc:
            if exc.errno == errno.EAGAIN:
                return None
            raise
        assert result.inode is not None
        return result.inode

    async def mkdir(self, directory: int, name: str, mode: int, caller: Caller) -> Inode:
        return await self.mknod(directory, name, stat.S_IFDIR | (mode & 0o7777), caller)

    async def make_or_find_dir(self, directory: int, name: str, mode: int,
                               caller: Caller) -> Inode:
        """The inode ``name`` names in ``directory``, a new directory if it names none.

        Writers making the same path at once race: the loser's mkdir says EEXIST (its
        directory's primary has the winner's entry) while this node's own records may not
        have heard of that entry yet, so its lookup is tried again for a short while
        rather than failing with ENOENT for a directory that exists."""
        try:
            return await self.lookup(directory, name)
        except FsError as exc:
            if exc.errno != errno.ENOENT:
                raise
        try:
            return await self.mkdir(directory, name, mode, caller)
        except FsError as exc:
            if exc.errno != errno.EEXIST:
                raise
        for attempt in range(1, FIND_MADE_TRIES + 1):
            try:
                return await self.lookup(directory, name)
            except FsError as exc:
                if exc.errno != errno.ENOENT or attempt == FIND_MADE_TRIES:
                    raise
            await trio.sleep(attempt * FIND_MADE_STEP)
        raise AssertionError("unreachable")  # (the last try returned or raised)

    async def symlink(self, directory: int, name: str, target: bytes, caller: Caller) -> Inode:
        if len(target) > MAX_SYMLINK_BYTES:
            raise FsError(errno.ENAMETOOLONG, f"a link target is at most {MAX_SYMLINK_BYTES} "
                                              "bytes")
        if not target:
            raise FsError(errno.ENOENT, "a link target must not be empty")
        return await self.mknod(directory, name, stat.S_IFLNK | 0o777, caller, target=target)

    async def link(self, ino: int, directory: int, name: str) -> Inode:
        """A new name for an existing inode (not a directory: EPERM)."""
        valid_entry_name(name)
        found = await self.getattr(ino)
        if found.is_dir:
            raise FsError(errno.EPERM, "directories cannot be hard-linked")
        if found.nlink >= MAX_LINKS:
            raise FsError(errno.EMLINK, f"inode {ino:x} has too many links")
        async with self._locked(directory):
            if await self.records.entry(directory, name) is not None:
                raise FsError(errno.EEXIST, f"{name!r} exists")
            linked = await self.records.apply(Op("set_attrs", ino, {
                "ino": ino, "change": AttrChange(nlink_delta=1)}))
            try:
                await self.records.apply(Op("add_entry", directory, {
                    "directory": directory, "name": name, "child": ino, "kind": found.kind}))
            except BaseException:
                with trio.CancelScope(shield=True):
                    await self.drop_links(ino, 1)
                raise
        assert linked.inode is not None
        return linked.inode

    # --- removing -------------------------------------------------------------------------

    async def unlink(self, directory: int, name: str) -> Entry:
        """Remove a name that is not a directory; the inode goes with its last link."""
        async with self._locked(directory):
            entry = await self.records.entry(directory, name)
            if entry is not None and not entry.is_dir \
                    and self.records.placed_with(directory, entry.ino):
                removed = await self._in_one(Op("unlink", directory, {
                    "directory": directory, "name": name, "ino": entry.ino}))
                if removed is not None:
                    return removed
            result = await self.records.apply(Op("remove_entry", directory, {
                "directory": directory, "name": name, "want_dir": False}))
        assert result.entry is not None
        await self.drop_links(result.entry.ino, 1)
        return result.entry

    async def _in_one(self, op: Op) -> Entry | None:
        """A removal of a name and of (a link of) the inode placed with its directory, as one
        operation; None when the placement moved or the name changed meanwhile (the caller
        takes the two steps)."""
        try:
            result = await self.records.apply(op)
        except FsError as exc:
            if exc.errno in (errno.EAGAIN, errno.ESTALE):
                return None
            raise
        assert result.entry is not None
        return result.entry

    async def rmdir(self, directory: int, name: str) -> Entry:
        """Remove an empty directory (ENOTEMPTY, ENOTDIR; EINVAL for '.')."""
        if name == ".":
            raise FsError(errno.EINVAL, "cannot remove '.'")
        if name == "..":
            raise FsError(errno.ENOTEMPTY, "cannot remove '..'")
        async with self._locked(directory):
            entry = await self.records.entry(directory, name)
            if entry is None:
                await self.readdir(directory)  # ENOTDIR before ENOENT
                raise FsError(errno.ENOENT, f"{name!r} does not exist")
            if not entry.is_dir:
                raise FsError(errno.ENOTDIR, f"{name!r} is not a directory")
            if self.records.placed_with(directory, entry.ino) and await self._in_one(
                    Op("rmdir", directory, {"directory": directory, "name": name,
                                            "ino": entry.ino})) is not None:
                return entry
            await self.records.apply(Op("remove_dir", entry.ino, {"ino": entry.ino}))
            await self.records.apply(Op("remove_entry", directory, {
                "directory": directory, "name": name, "expect": entry.ino, "want_dir": True}))
        return entry

    async def drop_links(self, ino: int, count: int) -> None:
        """``count`` links fewer (the inode goes with the last); gone already is fine."""
        try:
            await self.records.apply(Op("set_attrs", ino, {
                "ino": ino, "change": AttrChange(nlink_delta=-count)}))
        except FsError as exc:
            if exc.errno != errno.ENOENT:
                raise

    # --- rename ---------------------------------------------------------------------------

    async def rename(self, old_dir: int, old: str, new_dir: int, new: str,
                     flags: int = 0) -> None:
        """rename(2) and renameat2's RENAME_NOREPLACE / RENAME_EXCHANGE."""
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE):
            raise FsError(errno.EINVAL, "unsupported rename flags")
        if flags & RENAME_NOREPLACE and flags & RENAME_EXCHANGE:
            raise FsError(errno.EINVAL, "RENAME_NOREPLACE and RENAME_EXCHANGE together")
        valid_entry_name(new)
        async with self._locked(old_dir, new_dir):
            source = await self.records.entry(old_dir, old)
            if source is None:
                await self.readdir(old_dir)
                raise FsError(errno.ENOENT, f"{old!r} does not exist")
            target = await self.records.entry(new_dir, new)
            if target is None:
                await self.readdir(new_dir)
            if source.is_dir and old_dir != new_dir:
                await self._not_inside(source.ino, new_dir)
            if flags & RENAME_EXCHANGE:
                if target is None:
                    raise FsError(errno.ENOENT, f"{new!r} does not exist")
                if target.is_dir and old_dir != new_dir:
                    await self._not_inside(target.ino, old_dir)
                await self._exchange(old_dir, source, new_dir, target)
                return
            if target is not None:
                if flags & RENAME_NOREPLACE:
                    raise FsError(errno.EEXIST, f"{new!r} exists")
                if target.ino == source.ino:
                    return  # two links of one inode: nothing to do
                if source.is_dir and not target.is_dir:
                    raise FsError(errno.ENOTDIR, f"{new!r} is not a directory")
                if target.is_dir and not source.is_dir:
                    raise FsError(errno.EISDIR, f"{new!r} is a directory")
                if target.is_dir:  # must be empty; removed before it is replaced
                    await self.records.apply(Op("remove_dir", target.ino, {"ino": target.ino}))
            expect = target.ino if target is not None else 0
            if old_dir == new_dir:
                await self.records.apply(Op("move_entry", old_dir, {
                    "directory": old_dir, "old": old, "new": new, "replace_ok": True,
                    "expect": expect}))
            else:
                await self.records.apply(Op("add_entry", new_dir, {
                    "directory": new_dir, "name": new, "child": source.ino, "kind": source.kind,
                    "replace_ok": True, "expect": expect}))
                await self.records.apply(Op("remove_entry", old_dir, {
                    "directory": old_dir, "name": old, "expect": source.ino}))
            change = AttrChange(parent=new_dir if source.is_dir else None, touch=True)
            await self._set(source.ino, change)
        if target is not None and not target.is_dir:
            await self.drop_links(target.ino, 1)

    async def _exchange(self, old_dir: int, source: Entry, new_dir: int, target: Entry) -> None:
        if old_dir == new_dir:
            await self.records.apply(Op("exchange_entries", old_dir, {
                "directory": old_dir, "first": source.name, "second": target.name}))
        else:
            await self.records.apply(Op("add_entry", new_dir, {
                "directory": new_dir, "name": target.name, "child": source.ino,
                "kind": source.kind, "replace_ok": True, "expect": target.ino,
                "exchange": True}))
            await self.records.apply(Op("add_entry", old_dir, {
                "directory": old_dir, "name": source.name, "child": target.ino,
                "kind": target.kind, "replace_ok": True, "expect": source.ino,
                "exchange": True}))
        for entry, parent in ((source, new_dir), (target, old_dir)):
            await self._set(entry.ino, AttrChange(parent=parent if entry.is_dir else None,
                                                  touch=True))

    async def _set(self, ino: int, change: AttrChange) -> None:
        try:
            await self.records.apply(Op("set_attrs", ino, {"ino": ino, "change": change}))
        except FsError as exc:
            if exc.errno != errno.ENOENT:
                raise

    async def _not_inside(self, moved: int, destination: int) -> None:
        """EINVAL if ``destination`` is ``moved`` or below it (a directory into itself)."""
        current = destination
        for _ in range(MAX_DEPTH):
            if current == moved:
                raise FsError(errno.EINVAL, "cannot move a directory into itself")
            if current == ROOT_INO:
                return
            current = (await self.getattr(current)).parent
        raise FsError(errno.ELOOP, "directory tree too deep")

    # --- attributes -----------------------------------------------------------------------

    async def setattr(self, ino: int, change: AttrChange) -> Inode:
        result = await self.records.apply(Op("set_attrs", ino, {"ino": ino, "change": change}))
        assert result.inode is not None
        return result.inode

    async def getxattr(self, ino: int, name: str) -> bytes:
        values = await self.listxattr(ino)
        if name not in values:
            raise FsError(errno.ENODATA, f"no attribute {name!r}")
        return values[name]

    async def listxattr(self, ino: int) -> dict[str, bytes]:
        # (asked before every write, for security.capability: no content record looked up)
        found = await self.records.bare_inode(ino)
        if found is None:
            raise FsError(errno.ENOENT, f"inode {ino:x} does not exist")
        if not found.flags & HAS_XATTRS:
            return {}
        try:
            return decode_xattrs(await self.records.small_content(xattrs_name(ino)))
        except ValueError as exc:
            raise FsError(errno.EIO, str(exc)) from exc

    async def setxattr(self, ino: int, name: str, value: bytes | None, flags: int = 0) -> None:
        await self.records.apply(Op("set_xattr", ino, {
            "ino": ino, "name": name, "value": value, "flags": flags}))

    # --- local serialisation --------------------------------------------------------------

    def _locked(self, *directories: int) -> AbstractAsyncContextManager[None]:
        """Changes to the same directories through this namespace, one at a time (sorted:
        two renames in opposite directions cannot deadlock)."""
        return self._dir_locks.hold_all(directories)
