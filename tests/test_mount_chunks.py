"""Files stored in chunks, on real mounts: a small write uploads a small part, holes cost
nothing, chunks no manifest names are reclaimed, and other mounts and `kelipsfs get` read
chunked files whole."""

from __future__ import annotations

import errno
import os
import random
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.core.manifest import CHUNK_SIZE, RUN_CHUNKS
from tests.test_mount import (  # noqa: F401
    MiB,
    Mount,
    Mounts,
    _alive_members,
    pytestmark,
    run_cli,
    wait_for,
)

#: Settings of the mounts here: chunks a write replaced go quickly.
QUICK_RECLAIM = "chunk_retire_grace=1"


def metric(mount: Mount, name: str) -> float:
    """The sum of a counter over its labels, from the node's /metrics."""
    with urllib.request.urlopen(f"http://{mount.address}/metrics", timeout=10) as response:
        text = response.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and not line.startswith("#"))


def stored_chunks(*mounts: Mount) -> int:
    """Live chunk objects in the mounts' stores (what `du` of the data dirs counts)."""
    return sum(int(metric(mount, "kelips_stored_chunks")) for mount in mounts)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Mount, Mount]]:
    with Mounts(tmp_path_factory.mktemp("chunks"), base=150) as ms:
        first = ms.new(QUICK_RECLAIM)
        yield first, ms.new(QUICK_RECLAIM, join=first)


def test_chunks_written_front_to_back_go_up_before_the_close(
        pair: tuple[Mount, Mount]) -> None:
    """A writer's finished chunks are uploaded as one run while it writes on; one rewritten
    after its upload is uploaded again at the close (the run stays for the others), and a
    rewrite of the whole file reclaims every object the first one stored."""
    a, b = pair
    before = stored_chunks(a, b)  # (the first test of the module: nothing is being reclaimed)
    run = RUN_CHUNKS * CHUNK_SIZE
    data = bytearray(os.urandom(run + 2 * MiB))
    with open(a.path("behind.bin"), "wb") as fh:
        fh.write(data[:run + MiB])
        fh.flush()
        # the first run is finished: stored on both nodes before any close or fsync
        wait_for(lambda: stored_chunks(a, b) - before >= 2, 30, "the upload behind the writer")
        fh.seek(MiB + 10)
        fh.write(b"again")
        data[MiB + 10:MiB + 15] = b"again"
        fh.seek(run + MiB)
        fh.write(data[run + MiB:])
    assert b.path("behind.bin").read_bytes() == data
    # on both nodes: the run, chunk 1 again and the last two chunks as a run of their own
    time.sleep(3)  # (past the grace: nothing of these may go)
    assert stored_chunks(a, b) - before == 2 * 3
    assert b.path("behind.bin").read_bytes() == data
    fresh = os.urandom(len(data))
    with open(b.path("behind.bin"), "r+b") as fh:
        fh.write(fresh)
    assert a.path("behind.bin").read_bytes() == fresh
    wait_for(lambda: stored_chunks(a, b) - before == 2 * 2, 60, "the first write's objects "
             "to go", interval=0.5)
    a.path("behind.bin").unlink()


def test_a_small_write_sends_the_manifest_alone(pair: tuple[Mount, Mount]) -> None:
    """A 1-byte write and an fsync: the byte goes to the holders as a patch in the manifest,
    no chunk is uploaded, and every reader sees it."""
    a, b = pair
    data = bytearray(os.urandom(20 * MiB + 5))
    path = a.path("big.bin")
    path.write_bytes(data)
    assert b.path("big.bin").read_bytes() == data
    sent = metric(a, "kelips_content_bytes_sent_total")
    with open(path, "r+b") as fh:
        fh.seek(7 * MiB + 3)
        fh.write(b"!")
        fh.flush()
        os.fsync(fh.fileno())
        data[7 * MiB + 3] = ord("!")
        sent = metric(a, "kelips_content_bytes_sent_total") - sent
    # the manifest (21 entries, one patch), to each of the two holders (r = 3, 2 nodes)
    assert 0 < sent <= 2 * 4096
    assert path.read_bytes() == data
    assert b.path("big.bin").read_bytes() == data  # a new open on the other mount sees it
    _assert_got(b, "big.bin", data)


def _assert_got(node: Mount, name: str, data: bytes | bytearray) -> None:
    out = Path(str(node.data_dir) + "-got")
    run_cli("get", name, str(out), "--node", node.address)
    try:
        assert out.read_bytes() == data
    finally:
        out.unlink()


