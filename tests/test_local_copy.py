"""LocalCopy: hashing while written, copy on write after the store links it, checked reads;
MemoryCopy: small contents in memory until they outgrow it."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from daemon.core.manifest import CHUNK_SIZE
from daemon.digest import digest_of
from kelipsfs import local_copy
from kelipsfs.local_copy import CorruptCopy, LocalCopy
from kelipsfs.memory_copy import MEMORY_MAX, MemoryCopy
from kelipsfs.upload_behind import data_chunks

MiB = 1 << 20
BIG = 64 * MiB


def new_spool(tmp_path: Path, name: str = "f") -> LocalCopy:
    path = tmp_path / f"spool-{name}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    return LocalCopy(name, path, fd, spool=True, clock=None, mtime_ns=0, dirty=True)


def read(f: LocalCopy, size: int, offset: int) -> bytes:
    """What libfuse does with read_buf's answer: pread the range from the descriptor given."""
    return os.pread(f.readable_fd(size, offset), size, offset)


def no_rehash(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any hashing of the whole file fail: the running hash must be enough."""
    def refuse(path: Path) -> bytes:
        raise AssertionError(f"re-hashed {path}")
    monkeypatch.setattr(local_copy, "file_digest", refuse)


def test_front_to_back_writes_are_hashed_as_they_come(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    no_rehash(monkeypatch)
    rng = random.Random(1)
    # small writes (inline hash), then large ones (the hashing thread), past one writeback
    blocks = [rng.randbytes(n) for n in (1, 4096, 100_000)] + [rng.randbytes(MiB)] * 17
    blocks += [rng.randbytes(5)]
    f = new_spool(tmp_path)
    offset = 0
    for block in blocks:
        assert f.write(block, offset, False, BIG) == len(block)
        offset += len(block)
    with f.lock:
        assert f.checksum() == digest_of(b"".join(blocks))
    f.write(b"tail", 0, True, BIG)  # an append continues the running hash
    with f.lock:
        assert f.checksum() == digest_of(b"".join(blocks) + b"tail")
    f.close()
    assert not f.path.exists()


@pytest.mark.parametrize("case", ["seek back", "hole", "truncate shorter", "truncate longer"])
def test_other_writes_fall_back_to_hashing_the_file(tmp_path: Path, case: str) -> None:
    f = new_spool(tmp_path)
    f.write(b"a" * 1000, 0, False, BIG)
    if case == "seek back":
        f.write(b"b" * 10, 5, False, BIG)
    elif case == "hole":
        f.write(b"c" * 10, 2000, False, BIG)
    elif case == "truncate shorter":
        f.truncate(300)
    else:
        f.truncate(5000)
    with f.lock:
        assert f.checksum() == digest_of(f.path.read_bytes())
    f.close()


def test_truncate_to_zero_starts_a_new_running_hash(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    f = new_spool(tmp_path)
    f.write(b"x" * 10, 3, False, BIG)  # not front to back: the running hash is lost
    f.truncate(0)
    no_rehash(monkeypatch)
    f.write(b"fresh", 0, False, BIG)
    with f.lock:
        assert f.checksum() == digest_of(b"fresh")
    f.close()


def test_too_large_a_write_is_efbig_and_changes_nothing(tmp_path: Path) -> None:
    f = new_spool(tmp_path)
    f.write(b"abc", 0, False, 10)
    with pytest.raises(OSError) as info:
        f.write(b"0123456789", 3, False, 10)
    assert info.value.errno == 27  # EFBIG
    assert f.path.read_bytes() == b"abc"
    f.close()


def test_a_published_copy_is_copied_before_it_changes(tmp_path: Path) -> None:
    """Once the store holds the spool's inode (a hard link), a later write or truncate goes
    to a private copy: the stored version never changes under the store."""
    f = new_spool(tmp_path)
    f.write(b"version one", 0, False, BIG)
    stored = tmp_path / "store-link"
    os.link(f.path, stored)  # what ObjectStore.adopt_file does
    old_fd = f.fd
    with f.lock:
        f.published(7, linked=True)
    assert (f.clock, f.dirty) == (7, False)
    f.write(b"VERSION TWO", 0, False, BIG)
    assert stored.read_bytes() == b"version one"
    assert f.path.read_bytes() == b"VERSION TWO"
    assert os.pread(old_fd, 100, 0) == b"version one"  # still open for a reader in flight
    assert read(f, 100, 0) == b"VERSION TWO"
    with f.lock:
        f.published(8, linked=True)
    os.unlink(stored)
    os.link(f.path, stored)
    f.truncate(3)
    assert stored.read_bytes() == b"VERSION TWO" and f.path.read_bytes() == b"VER"
    f.close()
    with pytest.raises(OSError):
        os.fstat(old_fd)  # closed with the copy
    assert stored.exists()


def cache_copy(tmp_path: Path, data: bytes, checksum: bytes) -> LocalCopy:
    path = tmp_path / "cache"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    return LocalCopy("c", path, fd, spool=False, clock=1, mtime_ns=0,
                     dirty=False, checksum=checksum, size=len(data), verify=True)


def test_a_checked_copy_fails_the_read_that_reaches_the_end_if_corrupt(tmp_path: Path) -> None:
    data = random.Random(2).randbytes(3 * MiB + 5)
    bad = cache_copy(tmp_path, data, digest_of(data[:-1] + b"?"))
    assert read(bad, 4096, 0) == data[:4096]  # before the end: served
    with pytest.raises(CorruptCopy) as info:
        read(bad, MiB, len(data) - 100)
    assert info.value.errno == 5  # EIO
    with pytest.raises(CorruptCopy):
        bad.readable_fd(MiB, 3 * MiB)
    bad.close()
    good = cache_copy(tmp_path, data, digest_of(data))
    assert read(good, MiB, len(data) - 100) == data[-100:]
    assert good.readable_fd(10, len(data)) == good.fd
    good.close()


def test_ten_thousand_write_and_publish_cycles_on_one_copy(tmp_path: Path) -> None:
    """Every publish hands the inode to the store; the next write copies it. The copy's
    file name and its open descriptors must not grow with the number of cycles."""
    f = new_spool(tmp_path)
    fds_before = len(os.listdir("/proc/self/fd"))
    stored = tmp_path / "store"
    stored.mkdir()
    for cycle in range(10_000):
        f.write(cycle.to_bytes(4, "big"), (cycle % 64) * 4, False, BIG)
        with f.lock:
            f.checksum()
            f.published(cycle + 1, linked=True)
        link = stored / "current"
        link.unlink(missing_ok=True)
        os.link(f.path, link)  # what ObjectStore.adopt_file does
    assert len(f.path.name) < 40
    assert len(os.listdir("/proc/self/fd")) <= fds_before + local_copy.RETIRED_MAX + 2
    assert os.pread(f.fd, 4, 63 * 4) == (9_999 - 16).to_bytes(4, "big")
    f.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]


def test_a_memory_copy_changes_in_memory_and_makes_its_file_only_past_the_limit(
        tmp_path: Path) -> None:
    """Read, written, truncated and extended in memory (no file, ever, while it stays small);
    a publish snapshot never changes with later writes; the first change past MEMORY_MAX
    puts the content in the spool file, with the same bytes and a right checksum."""
    data = b"small content of the record log\n" * 10
    path = tmp_path / "spool-m"
    copy = MemoryCopy("m", path, data, clock=7, checksum=digest_of(data))
    assert copy.read(10, 5) == data[5:15] and copy.size() == len(data)
    assert copy.read(100, len(data) - 4) == data[-4:]
    assert not copy.dirty and not copy.shared and copy.checksum() == digest_of(data)
    snapshot = copy.memory()
    assert copy.write(b"XY", 3, False, 1 << 30) == 2
    changed = data[:3] + b"XY" + data[5:]
    assert copy.dirty and copy.read(8, 0) == changed[:8] and snapshot == data
    copy.write(b"Z", len(changed) + 3, False, 1 << 30)  # past the end: a gap of zeros
    changed += b"\0\0\0Z"
    assert copy.memory() == changed and copy.checksum() == digest_of(changed)
    copy.write(b"!", 0, True, 1 << 30)  # O_APPEND
    changed += b"!"
    copy.truncate(4)
    copy.truncate(6)
    assert copy.memory() == changed[:4] + b"\0\0"
    copy.published(9, linked=True)
    assert not copy.dirty and not copy.shared and copy.clock == 9
    assert not path.exists()
    with pytest.raises(OSError):  # EFBIG before anything changes
        copy.write(b"x" * 10, 0, False, 8)
    assert copy.memory() == changed[:4] + b"\0\0"
    grown = b"y" * (MEMORY_MAX + 1)
    copy.write(grown, 2, False, 1 << 30)
    expected = changed[:2] + grown
    assert copy.memory() is None and path.read_bytes() == expected
    assert copy.size() == len(expected) and copy.checksum() == digest_of(expected)
    assert copy.read(5, 0) == expected[:5]
    copy.close()
    assert not path.exists()
    big = MemoryCopy("n", tmp_path / "spool-n", b"", clock=None, dirty=True)
    big.truncate(MEMORY_MAX + 10)
    assert (tmp_path / "spool-n").stat().st_size == MEMORY_MAX + 10 and big.memory() is None
    big.close()
    idle = MemoryCopy("o", tmp_path / "spool-o", data, clock=7, checksum=digest_of(data))
    idle.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == []



def test_the_data_chunks_of_a_sparse_file_are_found_without_reading(tmp_path: Path) -> None:
    path = tmp_path / "sparse"
    with open(path, "wb") as fh:
        fh.truncate(40 * CHUNK_SIZE)
        for index in (0, 7, 8, 30):
            fh.seek(index * CHUNK_SIZE + 100)
            fh.write(b"x")
    fd = os.open(path, os.O_RDONLY)
    try:
        assert data_chunks(fd) == {0, 7, 8, 30}
        assert data_chunks(fd, 1, 8) == {7}
        assert data_chunks(fd, 8, 30) == {8}
        assert data_chunks(fd, 31) == set()
    finally:
        os.close(fd)
