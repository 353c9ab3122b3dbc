"""A store written by the version that named files by their path is readable after the
upgrade: its objects become files and directories of the namespace."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from daemon.core.messages import Version
from daemon.digest import digest_of
from daemon.peers import stream_of
from daemon.store import ObjectStore
from tests.cluster import Cluster

LEGACY = {
    "docs/readme.txt": b"hello from before\n",
    "docs/sub/data.bin": random.Random(1).randbytes(300_000),
    "top.txt": b"",
    "empty/.kelipsfs-dir": b"",
}


def write_legacy_store(data_dir: Path) -> None:
    """Objects named by path, with format-2 metadata, as the earlier version wrote them."""
    async def fill() -> None:
        store = await trio.to_thread.run_sync(ObjectStore, data_dir / "store")
        for i, (name, data) in enumerate(LEGACY.items()):
            await store.put(name, Version((1_700_000_000_000 + i) << 16, b"\x07" * 20), 0o640,
                            1_600_000_000_000_000_000 + i, stream_of(data),
                            expected_checksum=digest_of(data), expected_size=len(data))

    trio.run(fill)
    for meta in (data_dir / "store" / "objects").rglob("*.meta"):
        doc = json.loads(meta.read_text())
        doc["format"] = 2
        del doc["attrs"]
        meta.write_text(json.dumps(doc))


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    with Cluster(tmp_path) as c:
        yield c


def test_legacy_objects_become_files(cluster: Cluster, tmp_path: Path) -> None:
    write_legacy_store(tmp_path / "node0")
    a = cluster.new_node()
    b = cluster.new_node(join=[a])

    def listed() -> list[str]:
        return sorted(cluster.cli(b, "ls").stdout.decode().split())

    cluster.wait_for(lambda: listed() == ["docs/readme.txt", "docs/sub/data.bin", "top.txt"],
                     60, "the converted files listed")
    for name, data in LEGACY.items():
        if name.endswith(".kelipsfs-dir"):
            continue
        for node in (a, b):
            assert cluster.cli(node, "get", name, "-").stdout == data
        info = json.loads(cluster.cli(a, "stat", name).stdout)["inode"]
        assert info["mode"] & 0o7777 == 0o640
        assert info["mtime_ns"] // 1_000_000_000 == 1_600_000_000
    empty = json.loads(cluster.cli(a, "stat", "empty").stdout)["inode"]
    assert empty["mode"] & 0o170000 == 0o040000  # a directory

    def legacy_left() -> int:
        metas = (tmp_path / "node0" / "store" / "objects").rglob("*.meta")
        return sum(json.loads(m.read_text()).get("format") == 2 for m in metas)

    cluster.wait_for(lambda: legacy_left() == 0, 30, "no legacy record left")
    # a restart finds nothing more to convert, and the files stay
    cluster.stop(a)
    cluster.start(a)
    assert cluster.cli(a, "get", "docs/readme.txt", "-").stdout == LEGACY["docs/readme.txt"]
