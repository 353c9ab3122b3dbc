"""The edge cases users and editors hit on a real mount, beyond tests/test_mount.py.

Open files shared by several handles of one mount (a reader, then a writer, O_TRUNC, a path
truncate, appends through separate opens), rename over an open file, editors' save patterns,
sparse writes, mmap, refused link kinds, many threads opening one file, and a holder killed
with SIGKILL while a mount is fetching a large file from it.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import shutil
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.digest import digest_of, file_digest
from tests.test_mount import (
    MiB,
    Mount,
    Mounts,
    _alive_members,
    random_file,
    run,
    wait_for,
)

pytestmark = pytest.mark.skipif(
    not (Path("/dev/fuse").exists() and shutil.which("fusermount3") and os.geteuid() == 0),
    reason="needs root, /dev/fuse and fusermount3 (apt-get install -y fuse3 libfuse2 attr)")


#: write+fsync cycles on one descriptor, and commits on one sqlite3 connection: well past the
#: few hundred after which a copy-on-write file name once grew too long.
CYCLES = 10_000
COMMITS = 2_000


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    with Mounts(tmp_path_factory.mktemp("edges"), base=140) as ms:
        yield ms.new()


@pytest.fixture
def top(edge: Mount, request: pytest.FixtureRequest) -> Path:
    """A fresh directory in the mount for one test."""
    path = edge.path(request.node.name)
    path.mkdir()
    return path


# --- several handles on one file ------------------------------------------------------------

def test_rename_over_an_open_file(top: Path) -> None:
    target, new = top / "target", top / "new"
    target.write_bytes(b"old content")
    new.write_bytes(b"new content")
    with open(target, "rb") as reader:
        os.rename(new, target)
        assert reader.read() == b"old content"  # the replaced file lives on for its reader
        assert target.read_bytes() == b"new content"
    assert sorted(os.listdir(top)) == ["target"]
    with open(target, "r+b") as writer:  # a writer of the replaced file...
        (top / "newer").write_bytes(b"newer")
        os.rename(top / "newer", target)
        writer.write(b"WRITER")  # ...writes to the replaced file, never over the new one
    assert target.read_bytes() == b"newer"
    assert sorted(os.listdir(top)) == ["target"]


def test_rename_of_a_file_open_for_writing(top: Path) -> None:
    with open(top / "src", "wb") as fh:
        fh.write(b"abc")
        fh.flush()
        os.rename(top / "src", top / "dst")
        fh.write(b"def")  # published under the new name at close
    assert (top / "dst").read_bytes() == b"abcdef"
    assert os.listdir(top) == ["dst"]


def test_append_from_two_handles(top: Path) -> None:
    f = top / "log"
    one = os.open(f, os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o644)
    two = os.open(f, os.O_WRONLY | os.O_APPEND)
    try:
        for i in range(20):
            os.write(one if i % 2 else two, f"{i};".encode())
        os.lseek(one, 0, os.SEEK_SET)  # O_APPEND writes at the end whatever the offset
        os.write(one, b"end")
    finally:
        os.close(one)
        os.close(two)
    assert f.read_bytes() == b"".join(f"{i};".encode() for i in range(20)) + b"end"
    # appends through separate opens, one closing in the middle, as shells do with >>
    first = os.open(f, os.O_WRONLY | os.O_APPEND)
    run("sh", "-c", f"echo shell >> {f}")
    os.write(first, b"!")
    os.close(first)
    assert f.read_bytes().endswith(b"endshell\n!")


def test_o_trunc_while_open_elsewhere(top: Path) -> None:
    """A reader open on this mount sees the truncation and the new content (as on a local
    file system), not the old bytes."""
    f = top / "t"
    f.write_bytes(b"0123456789")
    reader = os.open(f, os.O_RDONLY)
    try:
        assert os.pread(reader, 3, 0) == b"012"
        writer = os.open(f, os.O_WRONLY | os.O_TRUNC)
        assert os.fstat(reader).st_size == 0
        assert os.pread(reader, 100, 0) == b""
        os.write(writer, b"ab")
        os.close(writer)
        assert os.pread(reader, 100, 0) == b"ab"
    finally:
        os.close(reader)
    assert f.read_bytes() == b"ab"


def test_a_writer_opened_after_a_reader_shares_its_copy(top: Path) -> None:
    """The kernel has one page cache per file: a reader left on its own (old) copy would read
    the writer's full pages mixed with old bytes elsewhere. It sees every write instead."""
    f = top / "shared.bin"
    f.write_bytes(b"a" * (3 * MiB))
    reader = os.open(f, os.O_RDONLY)
    try:
        assert os.pread(reader, MiB, 0) == b"a" * MiB  # now in the page cache
        writer = os.open(f, os.O_WRONLY)
        os.pwrite(writer, b"B" * 65536, 0)  # whole pages
        os.pwrite(writer, b"C" * 10, 2 * MiB)  # part of a page
        os.pwrite(writer, b"D" * 10, 3 * MiB)  # past the end
        assert os.pread(reader, 10, 0) == b"B" * 10
        assert os.pread(reader, 10, 2 * MiB) == b"C" * 10
        assert os.pread(reader, 100, 3 * MiB) == b"D" * 10
        os.close(writer)
        assert os.fstat(reader).st_size == 3 * MiB + 10
        assert os.pread(reader, 10, 2 * MiB) == b"C" * 10
    finally:
        os.close(reader)
    data = f.read_bytes()
    assert (data[:65536], data[65536:65546]) == (b"B" * 65536, b"a" * 10)
    assert data[2 * MiB:2 * MiB + 11] == b"C" * 10 + b"a"
    assert data[3 * MiB:] == b"D" * 10


