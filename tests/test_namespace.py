"""The namespace's POSIX semantics, on in-memory records (no mount, no cluster, no root).

The rules are those every primary runs (``daemon.core.inodes``), composed by
``daemon.namespace.vfs.Namespace`` as the mount composes them.
"""

from __future__ import annotations

import errno
import random
import stat
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest
import trio
import trio.testing

from daemon.core.inodes import (
    HAS_XATTRS,
    XATTR_CREATE,
    XATTR_REPLACE,
    AttrChange,
    Entry,
    FsError,
    Inode,
    decode_xattrs,
    encode_xattrs,
)
from daemon.core.keys import ROOT_INO, data_name, inode_name, placement_key
from daemon.namespace.memory import MemoryRecords
from daemon.namespace.ops import Op, from_json, to_json
from daemon.namespace.vfs import RENAME_EXCHANGE, RENAME_NOREPLACE, Caller, Namespace

_T = TypeVar("_T")
ROOT = Caller(0, 0)
USER = Caller(1000, 1000)


class Clock:
    """A wall clock tests move by hand (ns)."""

    def __init__(self) -> None:
        self.now = 1_700_000_000_000_000_000

    def __call__(self) -> int:
        return self.now

    def advance(self, seconds: float = 1.0) -> None:
        self.now += int(seconds * 1e9)