def test_many_small_writes_keep_the_manifest_bounded(pair: tuple[Mount, Mount]) -> None:
    """Scattered small writes, each fsynced: patches pile up until the manifest's bound,
    then the most patched chunks go up whole again; every state reads back whole."""
    a, b = pair
    rng = random.Random(5)
    data = bytearray(os.urandom(20 * MiB))
    path = a.path("pages.db")
    path.write_bytes(data)
    sent = metric(a, "kelips_content_bytes_sent_total")
    writes = 64
    with open(path, "r+b") as fh:
        for n in range(writes):
            offset = rng.randrange(len(data) - 8192)
            page = os.urandom(rng.choice((1, 4096, 8192)))
            os.pwrite(fh.fileno(), page, offset)
            data[offset:offset + len(page)] = page
            os.fsync(fh.fileno())
            if n % 16 == 15:
                assert b.path("pages.db").read_bytes() == data
    sent = metric(a, "kelips_content_bytes_sent_total") - sent
    # uploading every touched chunk whole would send writes x 1 MiB to each of two holders
    assert sent < writes * 2 * CHUNK_SIZE / 2, sent
    assert b.path("pages.db").read_bytes() == data
    _assert_got(b, "pages.db", data)
    path.unlink()


def test_appends_and_truncates_over_patches(pair: tuple[Mount, Mount]) -> None:
    """A log appended a line at a time grows into a chunk that is patches alone; a truncate
    into the patched part cuts them, and a later extension reads zeros there."""
    a, b = pair
    data = bytearray(os.urandom(2 * MiB - 1500))
    path = a.path("app.log")
    path.write_bytes(data)
    with open(path, "ab") as fh:
        for n in range(30):
            line = f"line {n} ".encode() * 10 + b"\n"
            fh.write(line)
            data += line
            fh.flush()
            os.fsync(fh.fileno())
    assert len(data) > 2 * MiB  # (into the third chunk)
    assert b.path("app.log").read_bytes() == data
    _assert_got(a, "app.log", data)
    cut = 2 * MiB - 700
    os.truncate(b.path("app.log"), cut)
    with open(b.path("app.log"), "r+b") as fh:
        fh.truncate(2 * MiB + 900)
        fh.seek(2 * MiB + 800)
        fh.write(b"tail")
    expected = data[:cut] + bytes(2 * MiB + 800 - cut) + b"tail" + bytes(96)
    assert a.path("app.log").read_bytes() == expected
    path.unlink()


def test_holes_are_not_stored(pair: tuple[Mount, Mount]) -> None:
    a, b = pair
    before = stored_chunks(a, b)
    path = a.path("sparse.img")
    with open(path, "wb") as fh:
        fh.truncate(10 * 1024 * MiB)
        fh.seek(5 * 1024 * MiB + 100)
        fh.write(b"x" * MiB)
    st = b.path("sparse.img").stat()
    assert st.st_size == 10 * 1024 * MiB
    assert st.st_blocks * 512 <= 2 * MiB  # what du shows: the written MiB, not 10 GiB
    assert stored_chunks(a, b) - before <= 2 * 2  # two chunks, on two nodes
    with open(b.path("sparse.img"), "rb") as fh:
        fh.seek(5 * 1024 * MiB)
        assert fh.read(200) == bytes(100) + b"x" * 100
        fh.seek(3 * 1024 * MiB)
        assert fh.read(1000) == bytes(1000)


