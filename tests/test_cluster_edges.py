"""Real nodes: read-after-write everywhere, metrics, hostile input, full disks."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.core.ids import group_of_name
from daemon.core.placement import rank
from daemon.record_log import RecordLog
from tests.cluster import (
    Cluster,
    NodeProc,
    object_call,
    preset_identity,
    store_version_ahead,
)
from tests.test_cluster import FAST, _file, _get, _holders


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    with Cluster(tmp_path, settings=["k=1", *FAST]) as c:
        yield c


def _five(c: Cluster) -> list[NodeProc]:
    nodes = [c.new_node()]
    for _ in range(4):
        nodes.append(c.new_node(join=[nodes[0]]))
    c.wait_for(lambda: all(len(c.status(n)["members"]) == 5 for n in nodes), 20, "5 members")
    return nodes


def _metrics(node: NodeProc) -> str:
    host, port = node.address.split(":")
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as response:
        return str(response.read().decode())


def _metric(text: str, prefix: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(prefix))


def test_read_after_write_and_overwrite_from_every_node(cluster: Cluster, tmp_path: Path) -> None:
    nodes = _five(cluster)
    for round_ in range(3):
        src = _file(tmp_path, f"v{round_}", 10_000 + round_, seed=round_)
        cluster.cli(nodes[round_], "put", str(src), "shared.bin")
        for node in nodes:  # at once: no waiting for gossip
            assert _get(cluster, node, "shared.bin") == src.read_bytes()


def _damage_logged(node: NodeProc, content: bytes) -> None:
    """Overwrite a small content kept in the node's record log with zeros, in place (its
    frame's checksum no longer matches either: only a replay would notice)."""
    path = node.data_dir / "store" / "records.log"
    data = path.read_bytes()
    assert data.count(content) == 1
    with open(path, "r+b") as fh:
        fh.seek(data.index(content))
        fh.write(bytes(len(content)))


def _stored_clock(node: NodeProc, record: str) -> int:
    """The clock of the newest version of ``record`` in ``node``'s store: its files, or its
    record log (read from a copy: the node keeps appending to it) (0: none)."""
    key = hashlib.sha1(record.encode()).hexdigest()
    metas = list((node.data_dir / "store" / "objects" / key[:2]).glob(f"{key}-*.meta"))
    clocks = [int(m.name.split("-")[1], 16) for m in metas]
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "records.log"
        shutil.copyfile(node.data_dir / "store" / "records.log", copy)
        log = RecordLog(copy)
        clocks += [f.clock for f, _, _ in log.replay() if f.name == record]
        log.close()
    return max(clocks, default=0)


def test_a_put_or_rm_overtaken_by_a_newer_version_is_stamped_above_it(cluster: Cluster,
                                                                      tmp_path: Path) -> None:
    """A holder keeps a newer version of the directory entry a put binds (a concurrent
    writer's while the network was split, or one from a clock ahead of this node's): the
    primary learns that version from the refusal and applies the operation again, stamped
    above it, so `kelipsfs put` succeeds and its file is what stays. `kelipsfs rm`
    likewise."""
    node = cluster.new_node()
    first, second = _file(tmp_path, "a", 5000, seed=1), _file(tmp_path, "b", 300_000, seed=2)
    cluster.cli(node, "put", str(first), "ahead.bin")
    entry = "e/0000000000000001/ahead.bin"  # the root directory's entry
    ahead = store_version_ahead(node.address, entry, b"from a clock ahead", 60)
    cluster.cli(node, "put", str(second), "ahead.bin")
    assert _get(cluster, node, "ahead.bin") == second.read_bytes()
    assert _stored_clock(node, entry) > ahead
    ahead = store_version_ahead(node.address, entry, b"ahead again", 120)
    cluster.cli(node, "rm", "ahead.bin")
    gone = cluster.cli(node, "get", "ahead.bin", "-", check=False)
    assert gone.returncode != 0 and b"no such file or directory" in gone.stderr
    assert _stored_clock(node, entry) > ahead


