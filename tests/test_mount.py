"""Real FUSE mounts: `kelipsfs mount` processes in the background, used with ordinary tools.

Every mount is a separate process (the test process only does file operations on it, never from
a trio thread). Each fixture unmounts (fusermount3 -u, then -uz) and kills its processes in
teardown, whatever the test did. Nodes listen on 127.0.0.x loopback addresses only.
"""

from __future__ import annotations

import errno
import io
import json
import os
import random
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from daemon.digest import digest_of
from kelipsfs.client import Client, resolve_target
from tests.cluster import node_id_in_group, preset_identity, store_version_ahead

pytestmark = pytest.mark.skipif(
    not (Path("/dev/fuse").exists() and shutil.which("fusermount3") and os.geteuid() == 0),
    reason="needs root, /dev/fuse and fusermount3 (apt-get install -y fuse3 libfuse2 attr)")

KELIPSFS = [sys.executable, "-m", "kelipsfs.cli"]
CLI_TIMEOUT = 120.0
MiB = 1 << 20


@dataclass
class Mount:
    mountpoint: Path
    data_dir: Path
    address: str
    pid: int | None = None

    def path(self, name: str) -> Path:
        return self.mountpoint / name


def _alive(pid: int) -> bool:
    """True while the process exists and is not a zombie (our mounts are not our children)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return False


def _mounted(mountpoint: Path) -> bool:
    """From /proc/mounts, so a dead mount ("transport endpoint is not connected") counts."""
    with open("/proc/mounts") as fh:
        return any(line.split()[1] == str(mountpoint) for line in fh)


def wait_for(predicate: Callable[[], bool], timeout: float, what: str,
             interval: float = 0.1) -> float:
    """Seconds until ``predicate`` held (asked every ``interval``); TimeoutError after
    ``timeout``."""
    started = time.monotonic()
    deadline = started + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if predicate():
                return time.monotonic() - started
        except (OSError, AssertionError, ValueError, KeyError) as exc:
            last = exc
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}"
                       + (f" (last error: {last!r})" if last else ""))


class Mounts:
    """Start `kelipsfs mount` (background mode, as a user would) and always clean up."""

    def __init__(self, root: Path, base: int) -> None:
        self.root = root
        self.base = base  # 127.0.0.<base + i>
        self.port = random.randint(20000, 40000)
        self.mounts: list[Mount] = []

    def __enter__(self) -> Mounts:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def new(self, *settings: str, join: Mount | None = None) -> Mount:
        index = len(self.mounts)
        mount = Mount(self.root / f"mnt{index}", self.root / f"data{index}",
                      f"127.0.0.{self.base + index}:{self.port}")
        mount.mountpoint.mkdir(parents=True)
        self.mounts.append(mount)
        self.start(mount, *settings, join=join)
        return mount

    def start(self, mount: Mount, *settings: str, join: Mount | None = None,
              options: str | None = None) -> None:
        args = ["mount", str(mount.mountpoint), "--data-dir", str(mount.data_dir),
                "--listen", mount.address]
        if options:
            args += ["-o", options]
        for setting in ("k=1", *settings):
            args += ["--set", setting]
        if join is not None:
            args += ["--join", join.address]
        result = run_cli(*args, check=False)
        mount.pid = _endpoint_pid(mount.data_dir)
        assert result.returncode == 0, f"mount failed: {result.stderr}\n{self.log(mount)}"
        assert _mounted(mount.mountpoint)

    def log(self, mount: Mount) -> str:
        path = mount.data_dir / "mount.log"
        return path.read_text()[-4000:] if path.exists() else ""

    def kill(self, mount: Mount, sig: int = signal.SIGKILL) -> None:
        if mount.pid is not None and _alive(mount.pid):
            os.kill(mount.pid, sig)
            wait_for(lambda: not _alive(mount.pid or 0), 20, f"pid {mount.pid} to exit")

    def close(self) -> None:
        for mount in self.mounts:
            for flags in ("-u", "-uz"):
                if _mounted(mount.mountpoint):
                    subprocess.run(["fusermount3", flags, str(mount.mountpoint)],
                                   capture_output=True, timeout=30, check=False)
            if mount.pid is not None and _alive(mount.pid):
                os.kill(mount.pid, signal.SIGTERM)
                deadline = time.monotonic() + 10
                while _alive(mount.pid) and time.monotonic() < deadline:
                    time.sleep(0.05)
                if _alive(mount.pid):
                    os.kill(mount.pid, signal.SIGKILL)


def _endpoint_pid(data_dir: Path) -> int | None:
    try:
        pid = json.loads((data_dir / "endpoint.json").read_text())["pid"]
    except (OSError, ValueError, KeyError):
        return None
    return pid if isinstance(pid, int) else None


def run_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([*KELIPSFS, *args], capture_output=True, text=True,
                            timeout=CLI_TIMEOUT)
    if check:
        assert result.returncode == 0, f"kelipsfs {' '.join(args)}: {result.stderr}"
    return result


def run(*cmd: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True,
                            timeout=CLI_TIMEOUT)
    if check:
        assert result.returncode == 0, f"{cmd}: {result.stderr}"
    return result


def random_file(path: Path, size: int) -> Path:
    """Incompressible content in 1 MiB random blocks (so no two blocks are alike)."""
    with open(path, "wb") as fh:
        left = size
        while left > 0:
            fh.write(os.urandom(min(left, MiB)))
            left -= MiB
    return path


def expect_errno(code: int, fn: Callable[..., object], *args: object) -> None:
    with pytest.raises(OSError) as info:
        fn(*args)
    assert info.value.errno == code, f"{fn.__name__}{args}: {info.value}"


KELIPS_XATTRS = ("node_id", "group", "k", "members", "contacts", "inode", "version",
                 "holders", "checksum")


def xattrs(path: Path) -> dict[str, str]:
    """The ``user.kelips.*`` attributes of ``path``, asked by name with `getfattr -n` (from
    the attr package): they are readable but not listed."""
    found = {}
    for key in KELIPS_XATTRS:
        out = run("getfattr", "-n", f"user.kelips.{key}", "--only-values", "--absolute-names",
                  path, check=False)
        if out.returncode == 0:
            found[f"user.kelips.{key}"] = out.stdout
    return found


def content_record(path: Path) -> str:
    """The name of the record holding a file's content (``daemon.core.keys``)."""
    return "d/" + os.getxattr(path, "user.kelips.inode").decode().zfill(16)


