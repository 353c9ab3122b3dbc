"""The on-disk object store: roundtrips, versions, tombstones, recovery, kill -9 and a full disk.

pytest-trio is not used: each test drives its async part with ``run`` (``trio.run`` under a
deadline). Crashes are simulated two ways: by arranging on disk exactly what a crash at some
step of the commit order leaves behind, and by SIGKILLing a real child process in the middle of
a put loop. The disk-full test mounts a real 2 MiB tmpfs (the suite runs as root) and always
unmounts it.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import pytest
import trio

from daemon import store as store_mod
from daemon import store_recovery
from daemon.core.messages import Version
from daemon.digest import EMPTY_DIGEST, digest_of, new_hasher
from daemon.store import ObjectStore
from daemon.store_layout import (
    ChecksumMismatch,
    StaleVersion,
    StoredObject,
    StoreError,
    StoreFull,
)

T = TypeVar("T")
REPO = Path(__file__).resolve().parent.parent
WRITER = bytes(range(20))
KiB = 1 << 10
MiB = 1 << 20


def run(fn: Callable[[], Awaitable[T]], timeout: float = 60.0) -> T:
    """Run an async function under trio with a deadline (pytest-trio is not installed)."""

    async def main() -> T:
        with trio.fail_after(timeout):
            return await fn()

    return trio.run(main)


def v(clock: int, writer: bytes = WRITER) -> Version:
    return Version(clock, writer)


def sha(data: bytes) -> bytes:
    return digest_of(data)


class Chunks:
    """An async chunk stream over ``data`` that records how much of it was consumed."""

    def __init__(self, data: bytes, size: int = 64 * KiB) -> None:
        self.data = data
        self.size = size
        self.consumed = 0

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._gen()

    async def _gen(self) -> AsyncIterator[bytes]:
        for off in range(0, len(self.data), self.size):
            chunk = self.data[off:off + self.size]
            self.consumed += len(chunk)
            await trio.lowlevel.checkpoint()
            yield chunk


async def put_bytes(store: ObjectStore, name: str, version: Version, data: bytes,
                    **kw: Any) -> StoredObject:
    return await store.put(name, version, 0o644, 1_000, Chunks(data), **kw)


async def read_all(store: ObjectStore, obj: StoredObject) -> bytes:
    return b"".join([chunk async for chunk in store.read_chunks(obj)])


def tmp_entries(root: Path) -> list[str]:
    return sorted(os.listdir(root / "tmp"))


def object_files(root: Path) -> set[Path]:
    return {p for p in (root / "objects").rglob("*") if p.is_file()}


def expected_files(store: ObjectStore) -> set[Path]:
    """The files the held objects account for: nothing else may exist under objects/."""
    files: set[Path] = set()
    for obj in store.objects():
        data, meta = store.files_for(obj.name, obj.version)
        files.add(meta)
        if not obj.tombstone:
            files.add(data)
    return files


def file_sha(path: Path) -> bytes:
    h = new_hasher()
    with open(path, "rb") as f:
        while block := f.read(MiB):
            h.update(block)
    return h.digest()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "store"


# --- roundtrips ------------------------------------------------------------------------------


def test_roundtrip_small_and_empty(root: Path) -> None:
    store = ObjectStore(root)
    assert (root / "objects").is_dir() and (root / "tmp").is_dir()

    async def main() -> None:
        obj = await store.put("a/b.txt", v(5), 0o640, 123, Chunks(b"hello world"))
        assert obj == store.get("a/b.txt")
        assert (obj.size, obj.checksum, obj.mode, obj.mtime_ns, obj.tombstone) == (
            11, sha(b"hello world"), 0o640, 123, False)
        assert obj.version == v(5) and obj.path is not None and obj.path.is_file()
        assert await read_all(store, obj) == b"hello world"
        with store.open_content(obj) as f:
            assert f.read() == b"hello world"

        empty = await put_bytes(store, "empty", v(1), b"", expected_checksum=sha(b""),
                                expected_size=0)
        assert empty.size == 0 and empty.checksum == sha(b"")
        assert await read_all(store, empty) == b""

    run(main)
    assert store.names() == ["a/b.txt", "empty"]
    assert store.names("a/") == ["a/b.txt"]
    objects, used, free = store.usage()
    assert (objects, used) == (2, 11) and free > 0
    assert tmp_entries(root) == []
    reopened = ObjectStore(root)
    assert reopened.objects() == store.objects()


def test_small_reads_are_kept_in_memory_for_exactly_the_version_read(
        root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``read_small`` (the one-datagram lookup's read) is served from memory with what a put
    stored or a read verified: only for that same version, and only while its file is
    unchanged (a write to it is found out by the next read, as before). A newer version, a
    delete or a drop forgets it, and the byte budget drops the least recently used first."""
    import daemon.store_reads as store_module

    opened: list[Path] = []
    real_open = store_module.open_read

    def counting_open(path: Path) -> BinaryIO:
        opened.append(path)
        return real_open(path)

    monkeypatch.setattr(store_module, "open_read", counting_open)
    store = ObjectStore(root, small_cache_bytes=2500)

    async def main() -> None:
        first = await store.put("n", v(1), 0o644, 0, Chunks(b"a" * 1000))
        for _ in range(3):
            assert store.read_small(first, 8192) == b"a" * 1000
        assert opened == []  # kept by the put: no file opened
        assert first.path is not None
        first.path.write_bytes(b"b" * 1000)  # damaged on disk: same size, other bytes
        assert store.read_small(first, 8192) is None  # read again, and refused
        assert opened == [first.path]

        big = await store.put("big", v(1), 0o644, 0, Chunks(b"z" * 9000))
        assert store.read_small(big, 9000) == b"z" * 9000  # above SMALL_KEEP: from the file
        assert opened[-1] == big.path

        second = await store.put("n", v(2), 0o644, 0, Chunks(b"c" * 1000))
        assert store.read_small(second, 8192) == b"c" * 1000
        assert store.read_small(first, 8192) is None  # the old version is gone
        other = await store.put("o", v(1), 0o644, 0, Chunks(b"d" * 1000))
        assert store.read_small(second, 8192) == b"c" * 1000  # "n" is now the most recent
        third = await store.put("p", v(1), 0o644, 0, Chunks(b"e" * 1000))  # 3,000 B: "o" goes
        opened.clear()
        assert store.read_small(third, 8192) == b"e" * 1000
        assert store.read_small(second, 8192) == b"c" * 1000
        assert opened == []
        assert store.read_small(other, 8192) == b"d" * 1000  # evicted: from the file ...
        assert opened == [other.path]
        assert store.read_small(other, 8192) == b"d" * 1000  # ... and kept again
        assert opened == [other.path]

        await store.delete("p", v(2))
        assert store.read_small(third, 8192) is None
        await store.drop("n")
        assert store.read_small(second, 8192) is None
        assert store.get("n") is None

    run(main)


