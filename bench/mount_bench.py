"""Mount benchmarks: kelipsfs mounts beside a local directory, all measured in the same run.

    python -m bench.mount_bench [--size-mib 256] [--files 1000] [--repeat 3]

Three targets, measured in turn within each repeat (local, 1 node, 3 nodes), medians reported:
- a local directory on the same disk;
- a one-node kelipsfs mount (``kelipsfs mount``, k = 1) on 127.0.0.31;
- a three-node cluster, r = 3 (k = 1): three ``kelipsfs mount`` processes (each runs a node)
  on 127.0.0.33-35, the second and third started with ``--join`` the first; measured through
  the third; the big file's copies are counted (3 expected) in every repeat.

Figures:
1. Sequential write (`cp` of a SIZE file into the directory, then `sync`) and read (`cat` to
   /dev/null after dropping the page cache) — MiB/s and the mount/local ratio.
2. `cp` of FILES files of 4 KiB into a new directory (one cp per file, as a script would) —
   files/s.
3. `ls -l` of that directory — seconds.

Every repeat writes new names and removes them afterwards (not timed). The mounts are started
and stopped by the mount tests' harness (tests/test_mount.py ``Mounts``): whatever happens,
``fusermount3 -u``, then ``-uz``, then SIGTERM and SIGKILL, every wait bounded; a failure
prints the mounts' logs first. Prints a Markdown table and writes bench/results/mount.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from bench.disk import settle
from tests.test_mount import Mount, Mounts, wait_for

RESULTS = Path(os.environ.get("KELIPSFS_BENCH_RESULTS", Path(__file__).parent / "results"))
TARGETS = ("local", "mount", "mount3")  # JSON keys: local directory, 1 node, 3 nodes
FIGURES = ("write_s", "read_s", "create_s", "ls_s")
MEMBERSHIP_TIMEOUT = 60.0


def _timed(cmd: str) -> float:
    started = time.perf_counter()
    subprocess.run(["bash", "-c", cmd], check=True)
    return time.perf_counter() - started


def _measure(target: Path, tag: str, big: Path, small_dir: Path, files: int) -> dict[str, float]:
    out: dict[str, float] = {}
    out["write_s"] = _timed(f"cp {big} {target}/big{tag}.bin && sync")
    settle()
    out["read_s"] = _timed(f"cat {target}/big{tag}.bin > /dev/null")
    dest = target / f"many{tag}"
    dest.mkdir()
    names = sorted(os.listdir(small_dir))[:files]
    started = time.perf_counter()
    for name in names:
        subprocess.run(["cp", str(small_dir / name), str(dest / name)], check=True)
    out["create_s"] = time.perf_counter() - started
    out["ls_s"] = _timed(f"ls -l {dest} > /dev/null")
    return out


def _clear(target: Path, tag: str) -> None:
    subprocess.run(["rm", "-rf", str(target / f"big{tag}.bin"), str(target / f"many{tag}")],
                   check=True, timeout=600)


def _inputs(root: Path, size_mib: int, files: int) -> tuple[Path, Path]:
    big = root / "big.bin"
    with open(big, "wb") as fh:
        block = os.urandom(1 << 20)
        for _ in range(size_mib):
            fh.write(block)
    small_dir = root / "small"
    small_dir.mkdir()
    for i in range(files):
        (small_dir / f"f{i:05d}.dat").write_bytes(random.randbytes(4096))
    return big, small_dir


def _alive_members(mount: Mount) -> int:
    lines = os.getxattr(mount.mountpoint, "user.kelips.members").decode().splitlines()
    return sum(1 for line in lines if json.loads(line)["state"] == "alive")


def _copies(mount: Mount, name: str) -> int:
    return len(json.loads(os.getxattr(mount.path(name), "user.kelips.holders")))


def _report_failure(ms: Mounts) -> Callable[..., bool]:
    """An exit callback that prints the mounts' logs when the benchmark fails (before clean-up)."""
    def report(exc_type: type[BaseException] | None, *_: object) -> bool:
        if exc_type is not None and exc_type is not SystemExit:
            for mount in ms.mounts:
                print(f"--- {mount.data_dir / 'mount.log'}:\n{ms.log(mount)}", file=sys.stderr)
        return False
    return report


def run(size_mib: int, files: int, repeat: int) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="kelipsfs-mbench-"))
    runs: dict[str, list[dict[str, float]]] = {t: [] for t in TARGETS}
    copies: list[int] = []
    try:
        with ExitStack() as stack:
            big, small_dir = _inputs(root, size_mib, files)
            local = root / "local"
            local.mkdir()
            singles = stack.enter_context(Mounts(root / "one", base=31))
            stack.push(_report_failure(singles))
            one = singles.new()
            trio = stack.enter_context(Mounts(root / "three", base=33))
            stack.push(_report_failure(trio))
            first = trio.new("replication=3")
            trio.new("replication=3", join=first)
            three = trio.new("replication=3", join=first)
            wait_for(lambda: _alive_members(three) == 3, MEMBERSHIP_TIMEOUT,
                     "three-node membership")
            dirs = {"local": local, "mount": one.mountpoint, "mount3": three.mountpoint}
            for rep in range(repeat):
                for target in TARGETS:
                    runs[target].append(_measure(dirs[target], str(rep), big, small_dir, files))
                copies.append(_copies(three, f"big{rep}.bin"))
                for target in TARGETS:
                    _clear(dirs[target], str(rep))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    results: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M"), "size_mib": size_mib,
                               "files": files, "repeat": repeat, "copies_3_nodes": copies,
                               "runs": runs}
    for target in TARGETS:  # medians: the machine is shared and noisy
        results[target] = {f: statistics.median(r[f] for r in runs[target]) for f in FIGURES}
    return results


def table(doc: dict[str, Any]) -> str:
    """The Markdown table of a mount.json (ratio = mount speed / local speed, same run)."""
    mib, files, lo = doc["size_mib"], doc["files"], doc["local"]
    rows: list[tuple[str, str, Callable[[float], str], float | None]] = [
        ("write_s", f"write {mib:,} MiB (cp + sync)", lambda s: f"{mib / s:,.0f} MiB/s", 0.4),
        ("read_s", f"read {mib:,} MiB (cat, cold cache)", lambda s: f"{mib / s:,.0f} MiB/s",
         0.6),
        ("create_s", f"create {files:,} × 4 KiB (cp each)", lambda s: f"{files / s:,.0f} files/s",
         None),
        ("ls_s", f"ls -l of {files:,} entries", lambda s: f"{s * 1000:,.0f} ms", None),
    ]
    mounts = ("mount", "mount3")
    out = ["| figure | local directory | kelipsfs mount, 1 node | ratio | "
           "kelipsfs mount, 3 nodes (r = 3) | ratio | target (1 node / 3 nodes) |",
           "|---|---|---|---|---|---|---|"]
    for key, label, fmt, target in rows:
        cells = []
        for m in mounts:
            cells += [fmt(doc[m][key]), f"{lo[key] / doc[m][key]:.0%}"] if m in doc else \
                ["not measured", "–"]
        marks = " / ".join("✔" if lo[key] / doc[m][key] >= target else "✘"
                           for m in mounts if m in doc) if target else ""
        goal = f"≥ {target:.0%} {marks}" if target else ""
        out.append(f"| {label} | {fmt(lo[key])} | {' | '.join(cells)} | {goal} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Mounts vs a local directory (module doc).")
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the clean-ups
    results = run(args.size_mib, args.files, args.repeat)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "mount.json").write_text(json.dumps(results, indent=1))
    print(table(results), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