def test_put_from_standard_input_and_clear_errors_for_bad_sources(cluster: Cluster,
                                                                  tmp_path: Path) -> None:
    """`kelipsfs put - NAME` stores standard input (any size, empty too) and leaves no
    temporary file behind; a missing file or a directory is named as such, storing nothing."""
    node = cluster.new_node()
    data = os.urandom(3 * 1024 * 1024 + 5)
    tmp = Path(tempfile.gettempdir())  # where the CLI, with this environment, spools
    spools = set(tmp.glob("kelipsfs-put-*"))
    cluster.cli(node, "put", "-", "piped.bin", input_bytes=data)
    cluster.cli(node, "put", "-", "empty.bin", input_bytes=b"")
    assert _get(cluster, node, "piped.bin") == data
    assert _get(cluster, node, "empty.bin") == b""
    assert set(tmp.glob("kelipsfs-put-*")) == spools
    for source, why in ((tmp_path / "missing", b"no such file"), (tmp_path, b"a directory")):
        result = cluster.cli(node, "put", str(source), "never.bin", check=False)
        assert result.returncode == 2 and why in result.stderr
    listed = cluster.cli(node, "ls").stdout.split()
    assert listed == [b"empty.bin", b"piped.bin"]


def test_a_copy_left_outside_the_placement_never_answers_for_a_newer_write(
        tmp_path: Path) -> None:
    """A member that ranks higher for a name joins: the next write of the name goes to the
    new placement, and the old holder it displaced learns the new tuple only by gossip (slow
    here: 3 s rounds). A read on that old holder right after the write must still get the
    new version: its own copy is a leftover and is asked last, after the other holders."""
    with Cluster(tmp_path, settings=["k=1", "gossip_interval=3", "t_fail=15"]) as c:
        nodes = [c.new_node()]
        nodes += [c.new_node(join=[nodes[0]]) for _ in range(3)]
        c.wait_for(lambda: all(len(c.status(n)["members"]) == 4 for n in nodes), 60,
                   "4 members")
        ids = {bytes.fromhex(c.status(n)["node_id"]): n for n in nodes}
        old = nodes[3]
        old_id = bytes.fromhex(c.status(old)["node_id"])
        # raw objects of the DHT (record o/NAME): their placement follows their name
        moved = [f"moved{i}" for i in range(10_000)
                 if rank(f"o/moved{i}", ids)[2] == old_id]  # old: the 3rd of r = 3
        newcomer = next(nid for nid in (hashlib.sha1(f"new-{j}".encode()).digest()
                                        for j in range(10_000))
                        if all(old_id not in rank(f"o/{n}", [*ids, nid])[:3]
                               for n in moved[:2]))
        # a small object (answered in a lookup datagram) and a large one (streamed)
        objects = {moved[0]: (_file(tmp_path, "s1", 900, 1), _file(tmp_path, "s2", 700, 2)),
                   moved[1]: (_file(tmp_path, "l1", 300_000, 3),
                              _file(tmp_path, "l2", 200_000, 4))}
        for name, (first, _) in objects.items():
            object_call(old.address, "PUT", name, first.read_bytes())
            assert old_id.hex() in object_call(old.address, "STAT", name)["tuple"]["holders"]
        preset_identity(tmp_path / "node4", newcomer.hex())
        new = c.new_node(join=[nodes[0]])

        def everyone_knows_the_newcomer() -> bool:
            return all(any(m["id"] == newcomer.hex() and m["state"] == "alive"
                           for m in c.status(n)["members"]) for n in nodes)

        c.wait_for(everyone_knows_the_newcomer, 60, "the newcomer known to all")
        writer = next(n for n in nodes if n is not old)
        for name, (_, second) in objects.items():
            object_call(writer.address, "PUT", name, second.read_bytes())
            holders = object_call(writer.address, "STAT", name)["tuple"]["holders"]
            assert old_id.hex() not in holders
            assert object_call(old.address, "GET", name) == second.read_bytes()
            assert object_call(new.address, "GET", name) == second.read_bytes()


