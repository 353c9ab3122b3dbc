"""The checks of pjdfstest (the POSIX file system test suite) that apply to a kelipsfs mount,
written out here: pjdfstest is not packaged for Debian and cannot be fetched at test time.

One test per check, named ``<syscall>: <what>``, over open/create, unlink, rename, mkdir,
rmdir, truncate, chmod/chown, utimensat, stat and the refused link kinds: the errno each
failure must give, and what each success must leave behind. The checks of behaviour the mount
does not have on purpose are marked ``known`` (an xfail that must fail, so a change that
makes one pass is seen): directories have fixed modes and no stored mtime, there is no atime,
the mounting user owns every file, renameat2's RENAME_EXCHANGE is refused.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.test_mount import Mount, Mounts, expect_errno, run

pytestmark = pytest.mark.skipif(
    not (Path("/dev/fuse").exists() and shutil.which("fusermount3") and os.geteuid() == 0),
    reason="needs root, /dev/fuse and fusermount3 (apt-get install -y fuse3 libfuse2 attr)")

Check = Callable[[Path], None]
CHECKS: dict[str, tuple[Check, str | None]] = {}
LONG = "x" * 256  # one byte over NAME_MAX


def check(name: str, known: str | None = None) -> Callable[[Check], Check]:
    """Register a check; ``known``: why the mount differs from POSIX here (an xfail)."""
    def register(fn: Check) -> Check:
        assert name not in CHECKS, name
        CHECKS[name] = (fn, known)
        return fn
    return register


def err(code: int, fn: Callable[..., object], *args: object) -> None:
    expect_errno(code, fn, *args)


def make(d: Path) -> tuple[Path, Path]:
    """A file ``f`` (content "data") and an empty directory ``d`` in ``d``."""
    (d / "f").write_bytes(b"data")
    (d / "d").mkdir()
    return d / "f", d / "d"


@contextlib.contextmanager
def opened(path: Path, flags: int) -> Iterator[int]:
    """``os.open(path, flags)``, closed on leaving."""
    fd = os.open(path, flags)
    try:
        yield fd
    finally:
        os.close(fd)


def intact(d: Path) -> None:
    """What ``make`` made in ``d`` is there as it was, and nothing else."""
    assert sorted(os.listdir(d)) == ["d", "f"]
    assert (d / "f").read_bytes() == b"data" and (d / "d").is_dir()


def removes(fn: Callable[[Path], object], which: int) -> Check:
    """``fn`` removes the file (``which`` 0) or the directory (1) ``make`` made, and only it."""
    def one(d: Path) -> None:
        made = make(d)
        fn(made[which])
        err(errno.ENOENT, os.stat, made[which])
        assert os.listdir(d) == [made[1 - which].name]
    return one


def refuses(code: int, fn: Callable[[Path], object], which: int) -> Check:
    """``fn`` on the file (``which`` 0) or the directory (1) ``make`` made fails with ``code``
    and leaves both as they were."""
    def one(d: Path) -> None:
        made = make(d)
        err(code, fn, made[which])
        intact(d)
    return one


_libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD = -100
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2


def renameat2(old: Path, new: Path, flags: int) -> None:
    if _libc.renameat2(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), flags) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


# --- the path errors of every call that takes a path ----------------------------------------

#: call -> what it does to ``path`` (``f``: an existing file beside it); True: it creates.
PATH_CALLS: dict[str, tuple[Callable[[Path, Path], object], bool]] = {
    "open": (lambda p, f: os.close(os.open(p, os.O_RDONLY)), False),
    "open O_CREAT": (lambda p, f: os.close(os.open(p, os.O_CREAT | os.O_WRONLY, 0o644)), True),
    "unlink": (lambda p, f: os.unlink(p), False),
    "mkdir": (lambda p, f: os.mkdir(p), True),
    "rmdir": (lambda p, f: os.rmdir(p), False),
    "rename (source)": (lambda p, f: os.rename(p, f.parent / "g"), False),
    "rename (target)": (lambda p, f: os.rename(f, p), True),
    "truncate": (lambda p, f: os.truncate(p, 0), False),
    "chmod": (lambda p, f: os.chmod(p, 0o600), False),
    "utimensat": (lambda p, f: os.utime(p), False),
    "stat": (lambda p, f: os.stat(p), False),
    "getxattr": (lambda p, f: os.getxattr(p, "user.kelips.group"), False),
}


def _path_checks(call: str, fn: Callable[[Path, Path], object], creates: bool) -> None:
    def run_on(code: int, where: Callable[[Path, Path], Path]) -> Check:
        def one(d: Path) -> None:
            f, _ = make(d)
            err(code, fn, where(d, f), f)
            intact(d)
        return one

    check(f"{call}: ENOTDIR when a path component is a file")(
        run_on(errno.ENOTDIR, lambda d, f: f / "x"))
    check(f"{call}: ENOENT in a missing directory")(
        run_on(errno.ENOENT, lambda d, f: d / "nodir" / "x"))
    check(f"{call}: ENAMETOOLONG for a component over 255 bytes")(
        run_on(errno.ENAMETOOLONG, lambda d, f: d / LONG))
    if not creates:
        check(f"{call}: ENOENT for a missing name")(
            run_on(errno.ENOENT, lambda d, f: d / "missing"))


for _call, (_fn, _creates) in PATH_CALLS.items():
    _path_checks(_call, _fn, _creates)


# --- open / create ------------------------------------------------------------------------

@check("open: ENAMETOOLONG for a path over PATH_MAX")
def _(d: Path) -> None:
    deep = d.joinpath(*(["y" * 200] * 21))
    err(errno.ENAMETOOLONG, os.open, deep, os.O_CREAT | os.O_WRONLY, 0o644)


@check("open: EISDIR for a directory opened for writing")
def _(d: Path) -> None:
    _, sub = make(d)
    err(errno.EISDIR, os.open, sub, os.O_WRONLY)
    err(errno.EISDIR, os.open, sub, os.O_RDWR)
    err(errno.EISDIR, os.open, sub, os.O_CREAT | os.O_WRONLY, 0o644)
    intact(d)


@check("open: EEXIST with O_CREAT|O_EXCL on a file or a directory")
def _(d: Path) -> None:
    f, sub = make(d)
    err(errno.EEXIST, os.open, f, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    err(errno.EEXIST, os.open, sub, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    intact(d)


@check("open: ENOTDIR with O_DIRECTORY on a file")
def _(d: Path) -> None:
    f, _ = make(d)
    err(errno.ENOTDIR, os.open, f, os.O_RDONLY | os.O_DIRECTORY)
    intact(d)


@check("open: O_CREAT makes a regular file with the mode given")
def _(d: Path) -> None:
    for mode in (0o600, 0o640, 0o755):
        os.close(os.open(d / f"m{mode:o}", os.O_CREAT | os.O_WRONLY, mode))
        st = os.stat(d / f"m{mode:o}")
        assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == mode & ~0o022
        assert st.st_size == 0 and st.st_nlink == 1


@check("open: O_CREAT on an existing file keeps it")
def _(d: Path) -> None:
    f, _ = make(d)
    os.close(os.open(f, os.O_CREAT | os.O_WRONLY, 0o600))
    assert f.read_bytes() == b"data" and stat.S_IMODE(f.stat().st_mode) == 0o644


@check("open: O_TRUNC empties the file and moves its mtime")
def _(d: Path) -> None:
    f, _ = make(d)
    os.utime(f, ns=(0, 10**18))
    os.close(os.open(f, os.O_WRONLY | os.O_TRUNC))
    st = f.stat()
    assert st.st_size == 0 and st.st_mtime_ns > 10**18


@check("open: O_CREAT|O_DIRECTORY is EINVAL")
def _(d: Path) -> None:
    err(errno.EINVAL, os.open, d / "new", os.O_CREAT | os.O_DIRECTORY | os.O_RDONLY, 0o644)


@check("open: a write through O_RDONLY is EBADF, a read through O_WRONLY is EBADF")
def _(d: Path) -> None:
    f, _ = make(d)
    with opened(f, os.O_RDONLY) as fd:
        err(errno.EBADF, os.write, fd, b"x")
    with opened(f, os.O_WRONLY) as fd:
        err(errno.EBADF, os.read, fd, 1)


# --- unlink ---------------------------------------------------------------------------------

check("unlink: removes the file")(removes(os.unlink, 0))
check("unlink: EISDIR for a directory (Linux)")(refuses(errno.EISDIR, os.unlink, 1))


@check("unlink: the parent directory's mtime moves")
def _(d: Path) -> None:
    _, sub = make(d)
    (sub / "g").write_text("g")
    before = sub.stat().st_mtime_ns
    time.sleep(0.01)
    os.unlink(sub / "g")
    assert sub.stat().st_mtime_ns > before


# --- rename ---------------------------------------------------------------------------------

@check("rename: a file to a new name keeps content, mode and mtime")
def _(d: Path) -> None:
    f, _ = make(d)
    os.chmod(f, 0o600)
    os.utime(f, ns=(0, 1_234_567_890_123_456_789))
    os.rename(f, d / "g")
    st = (d / "g").stat()
    assert (d / "g").read_bytes() == b"data" and stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_mtime_ns == 1_234_567_890_123_456_789
    err(errno.ENOENT, os.stat, f)


@check("rename: a file over a file replaces it")
def _(d: Path) -> None:
    f, _ = make(d)
    (d / "g").write_text("other")
    os.rename(f, d / "g")
    assert (d / "g").read_bytes() == b"data" and sorted(os.listdir(d)) == ["d", "g"]


@check("rename: a name to itself changes nothing")
def _(d: Path) -> None:
    f, sub = make(d)
    os.rename(f, f)
    os.rename(sub, sub)
    assert f.read_bytes() == b"data" and sub.is_dir()


@check("rename: a directory with its contents")
def _(d: Path) -> None:
    _, sub = make(d)
    (sub / "inner").mkdir()
    (sub / "inner" / "x").write_text("x")
    os.rename(sub, d / "e")
    assert (d / "e" / "inner" / "x").read_text() == "x" and not sub.exists()


@check("rename: a directory over an empty directory replaces it")
def _(d: Path) -> None:
    _, sub = make(d)
    (sub / "x").write_text("x")
    (d / "empty").mkdir()
    os.rename(sub, d / "empty")
    assert (d / "empty" / "x").read_text() == "x" and not sub.exists()


check("rename: EISDIR for a file over a directory")(
    refuses(errno.EISDIR, lambda f: os.rename(f, f.parent / "d"), 0))
check("rename: ENOTDIR for a directory over a file")(
    refuses(errno.ENOTDIR, lambda sub: os.rename(sub, sub.parent / "f"), 1))


@check("rename: ENOTEMPTY for a directory over a non-empty directory")
def _(d: Path) -> None:
    _, sub = make(d)
    (d / "full").mkdir()
    (d / "full" / "x").write_text("x")
    with pytest.raises(OSError) as info:
        os.rename(sub, d / "full")
    assert info.value.errno in (errno.ENOTEMPTY, errno.EEXIST)
    assert (d / "full" / "x").read_text() == "x"


@check("rename: EINVAL for a directory into itself")
def _(d: Path) -> None:
    _, sub = make(d)
    err(errno.EINVAL, os.rename, sub, sub / "inside")
    intact(d)


@check("rename: RENAME_NOREPLACE is EEXIST over an existing name")
def _(d: Path) -> None:
    f, _ = make(d)
    (d / "g").write_text("g")
    err(errno.EEXIST, renameat2, f, d / "g", RENAME_NOREPLACE)
    renameat2(f, d / "h", RENAME_NOREPLACE)
    assert (d / "h").read_bytes() == b"data" and (d / "g").read_text() == "g"


@check("rename: RENAME_EXCHANGE swaps two names")
def _(d: Path) -> None:
    f, _ = make(d)
    (d / "g").write_text("g")
    renameat2(f, d / "g", RENAME_EXCHANGE)
    assert f.read_text() == "g"


# --- mkdir ----------------------------------------------------------------------------------

@check("mkdir: makes an empty directory")
def _(d: Path) -> None:
    os.mkdir(d / "new")
    st = os.stat(d / "new")
    assert stat.S_ISDIR(st.st_mode) and st.st_nlink == 2 and os.listdir(d / "new") == []
    assert os.listdir(d) == ["new"]


@check("mkdir: the mode given")
def _(d: Path) -> None:
    os.mkdir(d / "new", 0o700)
    assert stat.S_IMODE(os.stat(d / "new").st_mode) == 0o700


@check("mkdir: EEXIST over a file or a directory")
def _(d: Path) -> None:
    f, sub = make(d)
    err(errno.EEXIST, os.mkdir, f)
    err(errno.EEXIST, os.mkdir, sub)
    intact(d)


# --- rmdir ----------------------------------------------------------------------------------

check("rmdir: removes an empty directory")(removes(os.rmdir, 1))


@check("rmdir: ENOTEMPTY for a directory with a file or a directory in it")
def _(d: Path) -> None:
    _, sub = make(d)
    (sub / "x").write_text("x")
    err(errno.ENOTEMPTY, os.rmdir, sub)
    os.unlink(sub / "x")
    (sub / "inner").mkdir()
    err(errno.ENOTEMPTY, os.rmdir, sub)


check("rmdir: ENOTDIR for a file")(refuses(errno.ENOTDIR, os.rmdir, 0))


@check("rmdir: EINVAL for '.'")
def _(d: Path) -> None:
    _, sub = make(d)
    err(errno.EINVAL, os.rmdir, os.path.join(sub, "."))  # (pathlib would drop the ".")
    intact(d)


# --- truncate -------------------------------------------------------------------------------

@check("truncate: shrinks, and grows with zeros")
def _(d: Path) -> None:
    f, _ = make(d)
    os.truncate(f, 2)
    assert f.read_bytes() == b"da"
    os.truncate(f, 5)
    assert f.read_bytes() == b"da\0\0\0"


@check("truncate: moves the mtime")
def _(d: Path) -> None:
    f, _ = make(d)
    os.utime(f, ns=(0, 10**18))
    os.truncate(f, 1)
    assert f.stat().st_mtime_ns > 10**18


@check("truncate: EISDIR for a directory, EINVAL for a negative length")
def _(d: Path) -> None:
    f, sub = make(d)
    err(errno.EISDIR, os.truncate, sub, 0)
    err(errno.EINVAL, os.truncate, f, -1)
    intact(d)


@check("truncate: EFBIG past the largest object (max_object_bytes, 1 TiB)")
def _(d: Path) -> None:
    f, _ = make(d)
    err(errno.EFBIG, os.truncate, f, (1 << 40) + 1)
    with opened(f, os.O_WRONLY) as fd:
        err(errno.EFBIG, os.pwrite, fd, b"x", 1 << 40)
    assert f.read_bytes() == b"data"


@check("ftruncate: through a writable descriptor; EINVAL through a read-only one")
def _(d: Path) -> None:
    f, _ = make(d)
    with opened(f, os.O_RDONLY) as fd:
        err(errno.EINVAL, os.ftruncate, fd, 0)
    with opened(f, os.O_WRONLY) as fd:
        os.ftruncate(fd, 3)
        assert os.fstat(fd).st_size == 3
    assert f.read_bytes() == b"dat"


# --- chmod / chown ----------------------------------------------------------------------------

@check("chmod: a file's permission bits, setuid/setgid/sticky included")
def _(d: Path) -> None:
    f, _ = make(d)
    for mode in (0o600, 0o755, 0o4755, 0o2711, 0o1777, 0o000):
        os.chmod(f, mode)
        assert stat.S_IMODE(f.stat().st_mode) == mode
    assert f.read_bytes() == b"data"


@check("chmod: through an open descriptor (fchmod)")
def _(d: Path) -> None:
    f, _ = make(d)
    with opened(f, os.O_RDWR) as fd:
        os.fchmod(fd, 0o640)
        assert stat.S_IMODE(os.fstat(fd).st_mode) == 0o640
    assert stat.S_IMODE(f.stat().st_mode) == 0o640


@check("chmod: the ctime moves")
def _(d: Path) -> None:
    f, _ = make(d)
    os.utime(f, ns=(0, 10**18))
    os.chmod(f, 0o600)
    assert f.stat().st_ctime_ns > 10**18


@check("chmod: a directory's mode")
def _(d: Path) -> None:
    _, sub = make(d)
    os.chmod(sub, 0o700)
    assert stat.S_IMODE(sub.stat().st_mode) == 0o700


@check("chown: to the owner it has is allowed (a no-op)")
def _(d: Path) -> None:
    f, _ = make(d)
    os.chown(f, os.getuid(), os.getgid())
    os.chown(f, -1, -1)
    assert (f.stat().st_uid, f.stat().st_gid) == (os.getuid(), os.getgid())


@check("chown: root gives a file to another user")
def _(d: Path) -> None:
    f, _ = make(d)
    os.chown(f, 1234, 1234)
    assert f.stat().st_uid == 1234


# --- utimensat --------------------------------------------------------------------------------

@check("utimensat: sets the mtime to the nanosecond")
def _(d: Path) -> None:
    f, _ = make(d)
    for ns in (0, 1, 1_500_000_000_123_456_789, 4_000_000_000 * 10**9):
        os.utime(f, ns=(ns, ns))
        assert f.stat().st_mtime_ns == ns


@check("utimensat: UTIME_NOW (times None) and UTIME_OMIT (touch -a)")
def _(d: Path) -> None:
    f, _ = make(d)
    os.utime(f, ns=(0, 10**18))
    run("touch", "-a", f)  # mtime UTIME_OMIT
    assert f.stat().st_mtime_ns == 10**18
    before = time.time_ns()
    os.utime(f)  # both UTIME_NOW
    assert before - 10**9 <= f.stat().st_mtime_ns <= time.time_ns() + 10**9


@check("utimensat: through an open descriptor (futimens)")
def _(d: Path) -> None:
    f, _ = make(d)
    with opened(f, os.O_RDWR) as fd:
        os.utime(fd, ns=(0, 10**18))
    assert f.stat().st_mtime_ns == 10**18


@check("utimensat: the atime is kept")
def _(d: Path) -> None:
    f, _ = make(d)
    os.utime(f, ns=(10**18, 2 * 10**18))
    assert f.stat().st_atime_ns == 10**18


@check("utimensat: a directory's mtime")
def _(d: Path) -> None:
    _, sub = make(d)
    os.utime(sub, ns=(10**18, 10**18))
    assert sub.stat().st_mtime_ns == 10**18


# --- stat -------------------------------------------------------------------------------------

@check("stat: type, size, links, owner, blocks of a file and a directory")
def _(d: Path) -> None:
    f, sub = make(d)
    st = f.stat()
    assert stat.S_ISREG(st.st_mode) and st.st_size == 4 and st.st_nlink == 1
    assert (st.st_uid, st.st_gid) == (os.getuid(), os.getgid()) and st.st_blocks >= 1
    st = sub.stat()
    assert stat.S_ISDIR(st.st_mode) and st.st_nlink == 2


@check("stat: a write moves the mtime; fstat sees the size of unflushed writes")
def _(d: Path) -> None:
    f, _ = make(d)
    os.utime(f, ns=(0, 10**18))
    with open(f, "ab") as fh:
        fh.write(b"more")
        fh.flush()
        assert os.fstat(fh.fileno()).st_size == 8
    assert f.stat().st_mtime_ns > 10**18 and f.stat().st_size == 8


# --- names ------------------------------------------------------------------------------------

@check("names: EILSEQ for bytes that are not UTF-8 (names are stored as UTF-8)")
def _(d: Path) -> None:
    bad = os.path.join(os.fsencode(d), b"latin1-\xe9t\xe9")
    err(errno.EILSEQ, os.open, bad, os.O_CREAT | os.O_WRONLY, 0o644)
    err(errno.EILSEQ, os.mkdir, bad)
    err(errno.EILSEQ, os.stat, bad)
    (d / "utf8-été-✓").write_text("ok")
    assert os.listdir(d) == ["utf8-été-✓"]


# --- link kinds the mount refuses -------------------------------------------------------------

@check("link, symlink, mknod of a device, mkfifo: each kind made, EEXIST over a name")
def _(d: Path) -> None:
    f, _ = make(d)
    os.link(f, d / "hard")
    os.symlink("f", d / "soft")
    os.mknod(d / "dev", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    os.mkfifo(d / "fifo")
    assert os.stat(d / "hard").st_ino == f.stat().st_ino and f.stat().st_nlink == 2
    assert os.readlink(d / "soft") == "f"
    assert os.stat(d / "dev").st_rdev == os.makedev(1, 3)
    assert stat.S_ISFIFO(os.stat(d / "fifo").st_mode)
    for name in ("hard", "soft", "dev", "fifo"):
        err(errno.EEXIST, os.link, f, d / name)
        err(errno.EEXIST, os.symlink, "x", d / name)
        err(errno.EEXIST, os.mkfifo, d / name)


@check("mknod: S_IFREG makes an empty regular file (libfuse turns it into create)")
def _(d: Path) -> None:
    os.mknod(d / "node", stat.S_IFREG | 0o600)
    st = os.stat(d / "node")
    assert stat.S_ISREG(st.st_mode) and st.st_size == 0 and stat.S_IMODE(st.st_mode) == 0o600


@check("readlink: EINVAL on a file")
def _(d: Path) -> None:
    f, _ = make(d)
    err(errno.EINVAL, os.readlink, f)
    intact(d)


# --- the runner -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def errno_mount(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    with Mounts(tmp_path_factory.mktemp("errno"), base=170) as ms:
        yield ms.new()


def _params() -> list[object]:
    return [pytest.param(name, id=name, marks=[pytest.mark.xfail(strict=True, reason=known)]
                         if known else []) for name, (_, known) in CHECKS.items()]


@pytest.mark.parametrize("name", _params())
def test_posix_check(errno_mount: Mount, name: str) -> None:
    fn, _ = CHECKS[name]
    d = errno_mount.path("c" + str(list(CHECKS).index(name)))
    d.mkdir()
    fn(d)
