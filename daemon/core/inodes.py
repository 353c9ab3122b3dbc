"""Inodes and directory entries as records, and the rules of every namespace operation.

The filesystem is a set of records (``daemon.core.keys``): an inode record per file,
directory, symbolic link or special file, a directory-entry record per name, a content record
per regular file. This module says what their ``attrs`` hold and how each operation turns the
records it reads into the records it writes. It is pure: no clock, no store, no network. The
primary of an inode (``daemon.namespace.primary``) runs these rules under a lock, stamps the
records with versions and stores them on the inode's holders; the in-memory namespace of the
tests runs the same rules.

Why content lives in its own record (``d/<ino>``) and not in the inode's: attributes are
changed only by the primary (one writer at a time, so a link count or an owner is never lost
to a race), while content is written by whichever mount closes the file, as a whole new
version (the last writer wins, as for any object). A stat joins the two: the size and the
content's mtime come from the content record, the rest from the inode; whichever of an
explicit ``utimens`` and a content write is newer gives the mtime (``Inode.join``).
"""

from __future__ import annotations

import errno
import stat
import struct
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any, NamedTuple, Protocol

from .keys import ROOT_INO, data_name, entry_name, inode_name, parse_entry, xattrs_name
from .manifest import manifest_sizes
from .messages import TupleEntry, Version

#: attrs of an inode record: format, uid, gid, nlink, rdev, atime, ctime, the clock of the
#: last explicit mtime, parent inode (a directory's '..'; another kind's first parent), flags.
_INODE_ATTRS = struct.Struct(">BIIIQqqQQH")
_INODE_FORMAT = 1
#: attrs of an entry record: format, child inode, child type (S_IFMT bits >> 12).
_ENTRY_ATTRS = struct.Struct(">BQB")
_ENTRY_FORMAT = 1
#: Extended attributes: count, then (name length u8, name, value length u32, value) each.
_XATTR_COUNT = struct.Struct(">H")
_XATTR_NAME = struct.Struct(">B")
_XATTR_VALUE = struct.Struct(">I")

#: Inode flag: the inode has user extended attributes (an ``x/`` record worth reading).
HAS_XATTRS = 1

MAX_NAME_BYTES = 255
#: Most links one inode may have (ext4's limit).
MAX_LINKS = 65000
MAX_XATTR_NAME = 255
MAX_XATTR_VALUE = 65536
MAX_XATTRS_BYTES = 1 << 20
MAX_SYMLINK_BYTES = 4095
#: A directory's st_size: a constant, as on many network filesystems.
DIR_SIZE = 4096
#: setxattr flags (linux/xattr.h).
XATTR_CREATE = 1
XATTR_REPLACE = 2
_NS_PER_CLOCK_MS = 1_000_000