def test_every_member_lists_a_write_or_delete_as_soon_as_it_is_acknowledged(
        tmp_path: Path) -> None:
    """A member that holds no copy learns a new tuple from the writer's announce, not from
    gossip (slow here: 3 s rounds): right after `put` returns, `ls` through it lists the
    file, and right after `rm` returns, it neither lists nor stats it."""
    with Cluster(tmp_path, settings=["k=1", "gossip_interval=3", "t_fail=15"]) as c:
        nodes = [c.new_node()]
        nodes += [c.new_node(join=[nodes[0]]) for _ in range(4)]
        c.wait_for(lambda: all(len(c.status(n)["members"]) == 5 for n in nodes), 60,
                   "5 members")
        src = _file(tmp_path, "f", 2000)
        for i in range(4):
            name = f"seen/now{i}"
            writer = nodes[i % 5]
            c.cli(writer, "put", str(src), name)
            holders = set(_holders(c, writer, name))
            readers = [n for n in nodes
                       if n is not writer and c.status(n)["node_id"] not in holders]
            assert readers  # 5 members, 3 copies
            for reader in readers:
                assert name.encode() in c.cli(reader, "ls", "seen/").stdout.split()
            c.cli(writer, "rm", name)
            for reader in readers:
                assert name.encode() not in c.cli(reader, "ls", "seen/").stdout.split()
                gone = c.cli(reader, "stat", name, check=False)
                assert gone.returncode != 0 and b"no such file or directory" in gone.stderr


def test_small_objects_come_inline_and_never_stale(tmp_path: Path) -> None:
    """k = 3 groups, 1 KiB objects: gets are answered by lookup datagrams with the bytes
    inline, and a read from every node right after each acknowledged overwrite sees it."""
    with Cluster(tmp_path, settings=["k=3", *FAST]) as c:
        nodes = [c.new_node()]
        for _ in range(5):
            nodes.append(c.new_node(join=[nodes[0]]))

        def formed() -> bool:
            docs = [c.status(n) for n in nodes]
            groups: dict[int, set[str]] = {}
            for d in docs:
                groups.setdefault(d["group"], set()).add(d["node_id"])
            for d in docs:
                alive = {m["id"] for m in d["members"] if m["state"] == "alive"}
                have = {int(g) for g, n in d["contacts_per_group"].items() if n}
                if not groups[d["group"]] <= alive or not set(groups) - {d["group"]} <= have:
                    return False
            return True

        c.wait_for(formed, 30, "groups and contacts")
        populated = {c.status(n)["group"] for n in nodes}
        names = [f"small/{i}.bin" for i in range(40)
                 if group_of_name(f"small/{i}.bin", 3) in populated][:4]
        for round_ in range(3):
            for i, name in enumerate(names):
                src = _file(tmp_path, f"s{round_}-{i}", 1000 + round_, seed=round_)
                c.cli(nodes[(round_ + i) % 6], "put", str(src), name)
                for node in nodes:  # at once: no waiting for gossip
                    assert _get(c, node, name) == src.read_bytes()
        inline = sum(_metric(_metrics(n), "kelips_inline_reads_total") for n in nodes)
        assert inline > 0


def test_metrics_and_hostile_datagrams(cluster: Cluster) -> None:
    a = cluster.new_node()
    b = cluster.new_node(join=[a])
    cluster.wait_for(lambda: len(cluster.status(a)["members"]) == 2, 20, "two members")
    before = _metrics(a)
    assert "kelips_members" in before and "kelips_gossip_bytes_out_total" in before
    host, port = a.address.split(":")
    rng = random.Random(7)
    valid_looking = bytes([1, 1]) + b"\x00" * 200
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for i in range(3000):
            kind = i % 3
            if kind == 0:
                data = rng.randbytes(rng.randrange(1, 1400))
            elif kind == 1:
                data = bytearray(valid_looking + rng.randbytes(48))
                data[rng.randrange(len(data))] ^= 0xFF
                data = bytes(data)
            else:
                data = rng.randbytes(8000)  # oversized
            sock.sendto(data, (host, int(port)))
            if i % 20 == 0:
                time.sleep(0.002)  # paced: the kernel drops a burst beyond the socket buffer
    cluster.wait_for(lambda: _metric(_metrics(a), "kelips_rejected_packets_total") >= 2000, 20,
                     "rejected datagrams counted")
    status = cluster.status(a)
    assert len(status["members"]) == 2
    assert all(m["state"] == "alive" for m in status["members"])
    assert a.alive and b.alive