# --- one node ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mounts_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mount")


@pytest.fixture(scope="module")
def single(mounts_root: Path) -> Iterator[Mount]:
    with Mounts(mounts_root / "single", base=60) as ms:
        yield ms.new()


@pytest.mark.slow
def test_status_of_a_mountpoint(single: Mount) -> None:
    """`kelipsfs status MOUNTPOINT` shows the view of the node behind that mount."""
    doc = json.loads(run_cli("status", str(single.mountpoint), "--json").stdout)
    assert doc["node_id"] == xattrs(single.mountpoint)["user.kelips.node_id"]
    table = run_cli("status", str(single.mountpoint)).stdout
    assert "HEARTBEAT" in table and doc["node_id"][:10] in table
    missing = run_cli("status", "/nonexistent-mount", check=False)
    assert missing.returncode == 2 and "not a kelipsfs mount" in missing.stderr


def test_copy_in_and_out(single: Mount, tmp_path: Path) -> None:
    (single.path("copy")).mkdir()
    for size in (1024, 10 * MiB, 300 * MiB):
        src = random_file(tmp_path / f"src-{size}", size)
        inside = single.path(f"copy/f-{size}")
        out = tmp_path / f"out-{size}"
        run("cp", src, inside)
        assert inside.stat().st_size == size
        run("cp", inside, out)
        run("cmp", src, out)
        src.unlink()
        out.unlink()
    sizes = {p.name: p.stat().st_size for p in single.path("copy").iterdir()}
    assert sizes == {"f-1024": 1024, f"f-{10 * MiB}": 10 * MiB, f"f-{300 * MiB}": 300 * MiB}
    # nothing of the copies lingers in the mount's spool
    assert list((single.data_dir / "spool").iterdir()) == []


def _get_in_process(mount: Mount, name: str) -> bytes:
    """`kelipsfs get` without a child process (see the caller)."""
    out = io.BytesIO()

    async def get() -> None:
        client = Client(resolve_target(mount.address, None, None, str(mount.data_dir)))
        try:
            with trio.fail_after(CLI_TIMEOUT):
                await client.get(name, out, False)
        finally:
            await client.aclose()

    trio.run(get)
    return out.getvalue()


def test_writing_after_fsync_never_changes_the_stored_version(single: Mount) -> None:
    """The store keeps the published spool file as a hard link: a later write through the
    same handle must go to a private copy, never into the version the node serves."""
    path = single.path("cow.bin")
    first, second = os.urandom(3 * MiB), os.urandom(MiB)
    with open(path, "wb") as fh:
        fh.write(first)
        fh.flush()
        os.fsync(fh.fileno())  # published: version 1, linked into the store
        fh.seek(MiB)
        fh.write(second)  # copy on write
        fh.flush()
        # still open: the node serves version 1, intact (get verifies the digest). Asked
        # from this process: a child process would close its inherited copy of the
        # descriptor at exec, and that close is a flush, which publishes the new content.
        assert _get_in_process(single, "cow.bin") == first
    expected = first[:MiB] + second + first[2 * MiB:]
    assert path.read_bytes() == expected
    assert _get_in_process(single, "cow.bin") == expected