class FsError(Exception):
    """An operation refused with a POSIX error: ``errno`` and a message for people."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.errno = code
        self.message = message


def clock_ns(clock: int) -> int:
    """The wall time (ns, millisecond precision) a hybrid-logical-clock value was stamped at."""
    return (clock >> 16) * _NS_PER_CLOCK_MS


def file_type(mode: int) -> int:
    return stat.S_IFMT(mode) >> 12


def valid_entry_name(name: str) -> None:
    """ENAMETOOLONG / EINVAL for a name no directory entry may have."""
    raw = name.encode("utf-8", "surrogateescape")
    if len(raw) > MAX_NAME_BYTES:
        raise FsError(errno.ENAMETOOLONG, f"a name is at most {MAX_NAME_BYTES} bytes")
    if not raw or name in (".", "..") or "/" in name or "\x00" in name:
        raise FsError(errno.EINVAL, f"{name!r} cannot name a directory entry")


# --- inodes -------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Inode:
    """What stat says about an inode: its record and its content's, joined."""

    ino: int
    mode: int
    uid: int
    gid: int
    nlink: int
    rdev: int
    size: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    parent: int
    flags: int = 0
    #: The clock at which the mtime was set explicitly (or the inode made).
    mtime_clock: int = 0
    version: Version | None = None
    #: The content record's version (None: no content written yet).
    content: Version | None = None
    #: Bytes the content stores (less than ``size`` when a chunked file has holes).
    stored: int | None = None

    @property
    def kind(self) -> int:
        return stat.S_IFMT(self.mode)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    def attrs(self) -> bytes:
        return _INODE_ATTRS.pack(_INODE_FORMAT, self.uid, self.gid, self.nlink, self.rdev,
                                 self.atime_ns, self.ctime_ns, self.mtime_clock, self.parent,
                                 self.flags)

    @classmethod
    def from_record(cls, ino: int, t: TupleEntry) -> Inode:
        """The inode of an ``i/`` record (ValueError if its attrs are not an inode's)."""
        if len(t.attrs) != _INODE_ATTRS.size or t.attrs[0] != _INODE_FORMAT:
            raise ValueError(f"{t.name}: not an inode record")
        (_, uid, gid, nlink, rdev, atime, ctime, mtime_clock, parent,
         flags) = _INODE_ATTRS.unpack(t.attrs)
        size = DIR_SIZE if stat.S_ISDIR(t.mode) else t.size
        return cls(ino, t.mode, uid, gid, nlink, rdev, size, atime, t.mtime_ns, ctime, parent,
                   flags, mtime_clock, t.version)

    def join(self, content: TupleEntry | None) -> Inode:
        """With its content record: size, and mtime/ctime of a later content write."""
        if content is None or content.tombstone or not stat.S_ISREG(self.mode):
            return self
        written = clock_ns(content.version.clock)
        mtime = content.mtime_ns if content.version.clock > self.mtime_clock else self.mtime_ns
        size, stored = manifest_sizes(content.attrs) or (content.size, content.size)
        return replace(self, size=size, mtime_ns=mtime, ctime_ns=max(self.ctime_ns, written),
                       content=content.version, stored=stored)


class Entry(NamedTuple):
    """A directory entry: its name, the inode it names and that inode's type."""

    name: str
    ino: int
    kind: int  # S_IFMT bits

    @property
    def is_dir(self) -> bool:
        return self.kind == stat.S_IFDIR


def entry_attrs(ino: int, kind: int) -> bytes:
    return _ENTRY_ATTRS.pack(_ENTRY_FORMAT, ino, kind >> 12)


def entry_from_record(t: TupleEntry) -> Entry | None:
    """The entry an ``e/`` record names (None for a tombstone or a malformed record)."""
    parsed = parse_entry(t.name)
    if t.tombstone or parsed is None or len(t.attrs) != _ENTRY_ATTRS.size:
        return None
    fmt, ino, kind = _ENTRY_ATTRS.unpack(t.attrs)
    if fmt != _ENTRY_FORMAT:
        return None
    return Entry(parsed[1], ino, kind << 12)


# --- extended attributes --------------------------------------------------------------------

def encode_xattrs(values: dict[str, bytes]) -> bytes:
    parts = [_XATTR_COUNT.pack(len(values))]
    for name in sorted(values):
        raw = name.encode("utf-8", "surrogateescape")
        parts += [_XATTR_NAME.pack(len(raw)), raw, _XATTR_VALUE.pack(len(values[name])),
                  values[name]]
    return b"".join(parts)


def decode_xattrs(data: bytes) -> dict[str, bytes]:
    """The attributes of an ``x/`` record's content (ValueError if malformed)."""
    try:
        (count,) = _XATTR_COUNT.unpack_from(data, 0)
        at = _XATTR_COUNT.size
        out: dict[str, bytes] = {}
        for _ in range(count):
            (n,) = _XATTR_NAME.unpack_from(data, at)
            at += 1
            name = data[at:at + n].decode("utf-8", "surrogateescape")
            at += n
            (m,) = _XATTR_VALUE.unpack_from(data, at)
            at += 4
            if at + m > len(data):
                raise ValueError("value runs past the end")
            out[name] = bytes(data[at:at + m])
            at += m
    except (struct.error, UnicodeDecodeError) as exc:
        raise ValueError(f"malformed extended attributes: {exc}") from exc
    if at != len(data):
        raise ValueError("malformed extended attributes: trailing bytes")
    return out


# --- what an operation reads and writes -----------------------------------------------------

class View(Protocol):
    """The records a primary holds, as the rules read them."""

    def record(self, name: str) -> TupleEntry | None:
        """The newest tuple of ``name`` (tombstones included), or None."""

    def entries(self, directory: int) -> Iterable[TupleEntry]:
        """The newest tuples of every entry record of ``directory`` (tombstones included)."""

    def content(self, name: str) -> bytes | None:
        """The content of the newest version of ``name`` held here (small records only)."""


