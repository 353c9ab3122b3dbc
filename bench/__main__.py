"""One entry point for the benchmarks: ``python -m bench all|sim|fd|node|mount|lookup [--quick]``.

``--quick`` runs every part small enough to prove it executes (what CI may call); the full run
produces the figures in bench/README.md. Each part prints Markdown and writes JSON under
bench/results/.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

PARTS = {
    "sim": (["-m", "bench.sim_scale", "scale", "--duration", "60"],
            ["-m", "bench.sim_scale", "scale", "--duration", "5", "--nodes", "50", "200"]),
    "fd": (["-m", "bench.sim_scale", "fd", "--duration", "3600"],
           ["-m", "bench.sim_scale", "fd", "--duration", "10", "--nodes", "200"]),
    "node": (["-m", "bench.node_bench"],
             ["-m", "bench.node_bench", "--size-mib", "8", "--gets", "50", "--objects", "5"]),
    "mount": (["-m", "bench.mount_bench"],
              ["-m", "bench.mount_bench", "--size-mib", "8", "--files", "20"]),
    "lookup": (["-m", "bench.lookup_bench"],
               ["-m", "bench.lookup_bench", "--nodes", "8", "--values", "50", "--ksizes", "3"]),
}


def main(argv: list[str]) -> int:
    quick = "--quick" in argv
    env = dict(os.environ)
    if quick:  # a quick run proves the code runs; it must not overwrite the real figures
        env.setdefault("KELIPSFS_BENCH_RESULTS", tempfile.mkdtemp(prefix="kelipsfs-quick-"))
    names = [a for a in argv if not a.startswith("-")] or ["all"]
    wanted = list(PARTS) if names == ["all"] else names
    for name in wanted:
        if name not in PARTS:
            print(f"unknown part {name!r}; choose from all, {', '.join(PARTS)}", file=sys.stderr)
            return 2
        full, small = PARTS[name]
        print(f"## {name}{' (quick)' if quick else ''}", flush=True)
        result = subprocess.run([sys.executable, *(small if quick else full)], env=env)
        if result.returncode != 0:
            return result.returncode
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
