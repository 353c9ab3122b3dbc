"""The store's record log: what is appended is read back after a restart, a torn tail is cut
off, superseded frames are compacted away, and the store serves logged records like files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio
import trio.testing

from daemon import record_log, store_files
from daemon.core.messages import Version
from daemon.digest import digest_of
from daemon.peers import stream_of
from daemon.record_log import Frame, RecordLog
from daemon.store import ObjectStore
from daemon.store_log import LOG_CONTENT_MAX

W = b"\x05" * 20


def frame(name: str, clock: int, content: bytes, tombstone: bool = False) -> Frame:
    return Frame(name, clock, W, len(content), 0o644, 7, tombstone, digest_of(content),
                 b"\x01\x02")


def test_appended_frames_replay_in_order(tmp_path: Path) -> None:
    log = RecordLog(tmp_path / "r.log")
    list(log.replay())
    refs = [log.append(frame(f"i/{i:016x}", i, b"x" * i), b"x" * i)[0] for i in range(50)]
    assert [log.read(r) for r in refs] == [b"x" * i for i in range(50)]
    log.close()
    again = RecordLog(tmp_path / "r.log")
    seen = list(again.replay())
    assert [f.name for f, _, _ in seen] == [f"i/{i:016x}" for i in range(50)]
    assert [again.read(ref) for _, ref, _ in seen] == [b"x" * i for i in range(50)]
    assert seen[3][0] == frame("i/0000000000000003", 3, b"xxx")


@pytest.mark.parametrize("cut", [1, 5, 9, 40])
def test_a_torn_tail_is_cut_off(tmp_path: Path, cut: int) -> None:
    path = tmp_path / "r.log"
    log = RecordLog(path)
    list(log.replay())
    for i in range(3):
        log.append(frame(f"e/{i:016x}/n", i, b"abc"), b"abc")
    whole = log.size
    log.close()
    with open(path, "r+b") as fh:  # a crash in the middle of the fourth append
        fh.seek(whole)
        fh.write(b"\x00\x00\x00\x30" + b"\xff" * (cut - 1))
    again = RecordLog(path)
    assert len(list(again.replay())) == 3
    assert path.stat().st_size == whole
    again.append(frame("e/0000000000000009/n", 9, b"d"), b"d")
    again.close()
    assert len(list(RecordLog(path).replay())) == 4


def test_the_file_is_allocated_ahead_and_its_zeros_end_the_log(tmp_path: Path) -> None:
    """Appends go into space allocated ahead (the file does not grow with each one); after
    a restart the allocated zeros read as the end, are cut off, and appends go on there."""
    path = tmp_path / "r.log"
    log = RecordLog(path)
    list(log.replay())
    log.append(frame("i/0000000000000001", 1, b"one"), b"one")
    allocated = path.stat().st_size
    assert allocated >= log.size + record_log.PREALLOCATE
    for i in range(2, 40):
        log.append(frame(f"i/{i:016x}", i, b"x" * 100), b"x" * 100)
    assert path.stat().st_size == allocated
    end = log.size
    trio.run(log.sync)
    log.close()
    again = RecordLog(path)
    assert [f.clock for f, _, _ in again.replay()] == list(range(1, 40))
    assert path.stat().st_size == end == again.size
    again.append(frame("i/0000000000000063", 99, b"z"), b"z")
    again.close()
    assert [f.clock for f, _, _ in RecordLog(path).replay()][-2:] == [39, 99]


def test_a_flipped_byte_ends_the_log_there(tmp_path: Path) -> None:
    path = tmp_path / "r.log"
    log = RecordLog(path)
    list(log.replay())
    sizes = [log.append(frame(f"i/{i:016x}", i, b"abcd"), b"abcd")[1] for i in range(4)]
    log.close()
    data = bytearray(path.read_bytes())
    data[sizes[0] + sizes[1] + 12] ^= 0x40  # inside the third frame
    path.write_bytes(bytes(data))
    assert [f.clock for f, _, _ in RecordLog(path).replay()] == [0, 1]


def test_the_store_logs_namespace_records_and_recovers_them(tmp_path: Path) -> None:
    async def fill() -> None:
        store = await trio.to_thread.run_sync(ObjectStore, tmp_path / "s")
        for i in range(200):
            data = f"record {i}".encode()
            await store.put(f"i/{i % 20:016x}", Version(1000 + i, W), 0o100644, i,
                            stream_of(data), expected_checksum=digest_of(data),
                            expected_size=len(data), attrs=b"a%d" % i)
        await store.delete("e/0000000000000001/gone", Version(5000, W), mtime_ns=3)
        await store.sync()
        # a small file's content is logged too; a larger one goes to a file of its own
        small = os.urandom(5000)
        await store.put("d/0000000000000003", Version(10, W), 0, 1, stream_of(small),
                        expected_checksum=digest_of(small), expected_size=len(small))
        logged = store.get("d/0000000000000003")
        assert logged is not None and logged.log is not None and logged.path is None
        big = os.urandom(LOG_CONTENT_MAX + 1)
        await store.put("d/0000000000000002", Version(10, W), 0, 1, stream_of(big),
                        expected_checksum=digest_of(big), expected_size=len(big))
        assert len(list((tmp_path / "s" / "objects").rglob("*.meta"))) == 1

    trio.run(fill)
    store = ObjectStore(tmp_path / "s")
    for j in range(20):
        obj = store.get(f"i/{j:016x}")
        assert obj is not None and obj.log is not None and obj.path is None
        i = 180 + j
        assert (obj.version.clock, obj.attrs) == (1000 + i, b"a%d" % i)
        assert store.read_small(obj, 1 << 20) == f"record {i}".encode()
    gone = store.get("e/0000000000000001/gone")
    assert gone is not None and gone.tombstone
    assert store.usage()[0] == 2  # the files' contents; records are not objects
    small = store.get("d/0000000000000003")
    assert small is not None and small.log is not None and store.read_small(small, 5000)


def test_compaction_keeps_the_live_records(tmp_path: Path) -> None:
    import daemon.store as store_module

    async def churn() -> None:
        store = await trio.to_thread.run_sync(ObjectStore, tmp_path / "s")
        payload = b"p" * 3000
        for i in range(400):
            await store.put(f"x/{i % 5:016x}", Version(1 + i, W), 0, 0, stream_of(payload),
                            expected_checksum=digest_of(payload), expected_size=len(payload))
        before = (tmp_path / "s" / "records.log").stat().st_size
        original = store_module.COMPACT_MIN
        store_module.COMPACT_MIN = 10_000
        try:
            await store.maintain()
        finally:
            store_module.COMPACT_MIN = original
        after = (tmp_path / "s" / "records.log").stat().st_size
        assert after < before / 20
        for k in range(5):
            obj = store.get(f"x/{k:016x}")
            assert obj is not None and store.read_small(obj, 1 << 20) == payload
        # and appends after the compaction land in the new file
        await store.put("x/0000000000000009", Version(999, W), 0, 0, stream_of(b"late"),
                        expected_checksum=digest_of(b"late"), expected_size=4)

    trio.run(churn)
    store = ObjectStore(tmp_path / "s")
    late = store.get("x/0000000000000009")
    assert late is not None and store.read_small(late, 100) == b"late"
    assert store.get("x/0000000000000004") is not None


def test_a_compaction_never_pulls_the_log_from_under_a_reader(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Objects taken before a compaction still read their bytes after it (never another
    record's, never a closed descriptor); a name given a version kept as files while the
    compaction ran keeps that version; what is appended after it is durable there."""
    import daemon.store as store_module

    big = b"B" * (LOG_CONTENT_MAX + 1)
    replaced = "d/0000000000000003"

    async def main() -> None:
        store = await trio.to_thread.run_sync(ObjectStore, tmp_path / "s")
        payloads = {f"x/{k:016x}": bytes([65 + k]) * (1000 + k) for k in range(5)}
        payloads[replaced] = b"small content"
        for i in range(300):
            for name, data in payloads.items():
                await store.put(name, Version(1 + i, W), 0, 0, stream_of(data),
                                expected_checksum=digest_of(data), expected_size=len(data))
        taken = {name: store.get(name) for name in payloads}
        original_in_thread = store_files.in_thread

        async def during_compaction(fn):  # type: ignore[no-untyped-def]
            if getattr(fn, "func", None) == store._log.compact:
                await store.put(replaced, Version(10_000, W), 0, 0, stream_of(big),
                                expected_checksum=digest_of(big), expected_size=len(big))
            return await original_in_thread(fn)

        monkeypatch.setattr("daemon.store.in_thread", during_compaction)
        monkeypatch.setattr(store_module, "COMPACT_MIN", 10_000)
        await store.maintain()
        monkeypatch.setattr("daemon.store.in_thread", original_in_thread)
        assert store._log.generation == 1
        for name, data in payloads.items():
            obj = taken[name]
            assert obj is not None and obj.log is not None and obj.log.generation == 0
            if name == replaced:
                assert store.read_small(obj, 1 << 20) is None  # that version is gone
                continue
            assert store.read_small(obj, 1 << 20) == data
            assert b"".join([c async for c in store.read_chunks(obj, verify=False)]) == data
        now = store.get(replaced)
        assert now is not None and now.log is None and now.size == len(big)
        await store.put("x/0000000000000009", Version(20_000, W), 0, 0, stream_of(b"late"),
                        expected_checksum=digest_of(b"late"), expected_size=4)
        await store.sync()

    trio.run(main)
    again = ObjectStore(tmp_path / "s")
    late = again.get("x/0000000000000009")
    assert late is not None and again.read_small(late, 100) == b"late"
    kept = again.get(replaced)
    assert kept is not None and kept.size == len(big)