class Write(NamedTuple):
    """A record to store: its fields, and its content (None: a tombstone)."""

    name: str
    mode: int
    mtime_ns: int
    attrs: bytes
    content: bytes | None


@dataclass
class Outcome:
    """What an operation writes and what it answers."""

    writes: list[Write]
    inode: Inode | None = None
    entry: Entry | None = None  # the entry replaced or removed

    def add_inode(self, ino: Inode, content: bytes) -> None:
        self.writes.append(Write(inode_name(ino.ino), ino.mode, ino.mtime_ns, ino.attrs(),
                                 content))
        self.inode = ino


def _live(t: TupleEntry | None) -> TupleEntry | None:
    return None if t is None or t.tombstone else t


def current_inode(view: View, ino: int) -> Inode | None:
    """The inode as its records say now (joined with its content), or None."""
    t = _live(view.record(inode_name(ino)))
    if t is None:
        return None
    try:
        return Inode.from_record(ino, t).join(view.record(data_name(ino)))
    except ValueError:
        return None


def _require(view: View, ino: int) -> Inode:
    found = current_inode(view, ino)
    if found is None:
        raise FsError(errno.ENOENT, f"inode {ino:x} does not exist")
    return found


def _require_dir(view: View, ino: int) -> Inode:
    found = _require(view, ino)
    if not found.is_dir:
        raise FsError(errno.ENOTDIR, f"inode {ino:x} is not a directory")
    return found


def _own_content(view: View, ino: Inode) -> bytes:
    """The inode record's own content, kept across attribute changes (a symlink target)."""
    if not stat.S_ISLNK(ino.mode):
        return b""
    data = view.content(inode_name(ino.ino))
    if data is None:
        raise FsError(errno.EIO, f"the target of symbolic link {ino.ino:x} is not held here")
    return data


def live_entries(view: View, directory: int) -> list[Entry]:
    found = (entry_from_record(t) for t in view.entries(directory))
    return sorted((e for e in found if e is not None), key=lambda e: e.name)


# --- the operations -------------------------------------------------------------------------

def make_inode(view: View, now_ns: int, clock: int, ino: int, mode: int, uid: int, gid: int,
               rdev: int, parent: int, target: bytes = b"", exist_ok: bool = False) -> Outcome:
    """A new inode with one link (two for a directory: its entry and its '.')."""
    existing = current_inode(view, ino)
    if existing is not None:
        if exist_ok:
            return Outcome([], existing)
        raise FsError(errno.EEXIST, f"inode {ino:x} exists")
    if stat.S_ISLNK(mode) and not 0 < len(target) <= MAX_SYMLINK_BYTES:
        raise FsError(errno.ENAMETOOLONG if target else errno.ENOENT,
                      f"a symbolic link's target is 1..{MAX_SYMLINK_BYTES} bytes")
    size = len(target) if stat.S_ISLNK(mode) else 0
    made = Inode(ino, mode, uid, gid, 2 if stat.S_ISDIR(mode) else 1, rdev, size, now_ns,
                 now_ns, now_ns, parent, 0, clock)
    out = Outcome([])
    out.add_inode(made, target)
    return out


def create(view: View, now_ns: int, clock: int, directory: int, name: str, ino: int,
           mode: int, uid: int, gid: int, rdev: int = 0, target: bytes = b"") -> Outcome:
    """``make_inode`` and ``add_entry`` in one step, for an inode placed with its directory
    (one primary holds both): a create is one operation, and a crash can never leave the
    inode without its name. EEXIST if the name is taken; nothing is written then."""
    made = make_inode(view, now_ns, clock, ino, mode, uid, gid, rdev, directory, target)
    linked = add_entry(view, now_ns, clock, directory, name, ino, stat.S_IFMT(mode))
    return Outcome(made.writes + linked.writes, made.inode, linked.entry)


def _touched(directory: Inode, now_ns: int, clock: int, nlink_delta: int) -> Inode:
    return replace(directory, mtime_ns=now_ns, ctime_ns=now_ns, mtime_clock=clock,
                   nlink=max(2, directory.nlink + nlink_delta))


