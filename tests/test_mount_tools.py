"""Everyday tools on a real mount, compared entry by entry with the same work on local disk.

A virtualenv with a package installed into it, tar archives holding every file type and odd
modes and times, cp -a and rsync -aH of such a tree, a git clone with symlinks, sqlite3 in
WAL mode from two processes, and what one mount makes seen identically through another.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.test_mount import Mount, Mounts, run, wait_for

pytestmark = pytest.mark.skipif(
    not (Path("/dev/fuse").exists() and shutil.which("fusermount3") and os.geteuid() == 0),
    reason="needs root, /dev/fuse and fusermount3")

#: How long a change made through one mount may stay unseen through another whose node
#: holds the record (README, "Caching"): the notification's trip to the kernel.
CHANGE_BOUND = 1.0


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Mount, Mount]]:
    with Mounts(tmp_path_factory.mktemp("tools"), base=170) as ms:
        first = ms.new()
        yield first, ms.new(join=first)


@pytest.fixture
def top(pair: tuple[Mount, Mount], request: pytest.FixtureRequest) -> Path:
    path = pair[0].path(request.node.name)
    path.mkdir()
    return path


def snapshot(root: Path) -> dict[str, tuple[object, ...]]:
    """What ``ls -lR --full-time`` would show of a tree, plus content and link targets, keyed
    by path; hard links are named by the first path of their inode."""
    out: dict[str, tuple[object, ...]] = {}
    first_of: dict[int, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            st = path.lstat()
            kind = stat.S_IFMT(st.st_mode)
            extra: object = None
            if stat.S_ISREG(st.st_mode):
                extra = path.read_bytes()
                link = first_of.setdefault(st.st_ino, rel)
                extra = (extra, link)
            elif stat.S_ISLNK(st.st_mode):
                extra = os.readlink(path)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                extra = st.st_rdev
            mtime = None if stat.S_ISDIR(st.st_mode) or stat.S_ISLNK(st.st_mode) else \
                st.st_mtime_ns // 1_000_000_000
            out[rel] = (kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_nlink
                        if not stat.S_ISDIR(st.st_mode) else None, mtime, extra)
    return out


def make_tree(root: Path) -> Path:
    """Every kind of entry, with owners, setuid/setgid/sticky modes and odd times."""
    root.mkdir(parents=True)
    (root / "dir").mkdir()
    (root / "dir" / "file.txt").write_bytes(b"some text\n" * 100)
    (root / "big.bin").write_bytes(os.urandom(300_000))
    os.link(root / "big.bin", root / "dir" / "hardlink.bin")
    os.symlink("dir/file.txt", root / "relative-link")
    os.symlink("/etc/hostname", root / "absolute-link")
    os.symlink("missing", root / "dangling")
    os.mkfifo(root / "fifo", 0o640)
    os.mknod(root / "chardev", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    suid = root / "suid-tool"
    suid.write_bytes(b"#!/bin/sh\n")
    os.chmod(suid, 0o4755)
    sticky = root / "sticky"
    sticky.mkdir()
    os.chmod(sticky, 0o1777)
    owned = root / "owned.txt"
    owned.write_bytes(b"mine")
    os.chown(owned, 1234, 5678)
    os.utime(owned, ns=(1_000_000_000, 86_400_000_000_000))  # 1970-01-02
    old = root / "dir" / "old.txt"
    old.write_bytes(b"old")
    os.utime(old, ns=(2_000_000_000_123_456_789, 1_234_567_890_987_654_321))
    return root


def test_tar_extract_keeps_every_entry(top: Path, tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "src")
    archive = tmp_path / "tree.tar"
    run("tar", "-C", tree, "-cf", archive, ".")
    local = tmp_path / "local"
    local.mkdir()
    run("tar", "-C", local, "-xpf", archive, "--same-owner")
    run("tar", "-C", top, "-xpf", archive, "--same-owner")
    assert snapshot(top) == snapshot(local)
    run("tar", "-C", top, "--compare", "-f", archive)


def test_cp_a_and_rsync_ah(top: Path, tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "src")
    run("cp", "-a", tree, top / "cp")
    assert snapshot(top / "cp") == snapshot(tree)
    run("rsync", "-aH", f"{tree}/", f"{top / 'rsync'}/")
    assert snapshot(top / "rsync") == snapshot(tree)
    # and back out to local disk
    run("cp", "-a", top / "cp", tmp_path / "back")
    assert snapshot(tmp_path / "back") == snapshot(tree)


def _wheel(where: Path) -> Path:
    """A minimal wheel of a package named kelipsfs_probe (no build tools needed)."""
    path = where / "kelipsfs_probe-1.0-py3-none-any.whl"
    dist = "kelipsfs_probe-1.0.dist-info"
    files = {
        "kelipsfs_probe/__init__.py": "ANSWER = 42\n",
        f"{dist}/METADATA": "Metadata-Version: 2.1\nName: kelipsfs-probe\nVersion: 1.0\n",
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                         "Tag: py3-none-any\n",
    }
    record = "".join(f"{name},,\n" for name in files) + f"{dist}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as zf:
        for name, text in files.items():
            zf.writestr(name, text)
        zf.writestr(f"{dist}/RECORD", record)
    return path


def test_python_venv_and_pip_install(top: Path, tmp_path: Path) -> None:
    base = Path(sys.base_prefix) / "bin" / "python3"
    venv = top / "venv"
    run(base if base.exists() else "python3", "-m", "venv", "--without-pip", venv)
    assert (venv / "lib64").is_symlink() or (venv / "lib").is_dir()
    wheel = _wheel(tmp_path)
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--target",
                    str(venv / "site"), str(wheel)], check=True, capture_output=True, env=env,
                   timeout=120)
    out = run(venv / "bin" / "python", "-c",
              f"import sys; sys.path.insert(0, {str(venv / 'site')!r}); "
              "import kelipsfs_probe; print(kelipsfs_probe.ANSWER)")
    assert out.stdout.strip() == "42"


def test_git_clone_with_symlinks(top: Path, tmp_path: Path) -> None:
    origin = tmp_path / "origin"
    origin.mkdir()
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}

    def git(*args: str | Path, cwd: Path) -> str:
        return subprocess.run(["git", *map(str, args)], cwd=cwd, env=env, check=True,
                              capture_output=True, text=True, timeout=120).stdout

    git("init", "-q", cwd=origin)
    (origin / "src").mkdir()
    (origin / "src" / "main.py").write_text("print('hi')\n")
    os.symlink("src/main.py", origin / "link.py")
    os.symlink("src", origin / "srcdir")
    (origin / "run.sh").write_text("#!/bin/sh\n")
    os.chmod(origin / "run.sh", 0o755)
    git("add", ".", cwd=origin)
    git("commit", "-qm", "first", cwd=origin)
    git("clone", "-q", origin, top / "clone", cwd=top)
    clone = top / "clone"
    assert os.readlink(clone / "link.py") == "src/main.py"
    assert (clone / "srcdir" / "main.py").read_text() == "print('hi')\n"
    assert os.stat(clone / "run.sh").st_mode & 0o111
    assert git("status", "--porcelain", cwd=clone) == ""
    git("fsck", "--strict", cwd=clone)
    (clone / "new.txt").write_text("x")
    git("add", "new.txt", cwd=clone)
    git("commit", "-qm", "second", cwd=clone)
    assert git("status", "--porcelain", cwd=clone) == ""


SQLITE_WRITER = """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], timeout=60, isolation_level=None)
db.execute("pragma journal_mode=wal")
for i in range(int(sys.argv[3])):
    db.execute("insert into t values (?, ?)", (sys.argv[2], i))