def test_reader_follows_appends_like_tail_f(top: Path) -> None:
    f = top / "app.log"
    f.write_bytes(b"start\n")
    with open(f, "rb") as follower:
        assert follower.read() == b"start\n"
        for i in range(5):
            run("sh", "-c", f"echo line{i} >> {f}")
            assert follower.read() == f"line{i}\n".encode()


def test_truncate_by_path_while_open(top: Path) -> None:
    """copytruncate (logrotate) cuts a file a reader holds: the reader sees the cut."""
    f = top / "t"
    f.write_bytes(b"0123456789")
    with open(f, "rb") as reader:
        assert reader.read(2) == b"01"
        os.truncate(f, 4)
        assert os.fstat(reader.fileno()).st_size == 4
        assert os.pread(reader.fileno(), 100, 0) == b"0123"
        os.truncate(f, 0)
        assert os.pread(reader.fileno(), 100, 0) == b""
    assert f.read_bytes() == b""
    fd = os.open(f, os.O_RDWR)  # a writer's own copy takes a truncate by path
    try:
        os.write(fd, b"0123456789")
        os.truncate(f, 3)
        assert os.fstat(fd).st_size == 3
        os.write(fd, b"X")  # at offset 10: a hole of zeros in between
    finally:
        os.close(fd)
    assert f.read_bytes() == b"012" + b"\0" * 7 + b"X"


def test_many_threads_open_one_file(top: Path) -> None:
    """The kernel sends release without waiting: an open that shares the copy of a handle
    being released must not get a closed descriptor (was EBADF for most of these reads)."""
    f = top / "hot.bin"
    data = os.urandom(100_000)
    f.write_bytes(data)
    problems: list[str] = []

    def reader() -> None:
        for _ in range(60):
            try:
                with open(f, "rb") as fh:
                    if fh.read() != data:
                        problems.append("wrong bytes")
            except OSError as exc:
                problems.append(repr(exc))

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a reader hung for 120 s"
    assert problems == []


# --- editors ------------------------------------------------------------------------------