def test_truncates_cut_and_extend(pair: tuple[Mount, Mount]) -> None:
    a, b = pair
    data = os.urandom(5 * MiB + 7)
    path = a.path("cut.bin")
    path.write_bytes(data)
    os.truncate(path, 2 * MiB + 11)
    assert b.path("cut.bin").read_bytes() == data[:2 * MiB + 11]
    os.truncate(b.path("cut.bin"), 4 * MiB)  # through the other mount: from its manifest
    assert path.read_bytes() == data[:2 * MiB + 11] + bytes(4 * MiB - 2 * MiB - 11)
    with open(path, "r+b") as fh:
        fh.truncate(MiB // 2)
        fh.truncate(3 * MiB)  # the cut part must come back as zeros, not as the old bytes
        fh.seek(2 * MiB)
        fh.write(b"end")
    assert b.path("cut.bin").read_bytes() == (data[:MiB // 2] + bytes(2 * MiB - MiB // 2)
                                              + b"end" + bytes(MiB - 3))


def test_an_open_file_survives_its_unlink(pair: tuple[Mount, Mount]) -> None:
    """A handle open when the last link went keeps reading: the mount fetches what it had
    not fetched before the chunks can be reclaimed."""
    a, _ = pair
    data = os.urandom(6 * MiB)
    a.path("held.bin").write_bytes(data)
    with open(a.path("held.bin"), "rb") as fh:
        assert fh.read(10) == data[:10]
        a.path("held.bin").unlink()
        wait_for(lambda: metric(a, "kelips_chunks_reclaimed_total") > 0, 60,
                 "the unlinked file's chunks to be reclaimed", interval=0.5)
        fh.seek(0)
        assert fh.read() == data


def test_chunks_no_manifest_names_are_reclaimed(pair: tuple[Mount, Mount]) -> None:
    a, b = pair
    path = a.path("gone.bin")
    path.write_bytes(os.urandom(8 * MiB))
    with open(path, "r+b") as fh:  # replaces chunk 3: the old one goes after the grace
        fh.seek(3 * MiB)
        fh.write(os.urandom(MiB))
    assert stored_chunks(a, b) > 0
    for name in ("gone.bin", "cut.bin", "sparse.img", "big.bin"):
        a.path(name).unlink(missing_ok=True)
    # every file of this module is gone: no chunk may remain
    wait_for(lambda: stored_chunks(a, b) == 0, 120, "the chunks to be reclaimed", interval=1)


def test_a_large_file_is_read_from_more_machines_than_its_copies(tmp_path: Path) -> None:
    """Five nodes, r = 3: the objects of one file are placed by their own names, so reading
    it through one node takes chunks from more than the three holders of any one object."""
    with Mounts(tmp_path, base=170) as ms:
        first = ms.new("replication=3")
        others = [ms.new("replication=3", join=first) for _ in range(4)]
        everyone = [first, *others]
        wait_for(lambda: all(_alive_members(m) == 5 for m in everyone), 30, "five members")
        data = os.urandom(4 * RUN_CHUNKS * CHUNK_SIZE)  # (four objects)
        first.path("spread.bin").write_bytes(data)
        # read through the node holding the fewest of them (one holding all reads locally)
        held = {m.address: stored_chunks(m) for m in everyone}
        reader = min(everyone, key=lambda m: held[m.address])
        served = {m.address: metric(m, "kelips_content_bytes_served_total") for m in everyone}
        assert reader.path("spread.bin").read_bytes() == data
        sent = {m.address: metric(m, "kelips_content_bytes_served_total") - served[m.address]
                for m in everyone if m is not reader}
        machines = sum(1 for v in sent.values() if v > 0) + (held[reader.address] > 0)
        assert machines > 3, (sent, held)


@pytest.mark.slow
def test_a_holder_killed_during_a_large_write_loses_nothing(tmp_path: Path) -> None:
    """Three nodes, r = 2: one that is not the writer's is killed with SIGKILL while a
    64 MiB file is written through a mount. The close succeeds (every chunk reached a live
    holder) or fails with EIO, and never hangs; a file it acknowledged reads back whole
    through both survivors, and repair gives every chunk its two copies again."""
    settings = ("replication=2", "t_fail=2.0")
    with Mounts(tmp_path, base=180) as ms:
        writer = ms.new(*settings)
        other = ms.new(*settings, join=writer)
        victim = ms.new(*settings, join=writer)
        wait_for(lambda: all(_alive_members(m) == 3 for m in (writer, other, victim)), 30,
                 "three members")
        data = os.urandom(64 * MiB)
        outcome: list[BaseException | None] = []

        def write() -> None:
            try:
                with open(writer.path("big.bin"), "wb") as fh:
                    for at in range(0, len(data), MiB):
                        fh.write(data[at:at + MiB])
                        time.sleep(0.01)
                outcome.append(None)
            except OSError as exc:
                outcome.append(exc)

        thread = threading.Thread(target=write, daemon=True)
        thread.start()
        wait_for(lambda: stored_chunks(writer, other) >= 1, 60, "the upload to be under way",
                 interval=0.02)
        ms.kill(victim)
        thread.join(120)
        assert outcome, "the write did not finish within 120 s of the kill"
        print(f"write after the kill: {outcome[0] or 'acknowledged'}")
        if outcome[0] is not None:
            assert isinstance(outcome[0], OSError) and outcome[0].errno == errno.EIO, outcome
            return
        assert writer.path("big.bin").read_bytes() == data
        assert other.path("big.bin").read_bytes() == data
        objects = -(-len(data) // (RUN_CHUNKS * CHUNK_SIZE))  # (written as runs)
        wait_for(lambda: stored_chunks(writer, other) == 2 * objects, 90,
                 "two copies of every chunk on the survivors", interval=0.5)


def test_small_writes_into_chunks_not_fetched_yet(pair: tuple[Mount, Mount]) -> None:
    """A copy opened on the other mount has none of the file's chunks: a small write goes
    into it without fetching its chunk (the publish sends it as a patch), and a read, a
    truncate or a larger write fetches the chunk then with what was written kept."""
    a, b = pair
    data = bytearray(os.urandom(6 * MiB + 99))
    a.path("unfetched.bin").write_bytes(data)
    assert b.path("unfetched.bin").stat().st_size == len(data)
    sent = metric(b, "kelips_content_bytes_sent_total")
    with open(b.path("unfetched.bin"), "r+b") as fh:
        for offset, piece in ((3 * MiB + 5, b"abc"), (3 * MiB + 1000, b"d" * 5000),
                              (5 * MiB - 2, b"across")):
            os.pwrite(fh.fileno(), piece, offset)
            data[offset:offset + len(piece)] = piece
        os.fsync(fh.fileno())
        # the manifest alone sent
        assert metric(b, "kelips_content_bytes_sent_total") - sent < 64 * 1024
        assert os.pread(fh.fileno(), 20, 3 * MiB) == bytes(data[3 * MiB:3 * MiB + 20])
        os.pwrite(fh.fileno(), b"e" * 40_000, 1 * MiB + 7)  # more than patches carry
        data[MiB + 7:MiB + 40_007] = b"e" * 40_000
        os.pwrite(fh.fileno(), b"f" * 10, 2 * MiB + 3)
        data[2 * MiB + 3:2 * MiB + 13] = b"f" * 10
        fh.truncate(2 * MiB + 8)  # into the chunk written but not fetched
        del data[2 * MiB + 8:]
    assert a.path("unfetched.bin").read_bytes() == data
    assert b.path("unfetched.bin").read_bytes() == data
    a.path("unfetched.bin").unlink()


@pytest.mark.parametrize("seed", [11, 12, 13])
def test_random_small_changes_through_two_mounts_read_back(pair: tuple[Mount, Mount],
                                                           seed: int) -> None:
    """Writes, reads, truncates and fsyncs at random, each round through the other mount
    (whose copy then holds none of the chunks), checked against a model of the file."""
    a, b = pair
    rng = random.Random(seed)
    model = bytearray(os.urandom(3 * MiB + 5))
    a.path("random.bin").write_bytes(model)
    for round_ in range(12):
        mount = (a, b)[round_ % 2]
        with open(mount.path("random.bin"), "r+b") as fh:
            for _ in range(25):
                op = rng.random()
                if op < 0.6:
                    offset = rng.randrange(len(model) + 2000)
                    piece = os.urandom(rng.choice((1, 17, 512, 4096, 40_000)))
                    os.pwrite(fh.fileno(), piece, offset)
                    if offset > len(model):
                        model.extend(bytes(offset - len(model)))
                    model[offset:offset + len(piece)] = piece
                elif op < 0.8:
                    offset = rng.randrange(len(model) + 1)
                    assert os.pread(fh.fileno(), 3000, offset) == model[offset:offset + 3000]
                elif op < 0.9:
                    length = rng.randrange(2 * MiB, 4 * MiB)
                    fh.truncate(length)
                    model = model[:length] + bytes(max(0, length - len(model)))
                else:
                    os.fsync(fh.fileno())
        assert (b, a)[round_ % 2].path("random.bin").read_bytes() == model, round_
    a.path("random.bin").unlink()


def test_a_write_far_past_the_end_of_a_small_file_stores_no_zeros(
        pair: tuple[Mount, Mount]) -> None:
    """A small file written again 3 GiB further on: the chunks between are holes, found
    without reading them, and nothing but the two written parts is stored."""
    a, b = pair
    before = stored_chunks(a, b)
    with open(a.path("far.bin"), "wb") as fh:
        fh.write(b"head")
        fh.seek(3 << 30)
        fh.write(b"tail" * 1000)
    st = b.path("far.bin").stat()
    assert st.st_size == (3 << 30) + 4000 and st.st_blocks * 512 <= 2 * MiB
    assert stored_chunks(a, b) - before <= 2 * 2  # (two objects at most, on two nodes)
    with open(b.path("far.bin"), "rb") as fh:
        assert fh.read(8) == b"head" + bytes(4)
        fh.seek(3 << 30)
        assert fh.read() == b"tail" * 1000
    a.path("far.bin").unlink()