def test_damage_to_a_store_file_found_after_a_restart_is_eio(tmp_path: Path) -> None:
    """Content the node did not write in this run (found on disk at start) is checked while a
    reader reads it: a flipped byte makes the read that reaches the end fail with EIO. A
    chunk of a large file is checked when it is fetched: reading it fails, the others of its
    object read."""
    whole, chunked = os.urandom(900 * 1024), os.urandom(5 * MiB)
    with Mounts(tmp_path, base=100) as ms:
        mount = ms.new()
        mount.path("rot.bin").write_bytes(whole)
        mount.path("rot-chunks.bin").write_bytes(chunked)
        assert mount.path("rot.bin").read_bytes() == whole
        run_cli("umount", str(mount.mountpoint))
        files = list((mount.data_dir / "store" / "objects").rglob("*.data"))
        stored = [p for p in files if p.stat().st_size == len(whole)]
        run = [p for p in files if p.read_bytes() == chunked]  # (its chunks are one object)
        assert len(stored) == 1 and len(run) == 1
        for path, offset in ((stored[0], 800 * 1024), (run[0], 4 * MiB + 100)):
            with open(path, "r+b") as fh:  # bit rot while the node was down
                fh.seek(offset)
                byte = fh.read(1)
                fh.seek(offset)
                fh.write(bytes([byte[0] ^ 0xFF]))
        ms.start(mount)
        expect_errno(errno.EIO, mount.path("rot.bin").read_bytes)
        with open(mount.path("rot.bin"), "rb") as fh:  # the start of the file still reads
            assert fh.read(4096) == whole[:4096]
        with open(mount.path("rot-chunks.bin"), "rb") as fh:
            assert fh.read(MiB) == chunked[:MiB]
            fh.seek(4 * MiB)
            expect_errno(errno.EIO, fh.read, MiB)


def test_many_small_files_listed(single: Mount) -> None:
    d = single.path("many")
    d.mkdir()
    names = [f"file-{i:03d}.txt" for i in range(200)]
    for i, name in enumerate(names):
        (d / name).write_bytes(b"x" * i)
    assert run("ls", d).stdout.split() == names
    long = run("ls", "-l", d).stdout.splitlines()[1:]  # after "total N"
    sizes = {cols[-1]: int(cols[4]) for cols in (line.split() for line in long)}
    assert sizes == {name: i for i, name in enumerate(names)}
    assert all(line.startswith("-rw-r--r--") for line in long)
    listed = os.listdir(single.mountpoint)
    assert len(listed) == len(set(listed)) and "many" in listed  # no duplicates
    assert ".kelipsfs-dir" not in os.listdir(d) + listed  # markers are never shown


def test_stat_right_after_a_listing_sees_changes_made_here(single: Mount) -> None:
    # ls -l reuses the listing's attributes for a second; a change through this mount must
    # never be hidden by them.
    d = single.path("listed")
    d.mkdir()
    (d / "a").write_bytes(b"12345")
    (d / "b").write_bytes(b"x")
    assert sorted(p.name for p in d.iterdir()) == ["a", "b"]
    assert (d / "a").stat().st_size == 5
    (d / "a").write_bytes(b"1234567890")
    assert (d / "a").stat().st_size == 10
    with open(d / "a", "ab") as fh:
        fh.write(b"!")
    assert (d / "a").stat().st_size == 11
    os.chmod(d / "b", 0o600)
    assert stat.S_IMODE((d / "b").stat().st_mode) == 0o600
    (d / "b").unlink()
    expect_errno(errno.ENOENT, os.stat, d / "b")
    os.truncate(d / "a", 2)
    assert (d / "a").stat().st_size == 2
    os.rename(d / "a", d / "c")
    expect_errno(errno.ENOENT, os.stat, d / "a")
    assert (d / "c").stat().st_size == 2


def test_directories(single: Mount) -> None:
    top = single.path("dirs")
    top.mkdir()
    sub = top / "sub"
    sub.mkdir()
    assert sub.is_dir() and os.listdir(sub) == []
    assert os.stat(sub).st_nlink == 2
    assert os.listdir(top) == ["sub"]  # an empty directory persists (its marker is hidden)
    expect_errno(errno.EEXIST, os.mkdir, sub)
    (sub / "f").write_text("data")
    expect_errno(errno.ENOTEMPTY, os.rmdir, sub)
    expect_errno(errno.ENOTDIR, os.rmdir, sub / "f")
    expect_errno(errno.ENOENT, os.rmdir, top / "missing")
    os.unlink(sub / "f")
    os.rmdir(sub)
    assert not sub.exists()
    assert os.listdir(top) == []
    (top / "a" / "b").mkdir(parents=True)
    (top / "a" / "b" / "deep.txt").write_text("deep")
    assert (top / "a" / "b" / "deep.txt").read_text() == "deep"
    assert run("find", top).stdout.split() == [
        str(top), str(top / "a"), str(top / "a" / "b"), str(top / "a" / "b" / "deep.txt")]


def test_rename_file_and_directory(single: Mount) -> None:
    top = single.path("mv")
    top.mkdir()
    (top / "one.txt").write_text("one")
    run("mv", top / "one.txt", top / "two.txt")
    assert not (top / "one.txt").exists()
    assert (top / "two.txt").read_text() == "one"
    (top / "other.txt").write_text("other")
    run("mv", top / "other.txt", top / "two.txt")  # replaces the target
    assert (top / "two.txt").read_text() == "other"
    assert sorted(os.listdir(top)) == ["two.txt"]
    (top / "d" / "inner").mkdir(parents=True)
    (top / "d" / "x.txt").write_text("x")
    (top / "d" / "inner" / "y.txt").write_text("y")
    mtime = (top / "d" / "x.txt").stat().st_mtime_ns
    run("mv", top / "d", top / "e")
    assert not (top / "d").exists()
    assert sorted(os.listdir(top / "e")) == ["inner", "x.txt"]
    assert (top / "e" / "inner" / "y.txt").read_text() == "y"
    assert (top / "e" / "x.txt").stat().st_mtime_ns == mtime  # a rename keeps the mtime
    (top / "empty").mkdir()
    run("mv", top / "empty", top / "empty2")
    assert (top / "empty2").is_dir() and not (top / "empty").exists()
    run("mv", top / "two.txt", top / "e" / "inner")  # into a directory
    assert (top / "e" / "inner" / "two.txt").read_text() == "other"
    expect_errno(errno.EINVAL, os.rename, top / "e", top / "e" / "inner" / "self")
    (top / "full").mkdir()
    (top / "full" / "f").write_text("f")
    expect_errno(errno.ENOTEMPTY, os.rename, top / "e", top / "full")