db.close()
"""


def test_sqlite_wal_from_two_processes(top: Path) -> None:
    import sqlite3

    path = top / "wal.db"
    db = sqlite3.connect(path, isolation_level=None)
    assert db.execute("pragma journal_mode=wal").fetchone() == ("wal",)
    db.execute("create table t(who text, n integer)")
    db.close()
    writers = [subprocess.Popen([sys.executable, "-c", SQLITE_WRITER, str(path), who, "200"])
               for who in ("a", "b")]
    for proc in writers:
        assert proc.wait(timeout=300) == 0
    db = sqlite3.connect(path)
    assert db.execute("select who, count(*) from t group by who order by who").fetchall() == [
        ("a", 200), ("b", 200)]
    assert db.execute("pragma integrity_check").fetchone() == ("ok",)
    db.close()


def test_what_one_mount_makes_the_other_sees(pair: tuple[Mount, Mount], top: Path) -> None:
    other = pair[1].path(top.name)
    (top / "file").write_bytes(b"content")
    os.symlink("file", top / "sym")
    os.link(top / "file", top / "hard")
    os.mkfifo(top / "fifo", 0o600)
    (top / "sub").mkdir()
    os.chown(top / "file", 42, 43)
    os.chmod(top / "sub", 0o2710)

    def same() -> bool:
        return snapshot(other) == snapshot(top)

    wait_for(same, 10, "the second mount to show the same entries")
    assert os.readlink(other / "sym") == "file"
    assert (other / "hard").stat().st_nlink == 2
    assert (other / "hard").read_bytes() == b"content"
    assert stat.S_ISFIFO((other / "fifo").lstat().st_mode)
    assert (other / "file").stat().st_uid == 42 and (other / "file").stat().st_gid == 43
    assert stat.S_IMODE((other / "sub").stat().st_mode) == 0o2710
    # a write through one name on one mount is read through the other name on the other
    (other / "hard").write_bytes(b"changed")
    assert (top / "file").read_bytes() == b"changed"


def test_changes_are_seen_by_the_other_mount_through_its_cache(
        pair: tuple[Mount, Mount], top: Path) -> None:
    """Creates, overwrites, renames and deletes made through one mount are seen through the
    other within the bound README states, though the other has cached the names, attributes
    and pages: the change reaches its node, which tells its kernel to drop them."""
    _one_way(top / "a", pair[1].path(top.name) / "a")
    _one_way(pair[1].path(top.name) / "b", top / "b")


def _seen(check: Callable[[], bool], what: str) -> None:
    """``check`` holds through the other mount within ``CHANGE_BOUND`` (asked every ms)."""
    wait_for(check, CHANGE_BOUND, f"the other mount to see {what}", interval=0.001)


def _one_way(w: Path, r: Path) -> None:
    """Changes made in ``w`` through one mount, each awaited in ``r`` through the other."""
    w.mkdir()
    _seen(r.is_dir, "a mkdir")
    assert not (r / "file").exists()  # (a negative entry the kernel may keep)
    (w / "file").write_bytes(b"one")
    _seen(lambda: (r / "file").read_bytes() == b"one", "a create")
    assert (r / "file").stat().st_size == 3  # (attributes and pages it may keep)
    (w / "file").write_bytes(b"second version")
    _seen(lambda: (r / "file").read_bytes() == b"second version", "an overwrite")
    os.rename(w / "file", w / "moved")
    _seen(lambda: not (r / "file").exists()
          and (r / "moved").read_bytes() == b"second version", "a rename")
    os.chmod(w / "moved", 0o600)
    _seen(lambda: stat.S_IMODE((r / "moved").stat().st_mode) == 0o600, "a chmod")
    (w / "moved").unlink()
    _seen(lambda: not (r / "moved").exists(), "a delete")
    w.rmdir()
    _seen(lambda: not r.exists(), "an rmdir")


def test_fsync_of_a_directory_and_of_an_unchanged_file(pair: tuple[Mount, Mount],
                                                       top: Path) -> None:
    """fsync(2) of a directory, and of a file whose only change is its mode, wait for their
    holders to make the records durable (and succeed); the changes are there on both mounts."""
    (top / "sub").mkdir()
    (top / "sub" / "file").write_bytes(b"x")
    os.chmod(top / "sub" / "file", 0o640)
    dfd = os.open(top / "sub", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    fd = os.open(top / "sub" / "file", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    other = pair[1].path(top.name) / "sub" / "file"
    wait_for(lambda: stat.S_IMODE(other.stat().st_mode) == 0o640, CHANGE_BOUND, "the chmod")