def add_entry(view: View, now_ns: int, clock: int, directory: int, name: str, child: int,
              kind: int, replace_ok: bool = False, expect: int | None = None,
              exchange: bool = False) -> Outcome:
    """Name ``child`` ``name`` in ``directory``.

    An existing entry is EEXIST unless ``replace_ok``; then it is replaced if it is of a
    compatible type (a directory by a directory, anything else by a non-directory), and only
    if it names ``expect`` when that is given (ESTALE otherwise: the caller looked at another
    state). ``expect`` 0 means the name must still be free. ``exchange`` (one half of a
    RENAME_EXCHANGE across directories) replaces whatever type ``expect`` is. The directory's
    mtime and ctime move; its link count follows the subdirectories.
    """
    valid_entry_name(name)
    parent = _require_dir(view, directory)
    old = view.record(entry_name(directory, name))
    previous = entry_from_record(old) if old is not None else None
    if expect is not None and (previous.ino if previous is not None else 0) != expect:
        raise FsError(errno.ESTALE, f"{name!r} changed meanwhile")
    if previous is not None and previous.ino == child:
        return Outcome([], parent, previous)  # already so (a retried request)
    if previous is not None:
        if not replace_ok:
            raise FsError(errno.EEXIST, f"{name!r} exists")
        if not exchange:
            _check_replace(name, previous, kind)
    delta = (kind == stat.S_IFDIR) - (previous is not None and previous.is_dir)
    if parent.nlink >= MAX_LINKS and delta > 0:
        raise FsError(errno.EMLINK, "too many subdirectories")
    out = Outcome([Write(entry_name(directory, name), 0, now_ns, entry_attrs(child, kind), b"")],
                  entry=previous)
    out.add_inode(_touched(parent, now_ns, clock, delta), b"")
    return out


def remove_entry(view: View, now_ns: int, clock: int, directory: int, name: str,
                 expect: int | None = None, want_dir: bool | None = None) -> Outcome:
    """Remove ``name`` from ``directory`` (ENOENT if absent; ESTALE if it names another inode
    than ``expect``; ENOTDIR / EISDIR when ``want_dir`` says which kind it must be)."""
    parent = _require_dir(view, directory)
    old = view.record(entry_name(directory, name))
    previous = entry_from_record(old) if old is not None else None
    if previous is None:
        raise FsError(errno.ENOENT, f"{name!r} does not exist")
    if expect is not None and previous.ino != expect:
        raise FsError(errno.ESTALE, f"{name!r} changed meanwhile")
    if want_dir is True and not previous.is_dir:
        raise FsError(errno.ENOTDIR, f"{name!r} is not a directory")
    if want_dir is False and previous.is_dir:
        raise FsError(errno.EISDIR, f"{name!r} is a directory")
    out = Outcome([Write(entry_name(directory, name), 0, now_ns, b"", None)], entry=previous)
    out.add_inode(_touched(parent, now_ns, clock, -1 if previous.is_dir else 0), b"")
    return out


def _entry_at(view: View, directory: int, name: str) -> Entry | None:
    t = view.record(entry_name(directory, name))
    return entry_from_record(t) if t is not None else None


def _check_replace(name: str, previous: Entry, kind: int) -> None:
    if previous.is_dir and kind != stat.S_IFDIR:
        raise FsError(errno.EISDIR, f"{name!r} is a directory")
    if not previous.is_dir and kind == stat.S_IFDIR:
        raise FsError(errno.ENOTDIR, f"{name!r} is not a directory")


def move_entry(view: View, now_ns: int, clock: int, directory: int, old: str, new: str,
               replace_ok: bool = False, expect: int | None = None) -> Outcome:
    """Rename within one directory, atomically: ``old`` becomes ``new`` (replacing what
    ``new`` named, under ``add_entry``'s rules). The same inode under both names (hard
    links) changes nothing, as POSIX says."""
    valid_entry_name(new)
    parent = _require_dir(view, directory)
    source = _entry_at(view, directory, old)
    if source is None:
        raise FsError(errno.ENOENT, f"{old!r} does not exist")
    target = _entry_at(view, directory, new)
    if expect is not None and (target.ino if target is not None else 0) != expect:
        raise FsError(errno.ESTALE, f"{new!r} changed meanwhile")
    if target is not None:
        if target.ino == source.ino:
            return Outcome([], parent)
        if not replace_ok:
            raise FsError(errno.EEXIST, f"{new!r} exists")
        _check_replace(new, target, source.kind)
    out = Outcome([Write(entry_name(directory, new), 0, now_ns,
                         entry_attrs(source.ino, source.kind), b""),
                   Write(entry_name(directory, old), 0, now_ns, b"", None)], entry=target)
    delta = -1 if target is not None and target.is_dir else 0
    out.add_inode(_touched(parent, now_ns, clock, delta), b"")
    return out