def test_large_object_streamed_with_bounded_memory(root: Path) -> None:
    """20 MiB in 64 KiB chunks: written and read back without ever being whole in memory."""
    store = ObjectStore(root)
    total, chunk = 20 * MiB, 64 * KiB
    sent = new_hasher()

    async def source() -> AsyncIterator[bytes]:
        rng = random.Random(7)
        for _ in range(total // chunk):
            block = rng.randbytes(chunk)
            sent.update(block)
            yield block

    async def main() -> tuple[StoredObject, bytes, int]:
        tracemalloc.start()
        try:
            obj = await store.put("big", v(1), 0o600, 0, source(), expected_size=total)
            back = new_hasher()
            async for block in store.read_chunks(obj):
                assert len(block) <= MiB
                back.update(block)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        return obj, back.digest(), peak

    obj, read_digest, peak = run(main)
    assert obj.size == total and obj.checksum == sent.digest() == read_digest
    assert obj.path is not None and obj.path.stat().st_size == total
    assert file_sha(obj.path) == sent.digest()
    assert peak < 8 * MiB, f"peak traced memory {peak} bytes: the object was held in memory"


def test_any_str_name_is_safe(root: Path) -> None:
    """Names are never paths: '/', '..', 4 KiB, non-ASCII, lone surrogates, newlines, empty."""
    store = ObjectStore(root)
    names = ["../../etc/passwd", "/abs/path", "dir/" * 1000 + "x", "ünïcødé/日本語/😀",
             "bad\udcffsurrogate", "line\nbreak\x00nul", "", "."]
    assert len(names[2].encode()) > 4000

    async def main() -> None:
        for i, name in enumerate(names):
            await put_bytes(store, name, v(1), name.encode("utf-8", "surrogatepass") + bytes([i]))

    run(main)
    assert sorted(store.names()) == sorted(names)
    for path in object_files(root):
        assert path.parent.parent == root / "objects"  # one fan-out level, nothing escaped
        assert len(path.name) < 120
    assert not (root.parent / "etc").exists()
    reopened = ObjectStore(root)
    assert sorted(reopened.names()) == sorted(names)
    for i, name in enumerate(names):
        obj = reopened.get(name)
        assert obj is not None and obj.name == name
        assert run(functools.partial(read_all, reopened, obj)) == (
            name.encode("utf-8", "surrogatepass") + bytes([i]))


def test_put_file_copies_a_local_file(root: Path, tmp_path: Path) -> None:
    source = tmp_path / "source.bin"
    data = random.Random(3).randbytes(3 * MiB + 17)
    source.write_bytes(data)
    store = ObjectStore(root)
    obj = run(lambda: store.put_file("copy", v(2), 0o755, 42, source))
    assert (obj.size, obj.checksum, obj.mode, obj.mtime_ns) == (len(data), sha(data), 0o755, 42)
    assert obj.path is not None and obj.path.read_bytes() == data
    with pytest.raises(StoreError, match="cannot read"):
        run(lambda: store.put_file("missing", v(1), 0o644, 0, tmp_path / "nope"))
    assert store.get("missing") is None and tmp_entries(root) == []


def test_adopt_file_links_instead_of_copying(root: Path, tmp_path: Path) -> None:
    source = tmp_path / "spool.bin"
    data = random.Random(4).randbytes(2 * MiB + 3)
    source.write_bytes(data)
    store = ObjectStore(root)
    obj = run(lambda: store.adopt_file("linked", v(3), 0o600, 9, source, len(data), sha(data)))
    assert obj.path is not None and obj.path.read_bytes() == data
    assert os.stat(obj.path).st_ino == os.stat(source).st_ino  # no copy
    assert (obj.size, obj.checksum, obj.mode, obj.written_here) == (len(data), sha(data), 0o600,
                                                                     True)
    assert tmp_entries(root) == []
    source.unlink()  # the writer's name goes; the store's link stays
    again = ObjectStore(root)  # recovery: committed like any put
    found = again.get("linked")
    assert found is not None and found.checksum == sha(data)
    assert found.path is not None and found.path.read_bytes() == data
    assert not found.written_here  # found on disk: a local reader checks it


def test_adopt_file_refuses_a_wrong_size(root: Path, tmp_path: Path) -> None:
    source = tmp_path / "spool.bin"
    source.write_bytes(b"12345")
    store = ObjectStore(root)
    with pytest.raises(ChecksumMismatch, match="5 bytes, not the 6"):
        run(lambda: store.adopt_file("x", v(1), 0o644, 0, source, 6, sha(b"123456")))
    assert store.get("x") is None and tmp_entries(root) == [] and object_files(root) == set()


def test_adopt_file_copies_when_it_cannot_link(root: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Another file system (EXDEV): a verified copy instead, refused if the checksum lies."""
    def cross_device(source: Path, link: Path) -> int:
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))

    monkeypatch.setattr(store_mod, "link_synced", cross_device)
    source = tmp_path / "spool.bin"
    source.write_bytes(b"content")
    store = ObjectStore(root)
    obj = run(lambda: store.adopt_file("x", v(1), 0o644, 0, source, 7, sha(b"content")))
    assert obj.path is not None and obj.path.read_bytes() == b"content"
    assert os.stat(obj.path).st_ino != os.stat(source).st_ino
    with pytest.raises(ChecksumMismatch):
        run(lambda: store.adopt_file("y", v(1), 0o644, 0, source, 7, sha(b"other!!")))
    assert store.get("y") is None and tmp_entries(root) == []


# --- versions ----------------------------------------------------------------------------------


def test_higher_version_replaces_and_removes_old_files(root: Path) -> None:
    store = ObjectStore(root)

    async def main() -> tuple[StoredObject, StoredObject]:
        old = await put_bytes(store, "f", v(1), b"old content")
        new = await put_bytes(store, "f", v(2, b"\x00" * 20), b"new!")
        return old, new

    old, new = run(main)
    assert store.get("f") == new
    old_data, old_meta = store.files_for("f", old.version)
    assert not old_data.exists() and not old_meta.exists()
    assert old.path == old_data
    assert object_files(root) == expected_files(store)
    assert store.usage()[:2] == (1, 4)
    with pytest.raises(StoreError, match="no longer stored"):
        store.open_content(old)


def test_open_file_survives_replacement(root: Path) -> None:
    store = ObjectStore(root)
    old = run(lambda: put_bytes(store, "f", v(1), b"first"))
    with store.open_content(old) as f:
        run(lambda: put_bytes(store, "f", v(2), b"second"))
        assert f.read() == b"first"


def test_stale_version_is_refused_without_reading(root: Path) -> None:
    store = ObjectStore(root)
    run(lambda: put_bytes(store, "f", v(10), b"ten"))
    chunks = Chunks(b"nine")
    with pytest.raises(StaleVersion, match=r"'f'.*older"):
        run(lambda: store.put("f", v(9), 0o644, 0, chunks))
    assert chunks.consumed == 0
    # same clock, lower writer id: still older
    with pytest.raises(StaleVersion):
        run(lambda: put_bytes(store, "f", v(10, b"\x00" * 20), b"x"))
    with pytest.raises(StaleVersion):
        run(lambda: store.delete("f", v(3)))
    assert store.get("f") is not None and store.get("f").version == v(10)  # type: ignore[union-attr]
    assert tmp_entries(root) == []


def test_stale_detected_at_commit_after_a_newer_version_won(root: Path) -> None:
    """A slow sender of v1 finishes after v2 committed: StaleVersion, v2 kept, temp gone."""
    store = ObjectStore(root)
    v2_done = trio.Event()

    async def slow_v1() -> AsyncIterator[bytes]:
        yield b"a" * 1000
        await v2_done.wait()
        yield b"b" * 1000

    async def main() -> list[str]:
        outcome: list[str] = []

        async def put_v1() -> None:
            try:
                await store.put("f", v(1), 0o644, 0, slow_v1())
                outcome.append("v1 committed")
            except StaleVersion:
                outcome.append("v1 stale")

        async def put_v2() -> None:
            await trio.sleep(0.05)
            await put_bytes(store, "f", v(2), b"two")
            v2_done.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(put_v1)
            nursery.start_soon(put_v2)
        return outcome

    assert run(main) == ["v1 stale"]
    obj = store.get("f")
    assert obj is not None and obj.version == v(2)
    assert tmp_entries(root) == [] and object_files(root) == expected_files(store)


def test_same_version_is_idempotent(root: Path) -> None:
    store = ObjectStore(root)
    first = run(lambda: put_bytes(store, "f", v(4), b"content"))
    again = Chunks(b"whatever would be sent")
    assert run(lambda: store.put("f", v(4), 0o600, 9, again, sha(b"content"))) == first
    assert again.consumed == 0  # documented: the held version is returned, chunks are not read
    with pytest.raises(ChecksumMismatch, match="already stored"):
        run(lambda: put_bytes(store, "f", v(4), b"other", expected_checksum=sha(b"other")))
    assert store.get("f") == first and object_files(root) == expected_files(store)
    tomb = run(lambda: store.delete("g", v(1)))
    assert run(lambda: store.delete("g", v(1))) == tomb


def test_concurrent_puts_of_one_name_keep_the_highest(root: Path) -> None:
    store = ObjectStore(root)

    async def main() -> None:
        async def one(clock: int) -> None:
            with contextlib.suppress(StaleVersion):  # a lower concurrent put may lose
                await put_bytes(store, "f", v(clock), bytes([clock]) * (100 * KiB))

        async with trio.open_nursery() as nursery:
            for clock in range(1, 9):
                nursery.start_soon(one, clock)

    run(main)
    obj = store.get("f")
    assert obj is not None and obj.version == v(8)
    assert run(lambda: read_all(store, obj)) == bytes([8]) * (100 * KiB)
    assert tmp_entries(root) == [] and object_files(root) == expected_files(store)


def test_bad_arguments_raise_value_error(root: Path) -> None:
    store = ObjectStore(root)
    with pytest.raises(ValueError, match="writer"):
        run(lambda: put_bytes(store, "f", Version(1, b"short"), b""))
    with pytest.raises(ValueError, match="clock"):
        run(lambda: put_bytes(store, "f", Version(-1, WRITER), b""))
    with pytest.raises(TypeError, match="name is a str"):
        run(lambda: put_bytes(store, b"bytes", v(1), b""))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="32-byte"):
        run(lambda: put_bytes(store, "f", v(1), b"", expected_checksum=b"x"))

    async def not_bytes() -> AsyncIterator[Any]:
        yield "text"

    with pytest.raises(TypeError, match="bytes"):
        run(lambda: store.put("f", v(1), 0o644, 0, not_bytes()))
    assert store.objects() == [] and tmp_entries(root) == []


# --- failed writes leave nothing ----------------------------------------------------------------


@pytest.mark.parametrize("case", ["checksum", "short", "long"])
def test_checksum_mismatch_leaves_nothing(root: Path, case: str) -> None:
    store = ObjectStore(root)
    held = run(lambda: put_bytes(store, "f", v(1), b"held"))
    data = b"x" * (3 * MiB)
    cases: dict[str, dict[str, Any]] = {
        "checksum": {"expected_checksum": sha(b"something else")},
        "short": {"expected_size": len(data) + 1},
        "long": {"expected_size": 10},
    }
    kwargs = cases[case]
    chunks = Chunks(data)
    with pytest.raises(ChecksumMismatch):
        run(lambda: store.put("f", v(2), 0o644, 0, chunks, **kwargs))
    if case == "long":  # cut off as soon as the sender exceeds what it announced
        assert chunks.consumed == 64 * KiB
    assert store.get("f") == held
    assert tmp_entries(root) == [] and object_files(root) == expected_files(store)
    assert run(lambda: read_all(store, held)) == b"held"


class LateChecksum:
    """A digest known only after the body (``peers.LateDigest``): records when it is called."""

    def __init__(self, chunks: Chunks, result: bytes | BaseException) -> None:
        self.chunks = chunks
        self.result = result
        self.calls: list[int] = []  # bytes of the body consumed at each call

    def __call__(self) -> bytes:
        self.calls.append(self.chunks.consumed)
        if isinstance(self.result, BaseException):
            raise self.result
        return self.result


@pytest.mark.parametrize("data", [b"", b"late", os.urandom(3 * MiB + 5)])
def test_a_late_checksum_is_asked_after_the_body_and_commits(root: Path, data: bytes) -> None:
    store = ObjectStore(root)
    chunks = Chunks(data)
    late = LateChecksum(chunks, sha(data))
    obj = run(lambda: store.put("f", v(1), 0o600, 7, chunks, expected_checksum=late,
                                expected_size=len(data)))
    assert late.calls == [len(data)]  # once, after the whole body
    assert obj.checksum == sha(data) and obj.size == len(data) and obj.mode == 0o600
    assert store.get("f") == obj
    assert run(lambda: read_all(store, obj)) == data
    assert tmp_entries(root) == [] and object_files(root) == expected_files(store)
    reopened = ObjectStore(root)  # committed: it survives a restart
    assert reopened.get("f") == obj


def test_a_wrong_late_checksum_stores_nothing(root: Path) -> None:
    store = ObjectStore(root)
    held = run(lambda: put_bytes(store, "f", v(1), b"held"))
    data = os.urandom(2 * MiB)
    chunks = Chunks(data)
    late = LateChecksum(chunks, sha(b"something else"))
    with pytest.raises(ChecksumMismatch, match="the data was discarded"):
        run(lambda: store.put("f", v(2), 0o644, 0, chunks, expected_checksum=late,
                              expected_size=len(data)))
    assert late.calls == [len(data)]
    assert store.get("f") == held
    assert tmp_entries(root) == [] and object_files(root) == expected_files(store)
    assert run(lambda: read_all(store, held)) == b"held"
    with pytest.raises(ChecksumMismatch):  # a new name: nothing at all is left
        run(lambda: store.put("g", v(1), 0o644, 0, Chunks(data),
                              expected_checksum=lambda: sha(b"nope")))
    assert store.get("g") is None and tmp_entries(root) == []
    assert object_files(root) == expected_files(store)


class TrailerRefused(Exception):
    pass


@pytest.mark.parametrize("error", [TrailerRefused("bad trailer mac"), ValueError("odd"),
                                   ChecksumMismatch("from the caller")])
def test_an_error_of_a_late_checksum_propagates_and_stores_nothing(
        root: Path, error: Exception) -> None:
    store = ObjectStore(root)
    data = os.urandom(MiB + 1)
    chunks = Chunks(data)
    late = LateChecksum(chunks, error)
    with pytest.raises(type(error), match=str(error)) as info:
        run(lambda: store.put("f", v(1), 0o644, 0, chunks, expected_checksum=late,
                              expected_size=len(data)))
    assert info.value is error  # unchanged, not wrapped in a StoreError
    assert late.calls == [len(data)]
    assert store.get("f") is None and store.objects() == []
    assert tmp_entries(root) == [] and object_files(root) == set()


def test_a_late_checksum_is_not_asked_when_the_body_is_short_or_broken(root: Path) -> None:
    """A body that ends short of its size (its trailer never came) or fails is refused
    before the checksum is asked: a missing trailer cannot be mistaken for a bad one."""
    store = ObjectStore(root)
    data = b"y" * MiB
    chunks = Chunks(data)
    late = LateChecksum(chunks, TrailerRefused("must not be called"))
    with pytest.raises(ChecksumMismatch, match="announced"):
        run(lambda: store.put("f", v(1), 0o644, 0, chunks, expected_checksum=late,
                              expected_size=len(data) + 1))

    async def broken() -> AsyncIterator[bytes]:
        yield b"a" * KiB
        raise ConnectionError("peer went away")

    with pytest.raises(ConnectionError, match="went away"):
        run(lambda: store.put("f", v(1), 0o644, 0, broken(), expected_checksum=late))
    assert late.calls == []
    assert store.get("f") is None and tmp_entries(root) == [] and object_files(root) == set()


def test_the_held_version_is_returned_without_reading_or_asking_a_late_checksum(
        root: Path) -> None:
    store = ObjectStore(root)
    held = run(lambda: put_bytes(store, "f", v(3), b"held"))
    chunks = Chunks(b"held")
    late = LateChecksum(chunks, sha(b"held"))
    assert run(lambda: store.put("f", v(3), 0o644, 0, chunks, expected_checksum=late)) == held
    assert chunks.consumed == 0 and late.calls == []
    with pytest.raises(StaleVersion):
        run(lambda: store.put("f", v(2), 0o644, 0, chunks, expected_checksum=late))
    assert chunks.consumed == 0 and late.calls == []


def test_failing_or_cancelled_stream_leaves_nothing(root: Path) -> None:
    store = ObjectStore(root)

    async def broken() -> AsyncIterator[bytes]:
        yield b"a" * (2 * MiB)
        raise ConnectionError("peer went away")

    with pytest.raises(ConnectionError, match="peer went away"):
        run(lambda: store.put("f", v(1), 0o644, 0, broken()))
    assert store.get("f") is None and tmp_entries(root) == []

    async def endless() -> AsyncIterator[bytes]:
        while True:
            yield b"z" * (256 * KiB)
            await trio.sleep(0.001)

    async def cancelled() -> bool:
        with trio.move_on_after(0.3) as scope:
            await store.put("f", v(1), 0o644, 0, endless())
        return scope.cancelled_caught

    assert run(cancelled)
    assert store.get("f") is None and tmp_entries(root) == [] and object_files(root) == set()


@pytest.mark.parametrize("failing_fsync", [1, 2, 3])
@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EDQUOT])
def test_full_disk_at_each_fsync(root: Path, monkeypatch: pytest.MonkeyPatch,
                                 failing_fsync: int, err: int) -> None:
    """ENOSPC/EDQUOT at the content fsync (1), the metadata fsync (2) or the directory fsync
    (3, after the metadata was renamed into place): StoreFull, and everything is rolled back."""
    store = ObjectStore(root)
    held = run(lambda: put_bytes(store, "f", v(1), b"old"))
    real_fsync = os.fsync
    calls = 0

    def fsync(fd: int) -> None:
        nonlocal calls
        calls += 1
        if calls == failing_fsync:
            raise OSError(err, os.strerror(err))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(StoreFull, match="is full") as info:
        run(lambda: put_bytes(store, "f", v(2), b"new content"))
    assert "'f'" in str(info.value) and "untouched" in str(info.value)
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert store.get("f") == held and tmp_entries(root) == []
    assert object_files(root) == expected_files(store)
    assert ObjectStore(root).get("f") == held
    assert run(lambda: put_bytes(store, "f", v(2), b"new content")).size == 11


def test_other_io_errors_are_store_errors(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = ObjectStore(root)

    def fsync(fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(StoreError, match="Input/output error") as info:
        run(lambda: put_bytes(store, "f", v(1), b"x"))
    assert not isinstance(info.value, StoreFull)
    monkeypatch.undo()
    assert store.get("f") is None and tmp_entries(root) == []


# --- tombstones and drop -----------------------------------------------------------------------


def test_tombstone(root: Path) -> None:
    store = ObjectStore(root)
    live = run(lambda: put_bytes(store, "f", v(1), b"content"))
    run(lambda: put_bytes(store, "other", v(1), b"o"))
    tomb = run(lambda: store.delete("f", v(2), mtime_ns=77))
    assert tomb.tombstone and tomb.path is None and tomb.size == 0 and tomb.mtime_ns == 77
    assert store.get("f") == tomb
    assert store.names() == ["other"]
    assert [o.name for o in store.objects()] == ["f", "other"]
    assert store.usage()[:2] == (1, 1)
    assert live.path is not None and not live.path.exists()
    with pytest.raises(StoreError, match="deleted"):
        store.open_content(tomb)
    with pytest.raises(StaleVersion):  # a stale put cannot resurrect the name
        run(lambda: put_bytes(store, "f", v(1, b"\xff" * 20), b"zombie"))
    assert object_files(root) == expected_files(store)

    reopened = ObjectStore(root)
    assert reopened.get("f") == tomb and reopened.names() == ["other"]
    revived = run(lambda: put_bytes(reopened, "f", v(3), b"back"))
    assert reopened.names() == ["f", "other"] and reopened.get("f") == revived
    assert object_files(root) == expected_files(reopened)


def test_drop_forgets_a_name(root: Path) -> None:
    store = ObjectStore(root)
    run(lambda: store.delete("gone", v(5)))
    run(lambda: store.drop("gone", version=v(4)))  # not the held version: kept
    assert store.get("gone") is not None
    run(lambda: store.drop("gone", version=v(5)))
    assert store.get("gone") is None
    live = run(lambda: put_bytes(store, "live", v(1), b"data"))
    run(lambda: store.drop("live"))
    run(lambda: store.drop("never-existed"))
    assert store.objects() == [] and object_files(root) == set() and store.usage()[:2] == (0, 0)
    assert live.path is not None and not live.path.exists()
    assert run(lambda: put_bytes(store, "gone", v(1), b"older is fine now")).version == v(1)
    assert ObjectStore(root).names() == ["gone"]


def test_read_chunks_detects_damage_on_disk(root: Path) -> None:
    store = ObjectStore(root)
    data = bytes(range(256)) * 4096  # 1 MiB
    obj = run(lambda: put_bytes(store, "f", v(1), data))
    assert obj.path is not None
    with open(obj.path, "r+b") as f:
        f.seek(1000)
        f.write(b"\xff")
    with pytest.raises(ChecksumMismatch, match="corrupt"):
        run(lambda: read_all(store, obj))
    assert run(lambda: _read_unverified(store, obj)) != data
    os.truncate(obj.path, 100)
    with pytest.raises(ChecksumMismatch, match="truncated"):
        run(lambda: read_all(store, obj))


def test_read_chunks_from_an_offset(root: Path) -> None:
    store = ObjectStore(root)
    data = random.Random(5).randbytes(3 * MiB + 5)
    obj = run(lambda: put_bytes(store, "f", v(1), data))

    async def read_from(offset: int) -> bytes:
        return b"".join([c async for c in store.read_chunks(obj, MiB, offset=offset)])

    for offset in (0, 1, MiB, 3 * MiB + 4, 3 * MiB + 5):
        assert run(functools.partial(read_from, offset)) == data[offset:]
    with pytest.raises(ValueError, match="offset"):
        run(functools.partial(read_from, 3 * MiB + 6))


def test_read_range_reads_a_part_of_a_file_or_a_logged_object(root: Path) -> None:
    store = ObjectStore(root)
    data = random.Random(6).randbytes(3 * MiB + 5)
    big = run(lambda: put_bytes(store, "c/big", v(1), data))
    small = run(lambda: put_bytes(store, "d/0000000000000002", v(1), data[:1000],
                                  expected_size=1000))
    assert big.log is None and small.log is not None
    for obj, whole in ((big, data), (small, data[:1000])):
        for offset, length in ((0, 0), (0, 10), (7, 500), (len(whole) - 3, 3)):
            part = run(functools.partial(store.read_range, obj, offset, length))
            assert part == whole[offset:offset + length]
        with pytest.raises(ValueError, match="outside"):
            run(functools.partial(store.read_range, obj, len(whole) - 3, 4))
    for obj, whole in ((big, data), (small, data[:1000])):  # with the part's own digest
        right = digest_of(whole[5:105])
        assert run(functools.partial(store.read_range, obj, 5, 100, right)) == whole[5:105]
        with pytest.raises(ChecksumMismatch, match="do not match"):
            run(functools.partial(store.read_range, obj, 6, 100, right))
    os.truncate(big.path, MiB)  # type: ignore[arg-type]
    with pytest.raises(ChecksumMismatch, match="truncated"):
        run(functools.partial(store.read_range, big, 2 * MiB, 10))


async def _read_unverified(store: ObjectStore, obj: StoredObject) -> bytes:
    return b"".join([c async for c in store.read_chunks(obj, 4096, verify=False)])


def test_async_methods_do_no_file_io_in_the_trio_thread(
        root: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    store = ObjectStore(root)
    source = tmp_path / "src"
    source.write_bytes(b"s" * (3 * MiB))
    offenders: list[str] = []
    trio_thread = threading.get_ident()
    for fn_name in ("open", "write", "read", "fsync", "replace", "rename", "unlink", "stat"):
        real = getattr(os, fn_name)

        def spy(*args: Any, _real: Any = real, _name: str = fn_name, **kw: Any) -> Any:
            if threading.get_ident() == trio_thread:
                offenders.append(_name)
            return _real(*args, **kw)

        monkeypatch.setattr(os, fn_name, spy)
    real_open_read = store_mod.open_read

    def open_read(path: Path) -> Any:
        if threading.get_ident() == trio_thread:
            offenders.append("open")
        return real_open_read(path)

    monkeypatch.setattr(store_mod, "open_read", open_read)
    monkeypatch.setattr("daemon.store_reads.open_read", open_read)

    async def main() -> None:
        obj = await put_bytes(store, "f", v(1), b"d" * (3 * MiB))
        await read_all(store, obj)
        await store.put_file("g", v(1), 0o644, 0, source)
        await put_bytes(store, "f", v(2), b"e" * 10)
        await store.delete("f", v(3))
        await store.drop("f")
        with pytest.raises(ChecksumMismatch):
            await put_bytes(store, "h", v(1), b"x" * (2 * MiB), expected_size=5)

    run(main)
    assert offenders == []


# --- recovery ----------------------------------------------------------------------------------


def _two_committed_versions(root: Path) -> tuple[StoredObject, StoredObject]:
    """What a crash between commit step 4 and 5 leaves: v1 and v2 both committed."""
    store = ObjectStore(root)
    old = run(lambda: put_bytes(store, "f", v(1), b"version one"))
    saved = [(p, p.read_bytes()) for p in store.files_for("f", v(1))]
    new = run(lambda: put_bytes(store, "f", v(2), b"version two!"))
    for path, content in saved:
        path.write_bytes(content)
    return old, new


def test_recovery_keeps_newest_of_two_committed_versions(root: Path) -> None:
    _old, new = _two_committed_versions(root)
    assert len(object_files(root)) == 4
    store = ObjectStore(root)
    assert store.get("f") == new and store.usage()[:2] == (1, len(b"version two!"))
    assert object_files(root) == expected_files(store)
    assert run(lambda: read_all(store, new)) == b"version two!"


@pytest.mark.parametrize("damage", ["missing", "short", "long"])
def test_recovery_drops_metadata_whose_content_is_missing_or_wrong_size(
        root: Path, damage: str) -> None:
    old, new = _two_committed_versions(root)
    assert new.path is not None
    if damage == "missing":
        new.path.unlink()
    elif damage == "short":
        os.truncate(new.path, 3)
    else:
        with open(new.path, "ab") as f:
            f.write(b"extra")
    store = ObjectStore(root)
    assert store.get("f") == old
    assert run(lambda: read_all(store, old)) == b"version one"
    assert object_files(root) == expected_files(store)


def test_recovery_deletes_content_without_metadata(root: Path) -> None:
    """A crash between commit steps 2 and 3: the new content is in place, no metadata yet."""
    store = ObjectStore(root)
    held = run(lambda: put_bytes(store, "f", v(1), b"held"))
    orphan, _ = store.files_for("f", v(2))
    orphan.write_bytes(b"half-committed")
    lone, _ = store.files_for("never committed", v(1))
    lone.parent.mkdir(exist_ok=True)
    lone.write_bytes(b"x")
    store = ObjectStore(root)
    assert store.objects() == [held]
    assert not orphan.exists() and not lone.exists()
    assert object_files(root) == expected_files(store)


def test_recovery_empties_tmp(root: Path) -> None:
    """A crash while streaming (step 1) or writing metadata leaves files in tmp/ only."""
    store = ObjectStore(root)
    held = run(lambda: put_bytes(store, "f", v(1), b"held"))
    (root / "tmp" / "abc.part").write_bytes(b"partial content")
    (root / "tmp" / "def.meta").write_bytes(b'{"format": 1, "na')
    (root / "tmp" / "subdir").mkdir()
    (root / "tmp" / "subdir" / "x").write_bytes(b"x")
    store = ObjectStore(root)
    assert tmp_entries(root) == [] and store.objects() == [held]


def test_recovery_drops_corrupt_metadata_and_ignores_foreign_files(root: Path) -> None:
    store = ObjectStore(root)
    old, new = _two_committed_versions(root)
    _, new_meta = store.files_for("f", new.version)
    new_meta.write_bytes(b"{not json")
    run(lambda: put_bytes(store, "g", v(1), b"g"))
    _, other_meta = store.files_for("g", v(1))
    other_meta.write_bytes(other_meta.read_bytes().replace(b'"name":"g"', b'"name":"h"'))
    foreign = root / "objects" / "README"
    foreign.write_text("not ours")
    store = ObjectStore(root)
    assert store.objects() == [old]  # g's metadata names another object: not a valid commit
    assert foreign.exists()
    assert object_files(root) == expected_files(store) | {foreign}


def test_recovery_tombstone_over_older_content(root: Path) -> None:
    store = ObjectStore(root)
    run(lambda: put_bytes(store, "f", v(1), b"content"))
    saved = [(p, p.read_bytes()) for p in store.files_for("f", v(1))]
    tomb = run(lambda: store.delete("f", v(2)))
    for path, content in saved:
        path.write_bytes(content)
    store = ObjectStore(root)
    assert store.get("f") == tomb and store.names() == []
    assert object_files(root) == expected_files(store)


def _as_format_1(store: ObjectStore, obj: StoredObject, sha256: bytes) -> None:
    """Rewrite ``obj``'s record as stores wrote it before the content digest: format 1, with
    the content's SHA-256 as checksum."""
    meta = store.files_for(obj.name, obj.version)[1]
    doc = json.loads(meta.read_bytes())
    doc.update(format=1, checksum=sha256.hex())
    meta.write_bytes(json.dumps(doc).encode())


def test_recovery_converts_a_sha256_store_and_drops_what_no_longer_matches(
        root: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = ObjectStore(root)
    content = random.Random(5).randbytes(3 * MiB + 7)
    kept = run(lambda: put_bytes(store, "kept", v(1), content))
    damaged = run(lambda: put_bytes(store, "damaged", v(1), b"will rot"))
    run(lambda: put_bytes(store, "gone", v(1), b"deleted later"))
    gone = run(lambda: store.delete("gone", v(2)))
    _as_format_1(store, kept, hashlib.sha256(content).digest())
    _as_format_1(store, damaged, hashlib.sha256(b"will rot").digest())
    _as_format_1(store, gone, hashlib.sha256().digest())
    assert damaged.path is not None
    damaged.path.write_bytes(b"will ROT")  # same size, other bytes: only a hash can tell

    with caplog.at_level(logging.INFO, logger="kelipsfs.store"):
        converted = ObjectStore(root)
    assert "converting SHA-256 records to the content digest (blake3)" in caplog.text
    assert "2 records converted" in caplog.text  # kept and gone; damaged was dropped
    assert "'damaged' no longer matches the SHA-256" in caplog.text
    assert converted.get("kept") == kept and kept.checksum == digest_of(content)
    assert run(lambda: read_all(converted, kept)) == content  # read_all verifies the digest
    assert converted.get("gone") == gone and gone.checksum == EMPTY_DIGEST
    assert converted.get("damaged") is None
    assert object_files(root) == expected_files(converted)
    for obj in converted.objects():
        doc = json.loads(converted.files_for(obj.name, obj.version)[1].read_bytes())
        assert doc["format"] == 2 and doc["checksum"] == obj.checksum.hex()
    again = ObjectStore(root)  # format 2 is read as it is
    assert sorted(again.objects(), key=lambda o: o.name) == [gone, kept]


def test_a_record_the_conversion_cannot_rewrite_is_kept_and_converted_next_time(
        root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = ObjectStore(root)
    kept = run(lambda: put_bytes(store, "kept", v(1), b"precious"))
    _as_format_1(store, kept, hashlib.sha256(b"precious").digest())

    def disk_full(*_args: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as patch:
        patch.setattr(store_recovery, "write_meta", disk_full)
        assert ObjectStore(root).get("kept") == kept  # served, still format 1 on disk
    meta = store.files_for("kept", v(1))[1]
    assert json.loads(meta.read_bytes())["format"] == 1
    assert ObjectStore(root).get("kept") == kept
    assert json.loads(meta.read_bytes())["format"] == 2


# --- kill -9 in the middle of a put loop -----------------------------------------------------

CHILD = r"""
import random, sys
from pathlib import Path
import trio
from daemon.core.messages import Version
from daemon.digest import digest_of
from daemon.store import ObjectStore

root, run_no = Path(sys.argv[1]), int(sys.argv[2])
store = ObjectStore(root)
writer = bytes(20)

async def main():
    rng = random.Random(run_no)
    print("ready", flush=True)
    i = 0
    while True:
        i += 1
        name = f"dir/obj-{rng.randrange(12)}"
        clock = run_no * 1_000_000 + i
        if rng.random() < 0.1:
            await store.delete(name, Version(clock, writer))
            print(f"del {name} {clock} -", flush=True)
            continue
        data = rng.randbytes(rng.choice([0, 1, 1000, 65536, 300_000, 2_500_000]))
        async def chunks():
            for off in range(0, len(data), 65536):
                yield data[off:off + 65536]
        digest = digest_of(data)
        await store.put(name, Version(clock, writer), 0o644, i, chunks(), digest, len(data))
        print(f"put {name} {clock} {digest.hex()}", flush=True)

trio.run(main)
"""


def _kill_after(proc: subprocess.Popen[str], lines: int, delay: float) -> list[str]:
    """Read until ``lines`` puts were reported, wait ``delay``, SIGKILL; all complete lines."""
    assert proc.stdout is not None
    out: list[str] = []
    while True:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"child exited early: rc={proc.wait()}")
        if line == "ready\n":
            continue
        out.append(line)
        if len(out) >= lines:
            break
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    rest = proc.stdout.read()
    proc.wait(timeout=10)
    out.extend(line + "\n" for line in rest.split("\n")[:-1])  # a cut last line is not a report
    return out


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_sigkill_in_the_middle_of_puts(root: Path) -> None:
    rng = random.Random(2024)
    reported: dict[str, tuple[int, str]] = {}  # name -> (clock, digest hex or "-" for a tombstone)
    for run_no in range(1, 6):
        proc = subprocess.Popen([sys.executable, "-c", CHILD, str(root), str(run_no)],
                                cwd=REPO, stdout=subprocess.PIPE, text=True,
                                env={**os.environ, "PYTHONPATH": str(REPO)})
        try:
            lines = _kill_after(proc, rng.randint(3, 25), rng.uniform(0, 0.05))
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        assert proc.returncode == -signal.SIGKILL
        for line in lines:
            _kind, name, clock_text, digest = line.split()
            reported[name] = (int(clock_text), digest)

        store = ObjectStore(root)
        assert tmp_entries(root) == []
        assert object_files(root) == expected_files(store), "half-written files visible"
        for name, (clock, digest) in reported.items():
            obj = store.get(name)
            assert obj is not None, f"{name} was reported stored and is gone"
            assert obj.version.clock >= clock, f"{name} went back in time"
            if obj.version.clock == clock:
                assert obj.tombstone == (digest == "-")
                if not obj.tombstone:
                    assert obj.checksum.hex() == digest
        for obj in store.objects():
            if not obj.tombstone:
                assert obj.path is not None and obj.path.stat().st_size == obj.size
                assert file_sha(obj.path) == obj.checksum, f"{obj.name} content damaged"
    assert len(reported) > 3


# --- a real full filesystem --------------------------------------------------------------------


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A fresh 2 MiB tmpfs, always unmounted afterwards (needs root; fails, never skips)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)],
                          capture_output=True, text=True, timeout=30, check=False)
    if done.returncode != 0:
        pytest.fail(f"cannot mount a 2 MiB tmpfs on {mnt} (this test needs root): "
                    f"{(done.stderr or done.stdout).strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30, check=False)


@pytest.mark.timeout(60)
def test_disk_full_on_a_real_small_filesystem(small_fs: Path) -> None:
    root = small_fs / "store"
    store = ObjectStore(root)
    keep_data = random.Random(1).randbytes(512 * KiB)
    keep = run(lambda: put_bytes(store, "keep", v(1), keep_data))

    # a new object larger than the filesystem, streamed without announcing its size
    with pytest.raises(StoreFull, match="is full") as info:
        run(lambda: put_bytes(store, "big", v(1), b"b" * (3 * MiB)))
    assert "'big'" in str(info.value)
    assert store.get("big") is None and tmp_entries(root) == []

    # an overwrite that does not fit leaves the old version untouched and readable
    with pytest.raises(StoreFull):
        run(lambda: put_bytes(store, "keep", v(2), b"k" * (1800 * KiB)))
    assert store.get("keep") == keep and tmp_entries(root) == []
    assert run(lambda: read_all(store, keep)) == keep_data

    # an announced size that cannot fit is refused before a byte is read
    chunks = Chunks(b"c" * (4 * MiB))
    with pytest.raises(StoreFull, match="needs"):
        run(lambda: store.put("huge", v(1), 0o644, 0, chunks, expected_size=4 * MiB))
    assert chunks.consumed == 0

    # fill the filesystem to the last byte: even the small metadata file cannot be written
    filler = small_fs / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        with pytest.raises(OSError) as full:
            while True:
                os.write(fd, b"\0" * 4096)
        assert full.value.errno == errno.ENOSPC
    finally:
        os.close(fd)
    with pytest.raises(StoreFull):
        run(lambda: store.delete("keep", v(3)))
    with pytest.raises(StoreFull):
        run(lambda: put_bytes(store, "empty", v(1), b""))
    assert store.objects() == [keep] and tmp_entries(root) == []
    assert object_files(root) == expected_files(store)
    filler.unlink()

    # with space back, everything works again
    assert store.usage()[2] > MiB
    run(lambda: put_bytes(store, "big", v(1), b"b" * MiB))
    reopened = ObjectStore(root)
    assert reopened.names() == ["big", "keep"]
    assert run(lambda: read_all(reopened, keep)) == keep_data
    shutil.rmtree(root)