def test_a_write_to_a_file_being_renamed_is_never_lost(tmp_path: Path) -> None:
    """A rename copies the object (to the other node too), then deletes the source. Another
    mount overwrites the source meanwhile: whenever its write lands, the result is one of
    the two orders, never a lost write. The delete removes only the version that was copied,
    so a write that lands after the copy stays under the old name."""
    with Mounts(tmp_path / "mounts", base=125) as ms:
        a = ms.new()
        b = ms.new(join=a)
        a.path("mvrace").mkdir()
        small = b"written during the rename\n"
        kept = 0
        for i in range(4):
            src = random_file(a.path(f"mvrace/big{i}"), 150 * MiB)
            old = src.read_bytes()
            mover = subprocess.Popen(["mv", str(src), str(a.path(f"mvrace/moved{i}"))])
            time.sleep(0.05 * i)
            b.path(f"mvrace/big{i}").write_bytes(small)
            assert mover.wait(timeout=CLI_TIMEOUT) == 0
            moved = a.path(f"mvrace/moved{i}").read_bytes()
            if moved == old:  # the rename came first: the write stays under the old name
                assert a.path(f"mvrace/big{i}").read_bytes() == small
                kept += 1
            else:  # the write came first and was moved with the file
                assert moved == small and not a.path(f"mvrace/big{i}").exists()
        print(f"writes kept under the old name: {kept} of 4")


def test_a_chmod_never_touches_the_content(single: Mount) -> None:
    """chmod changes the inode record only: content another writer stored meanwhile (here a
    version stamped ahead) stays, whatever the order."""
    f = single.path("remade.txt")
    f.write_text("first\n")
    store_version_ahead(single.address, content_record(f), b"a newer write\n", 60)
    assert run("chmod", "600", f).returncode == 0
    got = run_cli("get", "remade.txt", "-", "--node", single.address).stdout
    assert got == "a newer write\n"
    assert stat.S_IMODE(f.stat().st_mode) == 0o600


def test_rm_truncate_append_overwrite(single: Mount) -> None:
    top = single.path("edit")
    top.mkdir()
    f = top / "f.txt"
    f.write_text("0123456789")
    run("truncate", "-s", "4", f)
    assert f.read_text() == "0123"
    run("truncate", "-s", "6", f)
    assert f.read_bytes() == b"0123\0\0"
    run("sh", "-c", f"echo appended >> {f}")
    assert f.read_bytes() == b"0123\0\0appended\n"
    run("sh", "-c", f"echo overwritten > {f}")
    assert f.read_text() == "overwritten\n"
    with open(f, "r+b") as fh:  # in-place write keeps the rest
        fh.seek(4)
        fh.write(b"WRITE")
    assert f.read_text() == "overWRITEen\n"
    with open(f, "r+b") as fh:
        fh.truncate(2)
    assert f.read_text() == "ov"
    run("rm", f)
    assert not f.exists()
    expect_errno(errno.ENOENT, os.stat, f)
    expect_errno(errno.ENOENT, os.unlink, f)
    assert os.listdir(top) == []


def test_an_overwrite_or_delete_overtaken_by_a_newer_version_is_stored_above_it(
        single: Mount) -> None:
    """A holder that keeps a newer version than the one a write or delete was stamped with
    refuses it (a concurrent writer got there first, or its clock runs ahead of ours). The
    writer still has the bytes: it stamps the write again above that version, so ``cp``
    succeeds and its content is what stays (the write that finished last wins), instead of
    close() failing with EIO for a write that was only overtaken. The same for ``rm``."""
    f = single.path("overtaken.txt")
    f.write_text("first\n")
    ahead = store_version_ahead(single.address, content_record(f), b"from a clock ahead\n",
                                60)
    run("sh", "-c", f"echo second > {f}")  # close() must succeed
    assert f.read_text() == "second\n"
    version = xattrs(f)["user.kelips.version"]
    assert int(version.split(":")[0]) > ahead
    store_version_ahead(single.address, content_record(f), b"ahead again\n", 120)
    run("rm", f)
    expect_errno(errno.ENOENT, os.stat, f)


