"""Real nodes as separate processes on loopback: join, data path, failures, restarts, refusals."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.digest import file_digest
from tests.cluster import Cluster, NodeProc, node_id_in_group, preset_identity

FAST = ["t_fail=2.0", "anti_entropy_interval=10"]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    with Cluster(tmp_path, settings=["k=1", *FAST]) as c:
        yield c


def _file(root: Path, name: str, size: int, seed: int = 0) -> Path:
    path = root / name
    block = hashlib.sha256(f"{name}-{seed}".encode()).digest() * 2048  # 64 KiB pattern
    with open(path, "wb") as fh:
        left = size
        while left > 0:
            fh.write(block[:min(left, len(block))])
            left -= len(block)
    return path


def _get(c: Cluster, node: NodeProc, name: str) -> bytes:
    return c.cli(node, "get", name, "-").stdout


def _holders(c: Cluster, node: NodeProc, name: str) -> list[str]:
    doc = json.loads(c.cli(node, "stat", name).stdout)
    return list(doc["tuple"]["holders"])


def test_single_node_put_get_ls_rm(cluster: Cluster, tmp_path: Path) -> None:
    a = cluster.new_node()
    src = _file(tmp_path, "hello.bin", 100_000)
    out = cluster.cli(a, "put", str(src), "docs/hello.bin")
    assert b"stored docs/hello.bin" in out.stdout
    assert _get(cluster, a, "docs/hello.bin") == src.read_bytes()
    assert cluster.cli(a, "ls").stdout.decode().split() == ["docs/hello.bin"]
    assert cluster.cli(a, "ls", "docs/").stdout.decode().split() == ["docs/hello.bin"]
    assert cluster.cli(a, "ls", "nope/").stdout.decode().split() == []
    # overwrite: the newer version wins
    src2 = _file(tmp_path, "hello2.bin", 5_000, seed=1)
    cluster.cli(a, "put", str(src2), "docs/hello.bin")
    assert _get(cluster, a, "docs/hello.bin") == src2.read_bytes()
    cluster.cli(a, "rm", "docs/hello.bin")
    gone = cluster.cli(a, "get", "docs/hello.bin", "-", check=False)
    assert gone.returncode != 0 and b"no such file or directory" in gone.stderr
    assert cluster.cli(a, "ls").stdout.decode().split() == []
    # bad names get a clear error and change nothing
    for bad in ("a/../b", "a//b", "x" * 300):
        result = cluster.cli(a, "put", str(src), bad, check=False)
        assert result.returncode != 0
        assert b"component" in result.stderr or b"not allowed" in result.stderr


def test_three_nodes_share_everything(cluster: Cluster, tmp_path: Path) -> None:
    a = cluster.new_node()
    b = cluster.new_node(join=[a])
    c = cluster.new_node(join=[b])
    cluster.wait_for(lambda: all(
        sum(1 for m in cluster.status(n)["members"] if m["state"] == "alive") == 3
        for n in (a, b, c)), 20, "three-way membership")
    files = {f"f{i}.bin": _file(tmp_path, f"f{i}.bin", 1000 * (i + 1), seed=i) for i in range(5)}
    writers = [a, b, c]
    for i, (name, path) in enumerate(files.items()):
        cluster.cli(writers[i % 3], "put", str(path), f"dir/{name}")
    for node in (a, b, c):
        for name, path in files.items():
            assert _get(cluster, node, f"dir/{name}") == path.read_bytes()
        listed = cluster.cli(node, "ls", "dir/").stdout.decode().split()
        assert listed == sorted(f"dir/{n}" for n in files)
    cluster.cli(c, "rm", "dir/f0.bin")
    for node in (a, b, c):
        assert cluster.cli(node, "get", "dir/f0.bin", "-", check=False).returncode != 0
        assert "dir/f0.bin" not in cluster.cli(node, "ls").stdout.decode().split()


def test_groups_and_contacts(tmp_path: Path) -> None:
    """k = 2 with 5 nodes: lookups of names in the other group go through a contact."""
    with Cluster(tmp_path, settings=["k=2", *FAST]) as c:
        for i, group in enumerate((0, 1, 0, 1, 0)):  # both groups populated, by construction
            preset_identity(tmp_path / f"node{i}", node_id_in_group(group, 2, f"cluster-{i}"))
        nodes = [c.new_node()]
        for _ in range(4):
            nodes.append(c.new_node(join=[nodes[0]]))
        groups = {n.index: c.status(n)["group"] for n in nodes}
        assert groups == {0: 0, 1: 1, 2: 0, 3: 1, 4: 0}

        def everyone_has_contacts() -> bool:
            for n in nodes:
                status = c.status(n)
                other = 1 - status["group"]
                if status["contacts_per_group"].get(str(other), 0) < 1:
                    return False
                # k = 2, c = 2: one foreign group, whose two contacts the budget never trims
                # (two contacts stay in at least half the groups)
                assert status["contact_budget"] == 2
            return True

        c.wait_for(everyone_has_contacts, 20, "contacts in the other group")
        paths = {f"g/{i}": _file(tmp_path, f"g{i}", 3000, seed=i) for i in range(8)}
        for i, (name, path) in enumerate(paths.items()):
            c.cli(nodes[i % 5], "put", str(path), name)
        for n in nodes:
            for name, path in paths.items():
                assert _get(c, n, name) == path.read_bytes()
            assert c.cli(n, "ls", "g/").stdout.decode().split() == sorted(paths)


def test_new_nodes_choose_their_group_by_size(tmp_path: Path) -> None:
    """k = 2, one member in group 0, three new nodes joining through it: each weighs a few
    random ids by the sizes of their groups (asking the seed's status and a contact's), so
    group 1 gets members (all three in group 0: 1 run in 4,096; with one random id, 1 in 8)."""
    with Cluster(tmp_path, settings=["k=2", *FAST]) as c:
        preset_identity(tmp_path / "node0", node_id_in_group(0, 2, "balance-0"))
        nodes = [c.new_node()]
        for _ in range(3):
            nodes.append(c.new_node(join=[nodes[0]]))
        assert {c.status(n)["group"] for n in nodes} == {0, 1}

        def sizes_agree() -> bool:
            statuses = [c.status(n) for n in nodes]
            groups = [s["group"] for s in statuses]
            return all(s["group_size"] == groups.count(s["group"]) for s in statuses)

        c.wait_for(sizes_agree, 20, "every status giving its group's size")


def test_kill_holder_restores_copies(cluster: Cluster, tmp_path: Path) -> None:
    nodes = [cluster.new_node()]
    for _ in range(4):
        nodes.append(cluster.new_node(join=[nodes[0]]))
    names = [f"obj/{i}" for i in range(12)]
    for i, name in enumerate(names):
        cluster.cli(nodes[i % 5], "put", str(_file(tmp_path, f"o{i}", 2000, seed=i)), name)
    ids = {n.index: cluster.status(n)["node_id"] for n in nodes}
    victim = next(n for n in nodes[1:] if any(ids[n.index] in _holders(cluster, nodes[0], x)
                                                for x in names))
    cluster.kill(victim)
    survivors = [n for n in nodes if n is not victim]

    def restored() -> bool:
        for name in names:
            holders = _holders(cluster, survivors[0], name)
            if ids[victim.index] in holders or len(holders) < 3:
                return False
        return True

    cluster.wait_for(restored, 40, "three live copies of every object after the kill")
    for node in survivors:
        for i, name in enumerate(names):
            assert _get(cluster, node, name) == (tmp_path / f"o{i}").read_bytes()


def test_restart_keeps_identity_and_objects(cluster: Cluster, tmp_path: Path) -> None:
    a = cluster.new_node()
    b = cluster.new_node(join=[a])
    src = _file(tmp_path, "keep.bin", 50_000)
    cluster.cli(a, "put", str(src), "keep.bin")
    before = cluster.status(b)["node_id"]
    assert cluster.stop(b) == 0  # SIGTERM: leaves cleanly, exits 0
    cluster.start(b)
    assert cluster.status(b)["node_id"] == before
    cluster.wait_for(lambda: _get(cluster, b, "keep.bin") == src.read_bytes(), 20,
                     "the restarted node serving the object")


def test_node_with_other_k_is_refused(cluster: Cluster) -> None:
    a = cluster.new_node()
    other = subprocess.run(
        [sys.executable, "-m", "kelipsfs.cli", "node", "--listen", f"127.0.0.99:{cluster.port}",
         "--data-dir", str(cluster.root / "other"), "--join", a.address, "--set", "k=2"],
        capture_output=True, text=True, timeout=60)
    assert other.returncode == 1
    assert "k=1" in other.stderr and "refused" in other.stderr
    assert len(cluster.status(a)["members"]) == 1


def test_node_without_the_key_cannot_join_or_read(tmp_path: Path) -> None:
    key = tmp_path / "cluster.key"
    subprocess.run([sys.executable, "-m", "kelipsfs.cli", "keygen", str(key)], check=True,
                   capture_output=True, timeout=30)
    with Cluster(tmp_path, settings=["k=1"], key_file=key) as c:
        a = c.new_node()
        src = _file(tmp_path, "secret.bin", 1000)
        c.cli(a, "put", str(src), "secret.bin")
        stranger = subprocess.run(
            [sys.executable, "-m", "kelipsfs.cli", "node", "--listen",
             f"127.0.0.98:{c.port}", "--data-dir", str(tmp_path / "stranger"),
             "--join", a.address, "--set", "k=1"],
            capture_output=True, text=True, timeout=60)
        assert stranger.returncode == 1
        assert "401" in stranger.stderr or "authenticated" in stranger.stderr
        unsigned = subprocess.run(
            [sys.executable, "-m", "kelipsfs.cli", "get", "secret.bin", "-", "--node",
             a.address, "--data-dir", str(tmp_path / "nowhere")],
            capture_output=True, timeout=60)
        assert unsigned.returncode != 0 and b"401" in unsigned.stderr
        assert _get(c, a, "secret.bin") == src.read_bytes()
        assert len(c.status(a)["members"]) == 1


def test_join_through_bootstrap(cluster: Cluster, tmp_path: Path) -> None:
    boot_addr = f"127.0.0.2:{cluster.port}"
    boot = subprocess.Popen([sys.executable, "-m", "kelipsfs.cli", "bootstrap", "--listen",
                             boot_addr, "--ttl", "10"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    cluster.extra_procs.append(boot)
    assert boot.stdout is not None and "ready" in boot.stdout.readline()
    a = cluster.new_node(bootstrap=boot_addr)
    b = cluster.new_node(bootstrap=boot_addr)
    c = cluster.new_node(bootstrap=boot_addr)
    cluster.wait_for(lambda: all(len(cluster.status(n)["members"]) == 3 for n in (a, b, c)),
                     20, "membership through the bootstrap service")
    os.killpg(boot.pid, signal.SIGKILL)
    boot.wait(timeout=10)
    d = cluster.new_node(join=[c])  # the introducer is gone: join through a member
    cluster.wait_for(lambda: len(cluster.status(a)["members"]) == 4, 20,
                     "a fourth member without the bootstrap service")
    src = _file(tmp_path, "after.bin", 777)
    cluster.cli(d, "put", str(src), "after.bin")
    assert _get(cluster, a, "after.bin") == src.read_bytes()


@pytest.mark.slow
def test_large_object(cluster: Cluster, tmp_path: Path) -> None:
    a = cluster.new_node()
    b = cluster.new_node(join=[a])
    size = int(os.environ.get("KELIPSFS_LARGE_BYTES", str(1 << 30)))
    src = _file(tmp_path, "big.bin", size)
    cluster.cli(a, "put", str(src), "big.bin")
    src_sha = file_digest(src)
    src.unlink()  # disk: the holders' copies and the output are enough
    out = tmp_path / "big.out"
    cluster.cli(b, "get", "big.bin", str(out))
    assert out.stat().st_size == size
    assert file_digest(out) == src_sha



def test_node_back_with_old_data_reconciles(cluster: Cluster, tmp_path: Path) -> None:
    a = cluster.new_node()
    b = cluster.new_node(join=[a])
    v1 = _file(tmp_path, "v1", 100_000, seed=1)  # (beyond what the record log keeps)
    cluster.cli(a, "put", str(v1), "doc")
    b_id = cluster.status(b)["node_id"]
    assert b_id in _holders(cluster, a, "doc")
    assert cluster.stop(b) == 0
    v2 = _file(tmp_path, "v2", 130_000, seed=2)
    cluster.cli(a, "put", str(v2), "doc")  # b is away: only a holds v2
    cluster.start(b)
    assert _get(cluster, b, "doc") == v2.read_bytes()  # never the old copy b still has
    cluster.wait_for(lambda: b_id in _holders(cluster, a, "doc"), 30,
                     "repair giving b the current version")
    # (directory entries and inodes are records with empty content files)
    def contents() -> list[int]:
        return [n for n in (f.stat().st_size
                            for f in (b.data_dir / "store").rglob("*.data")) if n]
    cluster.wait_for(lambda: contents() == [130_000], 30,
                     "only the current content left on b")