def test_malformed_and_oversized_requests(cluster: Cluster) -> None:
    a = cluster.new_node()
    host, port = a.address.split(":")
    base = f"http://{host}:{port}"
    oversized = urllib.request.Request(base + "/v1/sync", data=b"x" * (2 << 20), method="POST")
    try:
        urllib.request.urlopen(oversized, timeout=10)
        raise AssertionError("a 2 MiB control request was accepted")
    except urllib.error.HTTPError as exc:
        assert exc.code == 413
    except urllib.error.URLError as exc:  # refused before the body was read: pipe closed
        assert isinstance(exc.reason, (BrokenPipeError, ConnectionResetError)), exc
    cases = [("POST", "/v1/sync", b"garbage"),
             ("GET", "/v1/lookup?name=../x", b""), ("PUT", "/v1/replica/a", b"data"),
             ("GET", "/v1/status", b""), ("DELETE", "/v1/files/a", b""),
             ("GET", "/v1/nothing", b"")]
    for method, path, body in cases:
        request = urllib.request.Request(base + path, data=body or None, method=method)
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(request, timeout=10)
        assert 400 <= info.value.code < 500, (method, path, info.value.code)
    assert a.alive
    assert len(cluster.status(a)["members"]) == 1


def test_full_disk_gives_a_clear_error_and_leaves_nothing(tmp_path: Path) -> None:
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], check=True)
    try:
        with Cluster(tmp_path, settings=["k=1", *FAST]) as c:
            node = NodeProc(0, f"127.0.0.10:{c.port}", mnt / "node")
            node.extra = ["--listen", node.address]
            c.nodes.append(node)
            c.start(node)
            small = _file(tmp_path, "small.bin", 100_000)
            c.cli(node, "put", str(small), "small.bin")
            big = _file(tmp_path, "big.bin", 6 << 20)
            result = c.cli(node, "put", str(big), "big.bin", check=False)
            assert result.returncode != 0
            err = result.stderr.decode()
            assert "full" in err.lower() or "space" in err.lower(), err
            assert c.cli(node, "ls").stdout.decode().split() == ["small.bin"]
            assert _get(c, node, "small.bin") == small.read_bytes()
            spool = mnt / "node" / "spool"
            assert not spool.exists() or not os.listdir(spool)
            c.stop(node)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_status_table_and_json(cluster: Cluster) -> None:
    a = cluster.new_node()
    b = cluster.new_node(join=[a])
    cluster.wait_for(lambda: len(cluster.status(b)["members"]) == 2, 20, "two members")
    table = cluster.cli(a, "status").stdout.decode()
    assert "HEARTBEAT" in table and "alive" in table
    doc = json.loads(cluster.cli(a, "status", "--json").stdout)
    assert doc["k"] == 1 and doc["n_estimate"] == 2
    assert doc["contact_budget"] == 0  # k = 1: no foreign group
    rows = {row["role"] for row in doc["members"]}
    assert rows == {"self", "member"}


def test_a_small_object_held_here_is_read_here_and_never_served_corrupt(
        cluster: Cluster, tmp_path: Path) -> None:
    """A node answers a get of a small object it holds from its own store, with no lookup
    datagram, and checks the digest first: with no other holder, a copy damaged on disk is
    refused, not served."""
    a = cluster.new_node()
    src = _file(tmp_path, "small.bin", 3000)
    cluster.cli(a, "put", str(src), "here/small.bin")
    for _ in range(3):
        assert _get(cluster, a, "here/small.bin") == src.read_bytes()
    assert _metric(_metrics(a), "kelips_inline_reads_total") == 0  # no lookup datagram
    _damage_logged(a, src.read_bytes())  # same size, other bytes: only the digest can tell
    result = cluster.cli(a, "get", "here/small.bin", "-", check=False)
    assert result.returncode != 0 and result.stdout == b""
    assert b"does not match its checksum" in result.stderr, result.stderr


def test_a_damaged_small_copy_here_is_read_from_another_holder(
        cluster: Cluster, tmp_path: Path) -> None:
    a = cluster.new_node()
    others = [cluster.new_node(join=[a]) for _ in range(2)]
    cluster.wait_for(lambda: len(cluster.status(a)["members"]) == 3, 20, "three members")
    src = _file(tmp_path, "small.bin", 3000)
    cluster.cli(a, "put", str(src), "here/small.bin")  # k = 1, r = 3: every node holds it
    _damage_logged(a, src.read_bytes())
    assert _get(cluster, a, "here/small.bin") == src.read_bytes()
    for node in others:
        assert _get(cluster, node, "here/small.bin") == src.read_bytes()