def test_o_excl_and_metadata(single: Mount) -> None:
    top = single.path("meta")
    top.mkdir()
    f = top / "f"
    f.write_text("x")
    expect_errno(errno.EEXIST, os.open, f, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    fd = os.open(top / "g", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o640)
    os.close(fd)
    assert (top / "g").stat().st_mode & 0o7777 == 0o640
    os.chmod(f, 0o600)
    assert f.stat().st_mode == 0o100600
    os.utime(f, ns=(1, 1_500_000_000_123_456_789))
    assert f.stat().st_mtime_ns == 1_500_000_000_123_456_789
    run("touch", "-m", "-d", "@1000000000", f)  # atime left alone: UTIME_OMIT
    assert f.stat().st_mtime_ns == 1_000_000_000 * 10**9
    run("touch", "-a", f)  # mtime UTIME_OMIT: unchanged
    assert f.stat().st_mtime_ns == 1_000_000_000 * 10**9
    before = time.time_ns()
    run("touch", f)
    assert f.stat().st_mtime_ns >= before - 10**9
    assert f.read_text() == "x" and f.stat().st_mode == 0o100600
    st = f.stat()
    assert (st.st_uid, st.st_gid, st.st_nlink) == (os.getuid(), os.getgid(), 1)
    vfs = os.statvfs(single.mountpoint)
    assert vfs.f_bsize == 4096 and vfs.f_namemax == 255 and vfs.f_blocks > 0
    assert run("df", single.mountpoint).returncode == 0


def test_unlink_while_open(single: Mount) -> None:
    top = single.path("unlinked")
    top.mkdir()
    f = top / "w.txt"
    fd = os.open(f, os.O_CREAT | os.O_RDWR)
    try:
        os.write(fd, b"abc")
        os.unlink(f)
        assert not f.exists() and os.listdir(top) == []
        os.write(fd, b"def")
        assert os.fstat(fd).st_size == 6
        os.lseek(fd, 0, os.SEEK_SET)
        assert os.read(fd, 100) == b"abcdef"
        os.ftruncate(fd, 2)
        assert os.fstat(fd).st_size == 2
    finally:
        os.close(fd)
    assert not f.exists() and os.listdir(top) == []  # closing does not bring it back
    stored = top / "r.txt"
    stored.write_text("stored")
    with open(stored, "rb") as fh:
        os.unlink(stored)
        assert fh.read() == b"stored"
        assert os.fstat(fh.fileno()).st_size == 6
    assert os.listdir(top) == []


def test_xattrs(single: Mount) -> None:
    root = xattrs(single.mountpoint)
    assert {"user.kelips.node_id", "user.kelips.group", "user.kelips.k",
            "user.kelips.members", "user.kelips.contacts"} <= set(root)
    assert root["user.kelips.k"] == "1" and root["user.kelips.group"] == "0"
    assert re.fullmatch(r"[0-9a-f]{40}", root["user.kelips.node_id"])
    members = os.getxattr(single.mountpoint, "user.kelips.members").decode().splitlines()
    rows = [json.loads(line) for line in members]
    assert rows[0]["address"] == single.address and rows[0]["state"] == "alive"
    assert "heartbeat" in rows[0]
    f = single.path("xattr.txt")
    f.write_text("hello")
    attrs = xattrs(f)
    assert set(attrs) == {"user.kelips.group", "user.kelips.version", "user.kelips.holders",
                          "user.kelips.checksum", "user.kelips.inode"}
    assert attrs["user.kelips.inode"] == f"{f.stat().st_ino:x}"
    assert attrs["user.kelips.checksum"] == digest_of(b"hello").hex() == (  # BLAKE3
        "ea8f163db38682925e4491c5e58d4bb3506ef8c14eb78a86e908c5624a67200f")
    holders = json.loads(os.getxattr(f, "user.kelips.holders"))
    assert [h["address"] for h in holders] == [single.address]
    # readable by name, never listed: cp -a, rsync -X and mv do not copy them
    assert os.listxattr(f) == [] and os.listxattr(single.mountpoint) == []
    expect_errno(errno.ENODATA, os.getxattr, f, "user.kelips.nope")
    expect_errno(errno.ENODATA, os.getxattr, f, "user.other")
    expect_errno(errno.ENODATA, os.getxattr, f, "security.capability")
    refused = run("setfattr", "-n", "user.kelips.group", "-v", "1", f, check=False)
    assert refused.returncode != 0 and "Operation not permitted" in refused.stderr
    expect_errno(errno.EPERM, os.removexattr, f, "user.kelips.group")
    # a user's own attributes are stored with the file
    run("setfattr", "-n", "user.mine", "-v", "1", f)
    os.setxattr(f, "user.bin", b"\x00\xff")
    assert sorted(os.listxattr(f)) == ["user.bin", "user.mine"]
    assert os.getxattr(f, "user.mine") == b"1" and os.getxattr(f, "user.bin") == b"\x00\xff"
    expect_errno(errno.EEXIST, os.setxattr, f, "user.mine", b"2", os.XATTR_CREATE)
    expect_errno(errno.ENODATA, os.setxattr, f, "user.none", b"2", os.XATTR_REPLACE)
    os.removexattr(f, "user.bin")
    assert os.listxattr(f) == ["user.mine"]
    (single.path("xdir")).mkdir()
    assert os.listxattr(single.path("xdir")) == []
    f.write_text("changed")  # the version moves on with every write
    assert xattrs(f)["user.kelips.version"] != attrs["user.kelips.version"]


def test_bad_names(single: Mount) -> None:
    long = "x" * 256
    expect_errno(errno.ENAMETOOLONG, os.open, single.path(long), os.O_CREAT | os.O_WRONLY)
    expect_errno(errno.ENAMETOOLONG, os.mkdir, single.path(long))
    expect_errno(errno.ENAMETOOLONG, os.stat, single.path(long))
    expect_errno(errno.ENAMETOOLONG, os.open, single.path("é" * 128), os.O_CREAT | os.O_WRONLY)
    ok = "y" * 255
    single.path(ok).write_text("fits")
    assert single.path(ok).read_text() == "fits"
    expect_errno(errno.EILSEQ, os.open, single.path("bad").as_posix().encode() + b"\xff",
                 os.O_CREAT | os.O_WRONLY)
    assert long not in os.listdir(single.mountpoint)


def test_start_failures(single: Mount, tmp_path: Path) -> None:
    port = random.randint(20000, 40000)

    def attempt(mountpoint: Path, *extra: str, listen: str = f"127.0.0.70:{port}",
                data: str = "bad") -> str:
        result = run_cli("mount", str(mountpoint), "--data-dir", str(tmp_path / data),
                         "--listen", listen, "--set", "k=1", *extra, check=False)
        assert result.returncode != 0
        assert not _mounted(mountpoint)
        return result.stderr

    assert "does not exist" in attempt(tmp_path / "missing")
    (tmp_path / "file").write_text("")
    assert "not a directory" in attempt(tmp_path / "file")
    assert "busy" in run_cli("mount", str(single.mountpoint), "--data-dir",
                             str(tmp_path / "bad"), check=False).stderr
    target = tmp_path / "mnt"
    target.mkdir()
    assert "Address already in use" in attempt(target, listen=single.address)
    assert "in use" in attempt(target, data=str(single.data_dir))
    assert "config key 'k'" in attempt(target, "--set", "k=0")
    refused = attempt(target, "--set", "k=2", "--join", single.address)
    assert "join refused" in refused and "k=1" in refused
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:  # UDP side taken
        taken.bind(("127.0.0.71", port))
        assert "cannot bind UDP" in attempt(target, listen=f"127.0.0.71:{port}")
    leftovers = run("pgrep", "-f", f"mount {target}", check=False).stdout.split()
    assert leftovers == []


def test_full_store_fails_close(tmp_path: Path) -> None:
    """A store that cannot take the file makes close() fail with ENOSPC: no write is lost
    silently.

    The store is on its own small file system (so it cannot keep a hard link to the spool
    file, which is what it does when they share one, and falls back to a copy that does not
    fit)."""
    data = tmp_path / "data"
    store = data / "store"
    store.mkdir(parents=True)
    made = run("mount", "-t", "tmpfs", "-o", "size=10m", "tmpfs", store, check=False)
    assert made.returncode == 0, f"cannot mount a small tmpfs (root needed): {made.stderr}"
    try:
        with Mounts(tmp_path, base=80) as ms:
            mount = Mount(tmp_path / "mnt", data, f"127.0.0.80:{ms.port}")
            mount.mountpoint.mkdir()
            ms.mounts.append(mount)
            ms.start(mount)
            small = mount.path("small.bin")
            small.write_bytes(b"s" * 1000)
            fh = open(mount.path("big.bin"), "wb")  # noqa: SIM115 - close() is the test
            try:
                fh.write(os.urandom(14 * MiB))  # fits the spool; the store's copy does not
            finally:
                with pytest.raises(OSError) as info:
                    fh.close()
            assert info.value.errno == errno.ENOSPC
            # the name was made at open and keeps what was stored of it: nothing (a local
            # disk would keep the part written before it filled up), once the kernel has
            # released the handle (after close() returned) and the unstored copy is gone
            wait_for(lambda: mount.path("big.bin").stat().st_size == 0, 10,
                     "the unstored copy to go")
            assert small.read_bytes() == b"s" * 1000  # the rest is untouched
    finally:
        run("umount", "-l", store, check=False)


def test_read_only_remount(tmp_path: Path) -> None:
    with Mounts(tmp_path, base=95) as ms:
        mount = ms.new()
        mount.path("d").mkdir()
        mount.path("d/f.txt").write_text("kept")
        run_cli("umount", str(mount.mountpoint))
        ms.start(mount, "log_level=warning", options="ro")
        assert mount.path("d/f.txt").read_text() == "kept"
        expect_errno(errno.EROFS, os.open, mount.path("d/f.txt"), os.O_WRONLY)
        expect_errno(errno.EROFS, os.mkdir, mount.path("e"))
        expect_errno(errno.EROFS, os.unlink, mount.path("d/f.txt"))
        with open("/proc/mounts") as fh:
            line = next(line for line in fh if line.split()[1] == str(mount.mountpoint))
        assert "ro" in line.split()[3].split(",")


def test_access_times_are_recorded_with_relatime_only(tmp_path: Path) -> None:
    """noatime by default (a read writes nothing); ``-o relatime`` records the first read
    after a change; strictatime is refused with a clear message."""
    with Mounts(tmp_path, base=95) as ms:
        mount = ms.new()
        f = mount.path("f.txt")
        f.write_text("read me")
        os.utime(f, ns=(10**9, 2 * 10**9))  # atime before mtime: relatime records a read
        assert f.read_text() == "read me"
        time.sleep(1.0)  # (relatime records in the background: give it the time)
        assert f.stat().st_atime_ns == 10**9
        run_cli("umount", str(mount.mountpoint))
        ms.start(mount, options="relatime")
        assert f.read_text() == "read me"
        wait_for(lambda: f.stat().st_atime_ns > 2 * 10**9, 10, "the read to be recorded")
        other = tmp_path / "strict"
        other.mkdir()
        refused = run_cli("mount", str(other), "--data-dir", str(tmp_path / "strict-data"),
                          "--listen", "127.0.0.97:7400", "-o", "strictatime", check=False)
        assert refused.returncode != 0
        assert "relatime" in refused.stderr and not _mounted(other)


def test_umount_stops_the_node_and_data_persists(tmp_path: Path) -> None:
    with Mounts(tmp_path, base=90) as ms:
        mount = ms.new()
        mount.path("keep").mkdir()
        mount.path("keep/me.txt").write_text("persisted")
        pid = mount.pid
        assert pid is not None and _alive(pid)
        run_cli("umount", str(mount.mountpoint))
        assert not _mounted(mount.mountpoint)
        assert not _alive(pid)  # umount waits for the node to leave and exit
        assert "left the cluster" in ms.log(mount)
        assert "not mounted" in run_cli("umount", str(mount.mountpoint), check=False).stderr
        ms.start(mount)
        assert mount.path("keep/me.txt").read_text() == "persisted"
        assert os.listdir(mount.path("keep")) == ["me.txt"]
        os.kill(mount.pid or 0, signal.SIGTERM)  # SIGTERM unmounts too
        wait_for(lambda: not _mounted(mount.mountpoint) and not _alive(mount.pid or 0), 20,
                 "SIGTERM to unmount and stop the node")


# --- three nodes ---------------------------------------------------------------------------

def _alive_members(mount: Mount) -> int:
    lines = os.getxattr(mount.mountpoint, "user.kelips.members").decode().splitlines()
    return sum(1 for line in lines if json.loads(line)["state"] == "alive")


def test_reads_stream_from_remote_holders(tmp_path: Path) -> None:
    """With one copy per object, the files of the directories made through the other mount
    live only on the other node (a file is placed with its directory, a directory with the
    node it was made through): opening them streams the verified bytes into the mount's
    local copy."""
    with Mounts(tmp_path, base=110) as ms:
        a = ms.new("replication=1")
        b = ms.new("replication=1", join=a)
        wait_for(lambda: _alive_members(a) == 2 and _alive_members(b) == 2, 30, "membership")
        local = {}
        for i in range(12):
            local[i] = random_file(tmp_path / f"r{i}", 50_000 + i * 100_000)
            (a, b)[i % 2].path(f"d{i}").mkdir()
            run("cp", local[i], a.path(f"d{i}/r{i}.bin"))
        big = random_file(tmp_path / "big", 40 * MiB)
        run("cp", big, b.path("big.bin"))
        holders = {json.loads(os.getxattr(a.path(f"d{i}/r{i}.bin"), "user.kelips.holders"))[0]
                   ["address"] for i in local}
        assert holders == {a.address, b.address}  # some objects are remote for each side
        for m in (a, b):
            for i, path in local.items():
                run("cmp", path, m.path(f"d{i}/r{i}.bin"))
            run("cmp", big, m.path("big.bin"))
            wait_for(lambda m=m: list((m.data_dir / "spool").iterdir()) == [], 10,  # type: ignore[misc]
                     "the local copies closed")


def test_xattr_values_are_paged() -> None:
    from kelipsfs.xattr_view import XATTR_MAX, _paged
    lines = b"".join(json.dumps({"id": f"{i:040x}", "heartbeat": i}).encode() + b"\n"
                     for i in range(3000))
    assert len(lines) > 2 * XATTR_MAX
    pages = _paged({"user.kelips.members": lines, "user.kelips.k": b"1"})
    names = sorted(n for n in pages if n.startswith("user.kelips.members"))
    assert "user.kelips.members" not in pages and pages["user.kelips.k"] == b"1"
    assert names == [f"user.kelips.members.{i}" for i in range(len(names))]
    assert all(len(pages[n]) <= XATTR_MAX and pages[n].endswith(b"\n") for n in names)
    assert b"".join(pages[f"user.kelips.members.{i}"] for i in range(len(names))) == lines


@pytest.mark.slow
def test_three_mounts_share_files(tmp_path: Path) -> None:
    with Mounts(tmp_path, base=100) as ms:
        a = ms.new("t_fail=2.0")
        b = ms.new("t_fail=2.0", join=a)
        c = ms.new("t_fail=2.0", join=a)
        everyone = (a, b, c)
        wait_for(lambda: all(_alive_members(m) == 3 for m in everyone), 30,
                 "three-way membership")

        src = random_file(tmp_path / "src.bin", 5 * MiB)
        run("cp", src, a.path("shared.bin"))
        a.path("docs").mkdir()
        a.path("docs/note.txt").write_text("from A")
        for m in everyone:
            run("cmp", src, m.path("shared.bin"))
            assert m.path("docs/note.txt").read_text() == "from A"
            assert run("ls", m.mountpoint).stdout.split() == ["docs", "shared.bin"]
            assert run("ls", m.path("docs")).stdout.split() == ["note.txt"]
            holders = json.loads(os.getxattr(m.path("shared.bin"), "user.kelips.holders"))
            assert len(holders) == 3  # r=3 and k=1: every node holds everything

        b.path("docs/note.txt").write_text("B was here")  # close-to-open: next open sees it
        for m in everyone:
            assert m.path("docs/note.txt").read_text() == "B was here"
            assert m.path("docs/note.txt").stat().st_size == len("B was here")
        with open(c.path("docs/note.txt")) as held:  # the file an editor's save replaces
            b.path("docs/new.txt").write_text("saved by B")
            os.rename(b.path("docs/new.txt"), b.path("docs/note.txt"))
            for m in everyone:
                assert m.path("docs/note.txt").read_text() == "saved by B"
            assert held.read() == "B was here"  # the replaced inode lives on for its reader

        run("rm", c.path("docs/note.txt"))
        for m in everyone:
            assert not m.path("docs/note.txt").exists()
            assert run("ls", m.path("docs")).stdout.split() == []

        files = {}
        for i, writer in enumerate(everyone):
            name = f"f{i}.bin"
            files[name] = random_file(tmp_path / name, 100_000 * (i + 1))
            run("cp", files[name], writer.path(name))

        ms.kill(a)  # kill -9: auto_unmount removes A's mount, B and C keep everything
        wait_for(lambda: not _mounted(a.mountpoint), 10, "A's mount to go away")
        for m in (b, c):
            run("cmp", src, m.path("shared.bin"))
            for name, local in files.items():
                run("cmp", local, m.path(name))
        b.path("after.txt").write_text("written after A died")
        assert c.path("after.txt").read_text() == "written after A died"
        wait_for(lambda: all(_alive_members(m) == 2 for m in (b, c)), 30,
                 "A to be declared failed")


def test_a_stalled_holder_does_not_stall_the_writes(tmp_path: Path) -> None:
    """With a write quorum set, a write is acknowledged once that many holders stored it:
    with one of three holders stopped (not yet declared failed), creates, writes, a chmod and
    an unlink through another mount go on without waiting for it, and it catches up once it
    runs again."""
    settings = ("replication=3", "t_fail=60", "http_timeout=60")
    with Mounts(tmp_path, base=115) as ms:
        a = ms.new(*settings)  # (alone at first: a quorum of 2 could not make the root)
        b = ms.new(*settings, "write_quorum=2", join=a)
        c = ms.new(*settings, "write_quorum=2", join=a)
        wait_for(lambda: all(_alive_members(m) == 3 for m in (a, b, c)), 30, "membership")
        c.path("d").mkdir()
        assert b.pid is not None
        os.kill(b.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            for i in range(5):
                c.path(f"d/f{i}").write_text(f"file {i}")
            os.chmod(c.path("d/f0"), 0o600)
            os.unlink(c.path("d/f1"))
            assert time.monotonic() - started < 30  # (waiting for b: 60 s per operation)
            assert a.path("d/f2").read_text() == "file 2"
        finally:
            os.kill(b.pid, signal.SIGCONT)
        wait_for(lambda: b.path("d/f4").exists() and not b.path("d/f1").exists(), 30,
                 "the stopped holder to catch up")
        assert b.path("d/f4").read_text() == "file 4"
        assert stat.S_IMODE(b.path("d/f0").stat().st_mode) == 0o600


def test_mounts_of_a_two_group_cluster(tmp_path: Path) -> None:
    # k = 2: names of the other group are found through a contact (one hop), readdir merges
    # both groups' listings; ids are chosen so each group has two nodes.
    from daemon.core.ids import group_of_name
    with Mounts(tmp_path, base=110) as ms:
        mounts: list[Mount] = []
        for i, group in enumerate((0, 1, 0, 1)):
            preset_identity(tmp_path / f"data{i}", node_id_in_group(group, 2, f"mount-{i}"))
            mounts.append(ms.new("k=2", "t_fail=2.0", join=mounts[0] if mounts else None))
        def roles(m: Mount) -> list[str]:
            lines = os.getxattr(m.mountpoint, "user.kelips.members").decode().splitlines()
            return sorted(json.loads(line)["role"] for line in lines
                          if json.loads(line)["state"] == "alive")
        wait_for(lambda: all(roles(m) == ["contact", "contact", "member", "self"]
                             for m in mounts), 30, "two per group, both others as contacts")
        names = [f"d/file{i}.txt" for i in range(16)]
        for i, name in enumerate(names):
            if i == 0:
                mounts[0].path("d").mkdir()
            mounts[i % 4].path(name).write_text(f"content {i}")
        for m in mounts:
            assert sorted(run("ls", m.path("d")).stdout.split()) == sorted(
                n.split("/")[1] for n in names)
            for i, name in enumerate(names):
                assert m.path(name).read_text() == f"content {i}"
                ino = os.getxattr(m.path(name), "user.kelips.inode").decode().zfill(16)
                group = json.loads(os.getxattr(m.path(name), "user.kelips.group"))
                assert group == group_of_name(f"i/{ino}", 2)
        # the inodes fall into both groups (16 random ones: all in one, 1 time in 32,768)
        assert len({os.getxattr(mounts[0].path(n), "user.kelips.group") for n in names}) == 2
        mounts[3].path(names[0]).unlink()
        for m in mounts:
            assert not m.path(names[0]).exists()