def exchange_entries(view: View, now_ns: int, clock: int, directory: int, first: str,
                     second: str) -> Outcome:
    """Swap two entries of one directory (RENAME_EXCHANGE within a directory)."""
    parent = _require_dir(view, directory)
    found = []
    for name in (first, second):
        t = view.record(entry_name(directory, name))
        entry = entry_from_record(t) if t is not None else None
        if entry is None:
            raise FsError(errno.ENOENT, f"{name!r} does not exist")
        found.append(entry)
    a, b = found
    out = Outcome([Write(entry_name(directory, first), 0, now_ns, entry_attrs(b.ino, b.kind),
                         b""),
                   Write(entry_name(directory, second), 0, now_ns, entry_attrs(a.ino, a.kind),
                         b"")])
    out.add_inode(_touched(parent, now_ns, clock, 0), b"")
    return out


@dataclass(frozen=True)
class AttrChange:
    """Attributes to set (None: unchanged). ``atime_ns``/``mtime_ns`` are values already
    resolved from UTIME_NOW by the caller; ``nlink_delta`` adds or removes links."""

    mode: int | None = None  # permission bits only (the type never changes)
    uid: int | None = None
    gid: int | None = None
    atime_ns: int | None = None
    mtime_ns: int | None = None
    nlink_delta: int = 0
    parent: int | None = None
    #: Only the ctime moves (an entry renamed, content written through another record).
    touch: bool = False
    #: An access recorded (relatime): the atime moves, the ctime does not, as POSIX says.
    access: bool = False


def set_attrs(view: View, now_ns: int, clock: int, ino: int, change: AttrChange) -> Outcome:
    """Change an inode's attributes; ctime moves. A link count that falls to 0 removes the
    inode, its content and its extended attributes (tombstones)."""
    current = _require(view, ino)
    fields: dict[str, Any] = {}  # (one ``replace``: it is slow, and this is every chmod)
    if change.mode is not None:
        fields["mode"] = stat.S_IFMT(current.mode) | (change.mode & 0o7777)
    if change.uid is not None:
        fields["uid"] = change.uid
    if change.gid is not None:
        fields["gid"] = change.gid
    if change.atime_ns is not None:
        fields["atime_ns"] = change.atime_ns
    if change.mtime_ns is not None:
        fields["mtime_ns"], fields["mtime_clock"] = change.mtime_ns, clock
    if change.parent is not None:
        fields["parent"] = change.parent
    if change.nlink_delta:
        links = current.nlink + change.nlink_delta
        if links > MAX_LINKS:
            raise FsError(errno.EMLINK, f"inode {ino:x} has too many links")
        fields["nlink"] = max(0, links)
    if not change.access:
        fields["ctime_ns"] = max(now_ns, current.ctime_ns)
    updated = replace(current, **fields) if fields else current
    if updated.nlink == 0 or (updated.is_dir and updated.nlink < 2):
        return _removed(view, now_ns, updated)
    out = Outcome([])
    # The mtime written is the joined one: a content write's mtime is kept only while it is
    # the newer (``Inode.join``), so an inode record must not carry it as its own.
    record_mtime = updated.mtime_ns if change.mtime_ns is not None else _record_mtime(view, ino)
    out.add_inode(replace(updated, mtime_ns=record_mtime), _own_content(view, current))
    out.inode = updated
    return out


def _record_mtime(view: View, ino: int) -> int:
    t = view.record(inode_name(ino))
    return t.mtime_ns if t is not None else 0