def test_a_sync_in_a_worker_thread_outlives_the_file_a_compaction_replaced(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A compaction adopted while an fdatasync of the old file runs in a worker thread
    closes that file only once the sync is done, and the sync's caller returns with its
    records durable (in the compacted file)."""
    import threading

    path = tmp_path / "r.log"
    log = RecordLog(path)
    list(log.replay())
    log.append(frame("i/0000000000000001", 1, b"one"), b"one")
    release = threading.Event()
    real_fdatasync = os.fdatasync

    def held_fdatasync(fd: int) -> None:
        release.wait(10)
        real_fdatasync(fd)

    async def main() -> None:
        log._quick = False  # the next sync goes to a worker thread
        monkeypatch.setattr(os, "fdatasync", held_fdatasync)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(log.sync)
            await trio.testing.wait_all_tasks_blocked()
            old = log._fd
            log.adopt(log.compact([(frame("i/0000000000000001", 1, b"one"), b"one")]))
            os.fstat(old)  # still open: the sync in the thread uses it
            release.set()
        with pytest.raises(OSError):
            os.fstat(old)
        assert not log.dirty and log.generation == 1
        monkeypatch.setattr(os, "fdatasync", real_fdatasync)
        log.append(frame("i/0000000000000002", 2, b"two"), b"two")
        await log.sync()
        assert not log.dirty

    trio.run(main)
    log.close()
    assert [f.clock for f, _, _ in RecordLog(path).replay()] == [1, 2]