class World:
    def __init__(self) -> None:
        self.clock = Clock()
        self.records = MemoryRecords(self.clock)
        self.ns = Namespace(self.records, random.Random(7))

    def do(self, fn: Callable[..., Awaitable[_T]], *args: Any) -> _T:
        async def call() -> _T:
            return await fn(*args)
        return trio.run(call)

    def fails(self, code: int, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        with pytest.raises(FsError) as info:
            self.do(fn, *args)
        assert info.value.errno == code, (errno.errorcode[info.value.errno], info.value)

    def stat(self, ino: int) -> Inode:
        return self.do(self.ns.getattr, ino)

    def mkdir(self, parent: int, name: str, mode: int = 0o755, caller: Caller = ROOT) -> Inode:
        return self.do(self.ns.mkdir, parent, name, mode, caller)

    def create(self, parent: int, name: str, mode: int = 0o644, caller: Caller = ROOT) -> Inode:
        return self.do(self.ns.mknod, parent, name, stat.S_IFREG | mode, caller)

    def names(self, directory: int) -> list[str]:
        return [e.name for e in self.do(self.ns.readdir, directory)]


@pytest.fixture
def w() -> World:
    world = World()
    world.do(world.ns.ensure_root, ROOT)
    return world


def test_root_exists_once(w: World) -> None:
    root = w.stat(ROOT_INO)
    assert root.is_dir and root.nlink == 2 and root.parent == ROOT_INO
    again = w.do(w.ns.ensure_root, USER)
    assert again.uid == 0  # made once; a second ensure changes nothing


def test_create_lookup_and_list(w: World) -> None:
    d = w.mkdir(ROOT_INO, "d")
    f = w.create(d.ino, "f")
    assert w.do(w.ns.lookup, d.ino, "f").ino == f.ino
    assert w.names(d.ino) == ["f"] and w.names(ROOT_INO) == ["d"]
    assert stat.S_ISREG(f.mode) and f.nlink == 1 and f.size == 0
    w.fails(errno.EEXIST, w.ns.mknod, d.ino, "f", stat.S_IFREG | 0o644, ROOT)
    w.fails(errno.EEXIST, w.ns.mkdir, d.ino, "f", 0o755, ROOT)
    w.fails(errno.ENOENT, w.ns.lookup, d.ino, "missing")
    w.fails(errno.ENOTDIR, w.ns.lookup, f.ino, "x")
    w.fails(errno.ENOTDIR, w.ns.mknod, f.ino, "x", stat.S_IFREG | 0o644, ROOT)
    w.fails(errno.ENAMETOOLONG, w.ns.lookup, d.ino, "x" * 256)
    w.fails(errno.ENAMETOOLONG, w.ns.mkdir, d.ino, "x" * 256, 0o755, ROOT)
    assert w.create(d.ino, "y" * 255).ino  # 255 bytes is fine


def test_a_new_directory_has_the_node_it_was_made_through_as_primary_in_its_group(
        w: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """Its group is drawn at random (directories spread over the groups); within this node's
    own group, this node is its primary. Said here: odd numbers are of another group, and
    this node is the primary of the multiples of 3."""
    def primary_here(ino: int) -> bool | None:
        return None if ino % 2 else ino % 3 == 0

    monkeypatch.setattr(w.records, "primary_here", primary_here)
    made = [w.mkdir(ROOT_INO, f"d{i}").ino for i in range(200)]
    own = [ino for ino in made if ino % 2 == 0]
    assert all(ino % 3 == 0 for ino in own)
    assert 60 < len(own) < 140


def test_directory_link_counts_follow_subdirectories(w: World) -> None:
    d = w.mkdir(ROOT_INO, "d")
    assert w.stat(ROOT_INO).nlink == 3 and d.nlink == 2
    w.mkdir(d.ino, "a")
    w.mkdir(d.ino, "b")
    w.create(d.ino, "f")
    assert w.stat(d.ino).nlink == 4
    w.do(w.ns.rmdir, d.ino, "a")
    assert w.stat(d.ino).nlink == 3
    e = w.mkdir(ROOT_INO, "e")
    w.do(w.ns.rename, d.ino, "b", e.ino, "b")
    assert (w.stat(d.ino).nlink, w.stat(e.ino).nlink) == (2, 3)
    b = w.do(w.ns.lookup, e.ino, "b")
    assert b.parent == e.ino


def test_parent_times_move_with_its_entries(w: World) -> None:
    d = w.mkdir(ROOT_INO, "d")
    for change in ("create", "unlink", "mkdir", "rmdir", "rename-in", "link"):
        before = w.stat(d.ino)
        w.clock.advance()
        if change == "create":
            w.create(d.ino, "f")
        elif change == "unlink":
            w.do(w.ns.unlink, d.ino, "f")
        elif change == "mkdir":
            w.mkdir(d.ino, "sub")
        elif change == "rmdir":
            w.do(w.ns.rmdir, d.ino, "sub")
        elif change == "rename-in":
            w.create(ROOT_INO, "g")
            before = w.stat(d.ino)
            w.clock.advance()
            w.do(w.ns.rename, ROOT_INO, "g", d.ino, "g")
        else:
            g = w.do(w.ns.lookup, d.ino, "g")
            w.do(w.ns.link, g.ino, d.ino, "g2")
        after = w.stat(d.ino)
        assert after.mtime_ns > before.mtime_ns and after.ctime_ns > before.ctime_ns, change


def test_hard_links_share_one_inode(w: World) -> None:
    a = w.mkdir(ROOT_INO, "a")
    b = w.mkdir(ROOT_INO, "b")
    f = w.create(a.ino, "f")
    w.records.write_content(f.ino, b"hello")
    w.clock.advance()
    linked = w.do(w.ns.link, f.ino, b.ino, "g")
    assert linked.nlink == 2 and linked.ctime_ns > f.ctime_ns
    g = w.do(w.ns.lookup, b.ino, "g")
    assert (g.ino, g.nlink, g.size) == (f.ino, 2, 5)
    w.fails(errno.EEXIST, w.ns.link, f.ino, b.ino, "g")
    w.fails(errno.EPERM, w.ns.link, a.ino, b.ino, "dirlink")
    w.do(w.ns.unlink, a.ino, "f")
    assert w.stat(f.ino).nlink == 1 and w.names(a.ino) == []
    w.do(w.ns.unlink, b.ino, "g")
    w.fails(errno.ENOENT, w.ns.getattr, f.ino)
    assert not [n for n in w.records.live_names() if placement_key(n) == inode_name(f.ino)]


def test_unlink_and_rmdir_refuse_the_wrong_kind(w: World) -> None:
    d = w.mkdir(ROOT_INO, "d")
    w.create(ROOT_INO, "f")
    w.create(d.ino, "inner")
    w.fails(errno.EISDIR, w.ns.unlink, ROOT_INO, "d")
    w.fails(errno.ENOTDIR, w.ns.rmdir, ROOT_INO, "f")
    w.fails(errno.ENOTEMPTY, w.ns.rmdir, ROOT_INO, "d")
    w.fails(errno.ENOENT, w.ns.unlink, ROOT_INO, "missing")
    w.fails(errno.ENOENT, w.ns.rmdir, ROOT_INO, "missing")
    w.do(w.ns.unlink, d.ino, "inner")
    w.do(w.ns.rmdir, ROOT_INO, "d")
    w.fails(errno.ENOENT, w.ns.getattr, d.ino)
    w.fails(errno.ENOENT, w.ns.mknod, d.ino, "late", stat.S_IFREG | 0o644, ROOT)


def test_symlinks_fifos_sockets_and_devices(w: World) -> None:
    link = w.do(w.ns.symlink, ROOT_INO, "l", b"../some/where", USER)
    assert stat.S_ISLNK(link.mode) and link.size == 13 and link.uid == 1000
    assert w.do(w.ns.readlink, link.ino) == b"../some/where"
    w.fails(errno.ENAMETOOLONG, w.ns.symlink, ROOT_INO, "long", b"x" * 4096, ROOT)
    w.fails(errno.EINVAL, w.ns.readlink, ROOT_INO)
    for kind, name, rdev in ((stat.S_IFIFO, "fifo", 0), (stat.S_IFSOCK, "sock", 0),
                             (stat.S_IFCHR, "chr", 0x0103), (stat.S_IFBLK, "blk", 0x0801)):
        made = w.do(w.ns.mknod, ROOT_INO, name, kind | 0o640, ROOT, rdev)
        found = w.do(w.ns.lookup, ROOT_INO, name)
        assert (stat.S_IFMT(found.mode), found.rdev, found.mode & 0o7777) == (kind, rdev, 0o640)
        assert found.ino == made.ino
    # chmod of a symlink's inode keeps its target
    w.do(w.ns.setattr, link.ino, AttrChange(uid=5))
    assert w.do(w.ns.readlink, link.ino) == b"../some/where"


def test_setgid_directories_pass_their_group_on(w: World) -> None:
    d = w.mkdir(ROOT_INO, "d")
    w.do(w.ns.setattr, d.ino, AttrChange(gid=50, mode=0o2775))
    f = w.create(d.ino, "f", caller=USER)
    sub = w.mkdir(d.ino, "sub", caller=USER)
    assert (f.uid, f.gid, f.mode & stat.S_ISGID) == (1000, 50, 0)
    assert (sub.gid, bool(sub.mode & stat.S_ISGID)) == (50, True)
    plain = w.create(ROOT_INO, "plain", caller=USER)
    assert plain.gid == 1000


def test_setattr_moves_ctime_and_keeps_the_type(w: World) -> None:
    f = w.create(ROOT_INO, "f", caller=USER)
    w.clock.advance()
    changed = w.do(w.ns.setattr, f.ino, AttrChange(mode=0o4755, uid=7, gid=8))
    assert changed.mode == stat.S_IFREG | 0o4755 and (changed.uid, changed.gid) == (7, 8)
    zeros = w.do(w.ns.setattr, f.ino, AttrChange(mode=0, uid=0, gid=0, atime_ns=0, mtime_ns=0))
    assert (zeros.mode, zeros.uid, zeros.gid, zeros.atime_ns, zeros.mtime_ns) == (
        stat.S_IFREG, 0, 0, 0, 0)  # zero is a value like any other, on the wire too
    w.do(w.ns.setattr, f.ino, AttrChange(mode=0o4755, uid=7, gid=8))
    assert changed.ctime_ns > f.ctime_ns and changed.mtime_ns == f.mtime_ns
    w.clock.advance()
    timed = w.do(w.ns.setattr, f.ino, AttrChange(atime_ns=123, mtime_ns=456_789))
    assert (timed.atime_ns, timed.mtime_ns) == (123, 456_789)
    assert w.stat(f.ino).mtime_ns == 456_789


def test_content_mtime_and_explicit_mtime_newest_wins(w: World) -> None:
    f = w.create(ROOT_INO, "f")
    w.clock.advance()
    w.records.write_content(f.ino, b"abc", mtime_ns=w.clock.now)
    written = w.stat(f.ino)
    assert written.size == 3 and written.mtime_ns == w.clock.now
    assert written.ctime_ns >= w.clock.now - 1_000_000
    w.clock.advance()
    w.do(w.ns.setattr, f.ino, AttrChange(mtime_ns=5))
    assert w.stat(f.ino).mtime_ns == 5  # an explicit utimens after the write
    w.clock.advance()
    w.records.write_content(f.ino, b"abcd", mtime_ns=w.clock.now)
    assert w.stat(f.ino).mtime_ns == w.clock.now  # a write after it
    w.do(w.ns.setattr, f.ino, AttrChange(mode=0o600))  # a chmod does not bring 5 back
    assert w.stat(f.ino).mtime_ns == w.clock.now


def test_rename_within_and_across_directories(w: World) -> None:
    a = w.mkdir(ROOT_INO, "a")
    b = w.mkdir(ROOT_INO, "b")
    f = w.create(a.ino, "f")
    w.do(w.ns.rename, a.ino, "f", a.ino, "g")
    assert w.names(a.ino) == ["g"]
    w.do(w.ns.rename, a.ino, "g", b.ino, "h")
    assert w.names(a.ino) == [] and w.names(b.ino) == ["h"]
    assert w.do(w.ns.lookup, b.ino, "h").ino == f.ino
    # over an existing file: the replaced inode goes
    old = w.create(b.ino, "old")
    w.do(w.ns.rename, b.ino, "h", b.ino, "old")
    assert w.names(b.ino) == ["old"]
    w.fails(errno.ENOENT, w.ns.getattr, old.ino)
    # a rename to itself, or between two links of one inode, changes nothing
    w.do(w.ns.rename, b.ino, "old", b.ino, "old")
    w.do(w.ns.link, f.ino, b.ino, "other")
    w.do(w.ns.rename, b.ino, "old", b.ino, "other")
    assert w.names(b.ino) == ["old", "other"] and w.stat(f.ino).nlink == 2


def test_rename_errors(w: World) -> None:
    d = w.mkdir(ROOT_INO, "d")
    e = w.mkdir(ROOT_INO, "e")
    w.create(e.ino, "inside")
    w.create(ROOT_INO, "f")
    sub = w.mkdir(d.ino, "sub")
    w.fails(errno.ENOENT, w.ns.rename, ROOT_INO, "missing", ROOT_INO, "x", 0)
    w.fails(errno.EISDIR, w.ns.rename, ROOT_INO, "f", ROOT_INO, "d", 0)
    w.fails(errno.ENOTDIR, w.ns.rename, ROOT_INO, "d", ROOT_INO, "f", 0)
    w.fails(errno.ENOTEMPTY, w.ns.rename, ROOT_INO, "d", ROOT_INO, "e", 0)
    w.fails(errno.EINVAL, w.ns.rename, ROOT_INO, "d", sub.ino, "d2", 0)
    w.fails(errno.EINVAL, w.ns.rename, ROOT_INO, "d", d.ino, "self", 0)
    w.fails(errno.EEXIST, w.ns.rename, ROOT_INO, "f", ROOT_INO, "d", RENAME_NOREPLACE)
    w.fails(errno.ENAMETOOLONG, w.ns.rename, ROOT_INO, "f", ROOT_INO, "x" * 256, 0)
    # over an empty directory: it goes, and the link counts follow
    empty = w.mkdir(ROOT_INO, "empty")
    w.do(w.ns.rename, d.ino, "sub", ROOT_INO, "empty")
    assert w.do(w.ns.lookup, ROOT_INO, "empty").ino == sub.ino
    w.fails(errno.ENOENT, w.ns.getattr, empty.ino)
    assert w.stat(d.ino).nlink == 2 and w.stat(ROOT_INO).nlink == 2 + 3


def test_rename_exchange(w: World) -> None:
    a = w.mkdir(ROOT_INO, "a")
    f = w.create(ROOT_INO, "f")
    sub = w.mkdir(a.ino, "sub")
    w.do(w.ns.rename, ROOT_INO, "f", ROOT_INO, "a", RENAME_EXCHANGE)  # same directory
    assert w.do(w.ns.lookup, ROOT_INO, "a").ino == f.ino
    assert w.do(w.ns.lookup, ROOT_INO, "f").ino == a.ino
    w.do(w.ns.rename, ROOT_INO, "a", a.ino, "sub", RENAME_EXCHANGE)  # across: file <-> dir
    assert w.do(w.ns.lookup, a.ino, "sub").ino == f.ino
    moved = w.do(w.ns.lookup, ROOT_INO, "a")
    assert moved.ino == sub.ino and moved.parent == ROOT_INO
    assert w.stat(a.ino).nlink == 2 and w.stat(ROOT_INO).nlink == 4
    w.fails(errno.ENOENT, w.ns.rename, ROOT_INO, "f", ROOT_INO, "none", RENAME_EXCHANGE)


def test_extended_attributes(w: World) -> None:
    f = w.create(ROOT_INO, "f")
    assert w.do(w.ns.listxattr, f.ino) == {}
    w.do(w.ns.setxattr, f.ino, "user.a", b"1", 0)
    w.do(w.ns.setxattr, f.ino, "user.b", b"\x00\xff", XATTR_CREATE)
    w.fails(errno.EEXIST, w.ns.setxattr, f.ino, "user.a", b"2", XATTR_CREATE)
    w.fails(errno.ENODATA, w.ns.setxattr, f.ino, "user.c", b"2", XATTR_REPLACE)
    w.do(w.ns.setxattr, f.ino, "user.a", b"22", XATTR_REPLACE)
    assert w.do(w.ns.listxattr, f.ino) == {"user.a": b"22", "user.b": b"\x00\xff"}
    assert w.stat(f.ino).flags & HAS_XATTRS
    w.do(w.ns.setxattr, f.ino, "user.a", None, 0)
    w.do(w.ns.setxattr, f.ino, "user.b", None, 0)
    w.fails(errno.ENODATA, w.ns.setxattr, f.ino, "user.b", None, 0)
    assert w.do(w.ns.listxattr, f.ino) == {} and not w.stat(f.ino).flags & HAS_XATTRS
    w.fails(errno.E2BIG, w.ns.setxattr, f.ino, "user.big", b"x" * 65537, 0)


def test_xattr_encoding_roundtrip() -> None:
    values = {"user.x": b"", "user.\u00e9": b"v" * 300, "trusted.y": bytes(range(256))}
    assert decode_xattrs(encode_xattrs(values)) == values
    with pytest.raises(ValueError):
        decode_xattrs(encode_xattrs(values)[:-1])


def test_a_failed_create_leaves_no_inode(w: World) -> None:
    w.create(ROOT_INO, "f")
    before = w.records.live_names()
    w.fails(errno.EEXIST, w.ns.mkdir, ROOT_INO, "f", 0o755, ROOT)
    assert w.records.live_names() == before


def test_records_of_one_inode_share_a_placement_key(w: World) -> None:
    d = w.mkdir(ROOT_INO, "d")
    f = w.create(d.ino, "f")
    w.records.write_content(f.ino, b"x")
    keys = {placement_key(n) for n in w.records.live_names() if d.ino.to_bytes(8, "big").hex()
            in n}
    assert keys == {inode_name(d.ino)}
    assert placement_key(data_name(f.ino)) == inode_name(f.ino)


@pytest.mark.parametrize("doc", [
    {}, {"kind": "nope", "key": 1, "args": {}}, {"kind": "make_inode", "key": 0, "args": {}},
    {"kind": "make_inode", "key": 1, "args": {"ino": True}},
    {"kind": "add_entry", "key": 1, "args": {"directory": 1, "name": 5, "child": 2,
                                             "kind": 0o100000}},
    {"kind": "set_attrs", "key": 2, "args": {"ino": 2, "change": {"nlink_delta": 9}}},
    {"kind": "set_attrs", "key": 2, "args": {"ino": 2, "change": {"bogus": 1}}},
])
def test_malformed_ops_are_refused(doc: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        from_json(doc)


def test_ops_roundtrip_as_json() -> None:
    op = Op("set_attrs", 5, {"ino": 5, "change": AttrChange(mode=0o644, nlink_delta=-1)})
    back = from_json(to_json(op))
    assert (back.kind, back.key) == ("set_attrs", 5)
    op2 = Op("make_inode", 9, {"ino": 9, "mode": 0o120777, "uid": 0, "gid": 0, "rdev": 0,
                                "parent": 1, "target": b"/x"})
    assert from_json(to_json(op2)).args["target"] == b"/x"
    assert back.args["change"] == AttrChange(mode=0o644, nlink_delta=-1)


def test_an_access_moves_the_atime_and_not_the_ctime(w: World) -> None:
    f = w.create(ROOT_INO, "f")
    w.clock.advance()
    seen = w.do(w.ns.setattr, f.ino, AttrChange(atime_ns=w.clock.now, access=True))
    assert seen.atime_ns == w.clock.now and seen.ctime_ns == f.ctime_ns
    w.clock.advance()
    touched = w.do(w.ns.setattr, f.ino, AttrChange(atime_ns=5))  # utimensat moves the ctime
    assert touched.atime_ns == 5 and touched.ctime_ns > f.ctime_ns


class _LaggingRecords(MemoryRecords):
    """Records of a node that has not yet heard of some entries (its tuples lag behind the
    primary's): ``entry`` answers None for them the first ``lag`` times it is asked."""

    def __init__(self, clock: Clock, lag: int) -> None:
        super().__init__(clock)
        self.lag = lag
        self.hidden: set[str] = set()

    async def entry(self, directory: int, name: str) -> Entry | None:
        if name in self.hidden and self.lag > 0:
            self.lag -= 1
            return None
        return await super().entry(directory, name)


@pytest.mark.parametrize("lag", [0, 3, 100])
def test_a_directory_made_meanwhile_is_found_once_its_entry_arrives(lag: int) -> None:
    """The loser of two writers making one path: its mkdir says EEXIST while its own records
    have not heard of the winner's entry yet; it looks again for a while instead of failing
    with ENOENT (and gives up with ENOENT if the entry never comes)."""
    clock = Clock()
    records = _LaggingRecords(clock, lag=0)
    ns = Namespace(records, random.Random(7))

    async def scenario() -> int:
        await ns.ensure_root(ROOT)
        made = await ns.mkdir(ROOT_INO, "s3", 0o755, ROOT)  # the winner, through another node
        records.hidden.add("s3")
        records.lag = lag
        found = await ns.make_or_find_dir(ROOT_INO, "s3", 0o755, ROOT)
        assert found.ino == made.ino and found.is_dir
        return len(await ns.readdir(ROOT_INO))

    if lag >= 100:
        with pytest.raises(FsError) as info:
            trio.run(scenario, clock=trio.testing.MockClock(autojump_threshold=0))
        assert info.value.errno == errno.ENOENT
    else:
        assert trio.run(scenario, clock=trio.testing.MockClock(autojump_threshold=0)) == 1