def _removed(view: View, now_ns: int, ino: Inode) -> Outcome:
    out = Outcome([Write(inode_name(ino.ino), ino.mode, now_ns, b"", None)], replace(ino, nlink=0))
    for name in (data_name(ino.ino), xattrs_name(ino.ino)):
        if _live(view.record(name)) is not None:
            out.writes.append(Write(name, 0, now_ns, b"", None))
    return out


def remove_dir(view: View, now_ns: int, clock: int, ino: int) -> Outcome:
    """Remove an empty directory's inode (ENOTEMPTY if any entry is left; ENOTDIR if it is
    not one). Run before its entry is removed from the parent, at the directory's primary,
    which also takes every create inside it: no entry can slip in between check and removal."""
    if ino == ROOT_INO:
        raise FsError(errno.EBUSY, "the root directory cannot be removed")
    current = _require_dir(view, ino)
    if live_entries(view, ino):
        raise FsError(errno.ENOTEMPTY, f"directory {ino:x} is not empty")
    return _removed(view, now_ns, current)


def unlink(view: View, now_ns: int, clock: int, directory: int, name: str,
           ino: int) -> Outcome:
    """``remove_entry`` of a name that is not a directory's and one link fewer of the inode
    it names, in one step, for an inode placed with its directory (one primary holds both,
    as for ``create``). ESTALE if ``name`` no longer names ``ino``."""
    removed = remove_entry(view, now_ns, clock, directory, name, expect=ino, want_dir=False)
    dropped = set_attrs(view, now_ns, clock, ino, AttrChange(nlink_delta=-1))
    return Outcome(removed.writes + dropped.writes, dropped.inode, removed.entry)


def rmdir(view: View, now_ns: int, clock: int, directory: int, name: str,
          ino: int) -> Outcome:
    """``remove_dir`` and ``remove_entry`` in one step, for a directory placed with its
    parent (the primary then takes every create inside it as well). ESTALE if ``name`` no
    longer names ``ino``."""
    gone = remove_dir(view, now_ns, clock, ino)
    removed = remove_entry(view, now_ns, clock, directory, name, expect=ino, want_dir=True)
    return Outcome(gone.writes + removed.writes, None, removed.entry)


def current_xattrs(view: View, ino: Inode) -> dict[str, bytes]:
    if not ino.flags & HAS_XATTRS:
        return {}
    data = view.content(xattrs_name(ino.ino))
    if data is None:
        raise FsError(errno.EIO, f"the extended attributes of {ino.ino:x} are not held here")
    try:
        return decode_xattrs(data)
    except ValueError as exc:
        raise FsError(errno.EIO, str(exc)) from exc


def set_xattr(view: View, now_ns: int, clock: int, ino: int, name: str, value: bytes | None,
              flags: int = 0) -> Outcome:
    """Set (``value``) or remove (None) one extended attribute; ctime moves."""
    raw = name.encode("utf-8", "surrogateescape")
    if not raw or len(raw) > MAX_XATTR_NAME:
        raise FsError(errno.ERANGE, "an attribute name is 1..255 bytes")
    if value is not None and len(value) > MAX_XATTR_VALUE:
        raise FsError(errno.E2BIG, f"an attribute value is at most {MAX_XATTR_VALUE} bytes")
    current = _require(view, ino)
    values = current_xattrs(view, current)
    if value is None:
        if name not in values:
            raise FsError(errno.ENODATA, f"no attribute {name!r}")
        del values[name]
    else:
        if flags & XATTR_CREATE and name in values:
            raise FsError(errno.EEXIST, f"attribute {name!r} exists")
        if flags & XATTR_REPLACE and name not in values:
            raise FsError(errno.ENODATA, f"no attribute {name!r}")
        values[name] = value
    encoded = encode_xattrs(values)
    if len(encoded) > MAX_XATTRS_BYTES:
        raise FsError(errno.ENOSPC, "no room for more extended attributes on this inode")
    flags_now = (current.flags | HAS_XATTRS) if values else (current.flags & ~HAS_XATTRS)
    updated = replace(current, flags=flags_now, ctime_ns=max(now_ns, current.ctime_ns))
    out = Outcome([Write(xattrs_name(ino), 0, now_ns, b"", encoded if values else None)])
    out.add_inode(replace(updated, mtime_ns=_record_mtime(view, ino)), _own_content(view, current))
    out.inode = updated
    return out
