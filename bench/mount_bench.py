"""Mount benchmarks: a one-node kelipsfs mount beside a local directory, in the same run.

    python -m bench.mount_bench [--size-mib 256] [--files 1000]

1. Sequential write (`cp` of a SIZE file into the directory, then `sync`) and read (`cat` to
   /dev/null after dropping the page cache) — MiB/s and the mount/local ratio.
2. `cp` of FILES files of 4 KiB into a directory (one cp per file, as a script would) — files/s.
3. `ls -l` of that directory — seconds.

Prints a Markdown table and writes bench/results/mount.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(os.environ.get("KELIPSFS_BENCH_RESULTS", Path(__file__).parent / "results"))


def _drop_caches() -> None:
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        pass


def _timed(cmd: str) -> float:
    started = time.perf_counter()
    subprocess.run(["bash", "-c", cmd], check=True)
    return time.perf_counter() - started


def _measure(target: Path, big: Path, small_dir: Path, files: int) -> dict[str, float]:
    out: dict[str, float] = {}
    out["write_s"] = _timed(f"cp {big} {target}/big.bin && sync")
    _drop_caches()
    out["read_s"] = _timed(f"cat {target}/big.bin > /dev/null")
    dest = target / "many"
    dest.mkdir()
    names = sorted(os.listdir(small_dir))[:files]
    started = time.perf_counter()
    for name in names:
        subprocess.run(["cp", str(small_dir / name), str(dest / name)], check=True)
    out["create_s"] = time.perf_counter() - started
    out["ls_s"] = _timed(f"ls -l {dest} > /dev/null")
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--files", type=int, default=1000)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="kelipsfs-mbench-"))
    mnt = root / "mnt"
    mnt.mkdir()
    local = root / "local"
    local.mkdir()
    big = root / "big.bin"
    with open(big, "wb") as fh:
        block = os.urandom(1 << 20)
        for _ in range(args.size_mib):
            fh.write(block)
    small_dir = root / "small"
    small_dir.mkdir()
    for i in range(args.files):
        (small_dir / f"f{i:05d}.dat").write_bytes(random.randbytes(4096))
    port = random.randint(20000, 40000)
    mounted = False
    results: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "size_mib": args.size_mib,
                               "files": args.files}
    try:
        subprocess.run([sys.executable, "-m", "kelipsfs.cli", "mount", str(mnt), "--listen",
                        f"127.0.0.31:{port}", "--data-dir", str(root / "data"), "--set", "k=1"],
                       check=True, timeout=90)
        mounted = True
        results["local"] = _measure(local, big, small_dir, args.files)
        results["mount"] = _measure(mnt, big, small_dir, args.files)
    finally:
        if mounted:
            subprocess.run([sys.executable, "-m", "kelipsfs.cli", "umount", str(mnt)],
                           timeout=60, check=False)
        shutil.rmtree(root, ignore_errors=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "mount.json").write_text(json.dumps(results, indent=1))
    mib = args.size_mib
    lo, mo = results["local"], results["mount"]
    print("| figure | kelipsfs mount (1 node) | local directory | ratio |")
    print("|---|---|---|---|")
    print(f"| write {mib} MiB (cp + sync) | {mib / mo['write_s']:.0f} MiB/s | "
          f"{mib / lo['write_s']:.0f} MiB/s | {lo['write_s'] / mo['write_s']:.0%} |")
    print(f"| read {mib} MiB (cold cache) | {mib / mo['read_s']:.0f} MiB/s | "
          f"{mib / lo['read_s']:.0f} MiB/s | {lo['read_s'] / mo['read_s']:.0%} |")
    print(f"| create {args.files} × 4 KiB (cp each) | {args.files / mo['create_s']:.0f} files/s | "
          f"{args.files / lo['create_s']:.0f} files/s | {lo['create_s'] / mo['create_s']:.0%} |")
    print(f"| ls -l of {args.files} entries | {mo['ls_s'] * 1000:.0f} ms | "
          f"{lo['ls_s'] * 1000:.0f} ms | {lo['ls_s'] / mo['ls_s']:.0%} |")


if __name__ == "__main__":
    main()