def test_editor_save_patterns(top: Path) -> None:
    doc = top / "doc.txt"
    doc.write_text("v1")
    os.chmod(doc, 0o640)
    # write a temporary file, fsync, rename it over the original (gedit, VS Code, vim's
    # 'backupcopy=no'), after copying the original's mode as they do
    swap = top / ".doc.txt.tmp"
    fd = os.open(swap, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    os.write(fd, b"v2")
    os.fchmod(fd, stat.S_IMODE(doc.stat().st_mode))
    os.fsync(fd)
    os.close(fd)
    os.rename(swap, doc)
    assert doc.read_text() == "v2" and stat.S_IMODE(doc.stat().st_mode) == 0o640
    # vim: probe that the directory is writable with a file named 4913, then rename the
    # original to the backup, write the new file, remove the backup
    fd = os.open(top / "4913", os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW, 0o100644)
    os.fchown(fd, os.getuid(), os.getgid())
    os.close(fd)
    os.unlink(top / "4913")
    os.rename(doc, top / "doc.txt~")
    with open(doc, "w") as fh:
        fh.write("v3")
        fh.flush()
        os.fsync(fh.fileno())
    os.unlink(top / "doc.txt~")
    assert doc.read_text() == "v3"
    # vim 'backupcopy=yes' (and emacs for files with links): copy to the backup, then
    # overwrite the original in place
    shutil.copy2(doc, top / "doc.txt~")
    with open(doc, "r+") as fh:
        fh.truncate(0)
        fh.write("v4")
        fh.flush()
        os.fsync(fh.fileno())
    assert (top / "doc.txt~").read_text() == "v3"
    os.unlink(top / "doc.txt~")
    assert doc.read_text() == "v4"
    assert os.listdir(top) == ["doc.txt"]


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed")
    return path


def test_vim_and_sed_save(top: Path) -> None:
    """vim with each 'backupcopy' (rename the original away / overwrite in place / vim's
    choice), then sed -i (temporary file renamed over the original): content and mode kept,
    nothing left behind."""
    vim = _tool("vim")
    f = top / "v.txt"
    f.write_text("one\ntwo\n")
    os.chmod(f, 0o640)
    for i, mode in enumerate(("no", "yes", "auto")):
        run(vim, "-u", "NONE", "-i", "NONE", "-es", "-c", f"set backupcopy={mode}",
            "-c", f"%s/^.*$/line{i}/", "-c", "wq", f)
        assert f.read_text() == f"line{i}\nline{i}\n"
        assert stat.S_IMODE(f.stat().st_mode) == 0o640
    run("sed", "-i", "s/line2/sed/", f)
    assert f.read_text() == "sed\nsed\n"
    assert os.listdir(top) == ["v.txt"]


def test_git_and_sqlite(top: Path) -> None:
    """Lock files (O_EXCL), renames over the original, appends, fsyncs and in-place page
    writes of two programs users run on shared storage."""
    git = _tool("git")
    ident = ["-c", "user.email=t@example.invalid", "-c", "user.name=t"]
    run(git, "init", "-q", top)
    (top / "a.txt").write_text("hello\n")
    run(git, "-C", top, "add", "a.txt")
    run(git, "-C", top, *ident, "commit", "-qm", "first")
    with open(top / "a.txt", "a") as fh:
        fh.write("more\n")
    run(git, "-C", top, *ident, "commit", "-qam", "second")
    assert len(run(git, "-C", top, "log", "--oneline").stdout.splitlines()) == 2
    run(git, "-C", top, "fsck", "--strict")
    assert run(git, "-C", top, "status", "--porcelain").stdout == ""
    sqlite = _tool("sqlite3")
    db = top / "db.sqlite"
    run(sqlite, db, "create table t(x); insert into t values (1), (2);")
    run(sqlite, db, "insert into t select x + 2 from t; pragma journal_mode=wal;")
    assert run(sqlite, db, "select sum(x) from t; pragma integrity_check;").stdout.split() == [
        "10", "ok"]


# --- data --------------------------------------------------------------------------------

def test_one_descriptor_survives_many_write_and_fsync_cycles(top: Path) -> None:
    """fsx and databases keep a file open for thousands of write+fsync cycles: each fsync
    publishes the file, and the next write must keep working (not fail after a few hundred)."""
    f = top / "long-lived"
    fd = os.open(f, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        for cycle in range(CYCLES):
            os.pwrite(fd, cycle.to_bytes(4, "big"), (cycle % 256) * 4)
            os.fsync(fd)
        assert os.pread(fd, 4, 0) == ((CYCLES - 1) // 256 * 256).to_bytes(4, "big")
    finally:
        os.close(fd)
    assert f.stat().st_size == 1024


def test_a_long_lived_sqlite_connection_commits_thousands_of_times(top: Path) -> None:
    import sqlite3

    db = sqlite3.connect(top / "long.db", isolation_level=None)
    try:
        db.execute("create table t(x integer)")
        for i in range(COMMITS):
            db.execute("insert into t values (?)", (i,))  # autocommit: one commit each
        assert db.execute("select count(*), sum(x) from t").fetchone() == (
            COMMITS, COMMITS * (COMMITS - 1) // 2)
        assert db.execute("pragma integrity_check").fetchone() == ("ok",)
    finally:
        db.close()


def test_sparse_write(top: Path) -> None:
    f = top / "sparse"
    with open(f, "wb") as fh:
        fh.write(b"head")
        fh.seek(10 * MiB)
        fh.write(b"tail")
    assert f.stat().st_size == 10 * MiB + 4
    data = f.read_bytes()
    assert data[:4] == b"head" and data[-4:] == b"tail"
    assert data[4:-4].count(0) == 10 * MiB - 4
    with open(f, "r+b") as fh:  # pwrite past the end of an existing file
        os.pwrite(fh.fileno(), b"more", 11 * MiB)
    assert f.stat().st_size == 11 * MiB + 4
    with open(f, "rb") as fh:
        assert os.pread(fh.fileno(), 8, 10 * MiB) == b"tail\0\0\0\0"


def test_mmap(top: Path) -> None:
    f = top / "m.bin"
    data = os.urandom(3 * MiB + 123)
    f.write_bytes(data)
    with open(f, "rb") as fh:
        with mmap.mmap(fh.fileno(), 0, mmap.MAP_SHARED, mmap.PROT_READ) as m:
            assert m[:] == data
        with mmap.mmap(fh.fileno(), 0, mmap.MAP_PRIVATE, mmap.PROT_READ) as m:
            assert m[MiB:MiB + 100] == data[MiB:MiB + 100]
    # a shared writable mapping reaches the file (msync)
    with open(f, "r+b") as rw, mmap.mmap(rw.fileno(), 0, mmap.MAP_SHARED) as m:
        m[:5] = b"HELLO"
        m.flush()
    assert f.read_bytes() == b"HELLO" + data[5:]


def test_metadata_through_open_handles(top: Path) -> None:
    f = top / "m"
    fd = os.open(f, os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        os.write(fd, b"data")
        os.fchmod(fd, 0o600)
        os.utime(fd, ns=(1, 1_600_000_000_000_000_000))
        os.chmod(f, 0o604)  # by path while open: the open copy takes it too
    finally:
        os.close(fd)
    st = f.stat()
    assert (stat.S_IMODE(st.st_mode), st.st_size) == (0o604, 4)
    assert st.st_mtime_ns == 1_600_000_000_000_000_000
    with open(f, "rb") as reader:  # a reader's copy keeps its content across a chmod
        os.chmod(f, 0o640)
        assert reader.read() == b"data"
    assert stat.S_IMODE(f.stat().st_mode) == 0o640


def test_unlink_while_open_then_the_name_is_reused(top: Path) -> None:
    f = top / "f"
    f.write_bytes(b"first")
    with open(f, "rb") as old:
        f.unlink()
        f.write_bytes(b"second")
        assert old.read() == b"first"
        assert f.read_bytes() == b"second"
    assert f.read_bytes() == b"second" and os.listdir(top) == ["f"]


# --- a holder killed while a mount fetches from it ------------------------------------------

def _wchar(pid: int) -> int:
    """Bytes this process wrote (write, send, sendfile), from /proc/PID/io."""
    with open(f"/proc/{pid}/io") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("wchar:"))


def _holders(m: Mount, name: str) -> list[str]:
    return [h["address"] for h in json.loads(os.getxattr(m.path(name), "user.kelips.holders"))]


def _read_in_thread(path: Path, timeout: float, pace: float = 0.0
                    ) -> tuple[bytes | None, OSError | None]:
    """Read ``path`` whole in a thread; ``pace``: seconds of pause after each MiB read (a
    reader that takes its time, so a holder can die in the middle of it)."""
    result: list[bytes] = []
    error: list[OSError] = []

    def read() -> None:
        try:
            with open(path, "rb") as fh:
                blocks = []
                while block := fh.read(MiB):
                    blocks.append(block)
                    time.sleep(pace)
            result.append(b"".join(blocks))
        except OSError as exc:
            error.append(exc)

    t = threading.Thread(target=read, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"reading {path} hung for {timeout}s after a holder died"
    return (result[0] if result else None), (error[0] if error else None)


def _kill_serving_holder(ms: Mounts, reader: Mount, holders: list[Mount],
                         reading: threading.Thread) -> int:
    """Wait for the reader's fetch to be well under way, SIGKILL the holder that sent the
    most; the bytes the reader's node had written (its spool and FUSE replies) by then."""
    start = {m.pid or 0: _wchar(m.pid or 0) for m in [reader, *holders]}
    deadline = time.monotonic() + 60
    got = 0
    while time.monotonic() < deadline:
        got = _wchar(reader.pid or 0) - start[reader.pid or 0]
        if got >= 8 * MiB:
            break
        time.sleep(0.002)
    assert got >= 8 * MiB, f"the fetch had only {got} bytes after 60 s"
    sent = {m.pid or 0: _wchar(m.pid or 0) - start[m.pid or 0] for m in holders}
    serving = max(holders, key=lambda m: sent[m.pid or 0])
    assert reading.is_alive(), "the read finished before the holder could be killed"
    ms.kill(serving)
    return got


def _read_while_killing(ms: Mounts, reader: Mount, holders: list[Mount]
                        ) -> tuple[bytes | None, OSError | None, int]:
    """Read big.bin through ``reader`` while a holder is killed: (the bytes or the error,
    the bytes the reader's node had written when the holder died)."""
    box: list[tuple[bytes | None, OSError | None]] = []
    t = threading.Thread(target=lambda: box.append(
        _read_in_thread(reader.path("big.bin"), 120, pace=0.01)), daemon=True)
    t.start()
    got = _kill_serving_holder(ms, reader, holders, t)
    t.join(130)
    assert box, "the read gave no answer (it hung, or failed other than with an OSError)"
    return (*box[0], got)


def _mounts_and_a_reader(ms: Mounts, tmp_path: Path, size: int,
                              replication: int) -> tuple[Mount, list[Mount], bytes]:
    """Mounts with ``replication`` copies per object and one mount holding none of a
    ``size`` file written through the first: (that reader, the holders, the digest)."""
    settings = (f"replication={replication}", "t_fail=2.0")
    first = ms.new(*settings)
    everyone = [first] + [ms.new(*settings, join=first) for _ in range(replication)]
    wait_for(lambda: all(_alive_members(m) == len(everyone) for m in everyone), 30,
             "membership")
    src = random_file(tmp_path / "big.bin", size)
    digest = file_digest(src)
    run("cp", src, first.path("big.bin"))
    src.unlink()
    by_address = {m.address: m for m in everyone}
    holders = [by_address[addr] for addr in _holders(first, "big.bin")]
    assert len(holders) == replication
    (reader,) = [m for m in everyone if m not in holders]
    return reader, holders, digest


@pytest.mark.slow
def test_holder_killed_mid_read(tmp_path: Path) -> None:
    """Two copies (r = 2) of a 200 MiB file's chunks, on three mounts, read through the one
    that does not hold its manifest: a holder is killed with SIGKILL mid-read. The chunks it
    was sending come from their other holder, and the read returns exactly the file, or
    fails with EIO; it never hangs nor returns other bytes."""
    size = 200 * MiB
    with Mounts(tmp_path, base=150) as ms:
        reader, holders, digest = _mounts_and_a_reader(ms, tmp_path, size, 2)
        data, error, got = _read_while_killing(ms, reader, holders)
        if data is not None:
            assert len(data) == size and digest_of(data) == digest
        else:
            assert error is not None and error.errno == errno.EIO, error
        print(f"holder killed {got / MiB:.0f} MiB into the read: "
              f"{'completed on the other holder' if data is not None else 'EIO'}")
        del data
        again, error = _read_in_thread(reader.path("big.bin"), 120)  # the survivor serves it
        assert error is None and again is not None
        assert digest_of(again) == digest
        # (the kernel sends the release of a closed file after close(2) returned)
        wait_for(lambda: list((reader.data_dir / "spool").iterdir()) == [], 10,
                 "the local copy to be removed")


@pytest.mark.slow
def test_only_holder_killed_mid_read_is_eio(tmp_path: Path) -> None:
    """r = 1: a holder of the chunks dies mid-read, so the chunks it held cannot be read from
    anywhere: EIO, promptly, no partial copy left, and the reading mount carries on."""
    size = 200 * MiB
    with Mounts(tmp_path, base=160) as ms:
        reader, holders, _ = _mounts_and_a_reader(ms, tmp_path, size, 1)
        data, error, _ = _read_while_killing(ms, reader, holders)
        assert data is None and error is not None and error.errno == errno.EIO, (data, error)
        assert os.path.ismount(reader.mountpoint)
        # (the kernel sends the release of a closed file after close(2) returned)
        wait_for(lambda: list((reader.data_dir / "spool").iterdir()) == [], 10,
                 "the local copy to be removed")
        wait_for(lambda: _alive_members(reader) == 1, 30, "the holder to be declared failed")
        reader.path("after.txt").write_text("still works")  # r = 1: stored on the reader
        assert reader.path("after.txt").read_text() == "still works"
