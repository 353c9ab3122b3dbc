"""Simulator figures for bench/README.md: scale (N = 100, 1,000, 10,000) and failure detection.

    python -m bench.sim_scale scale [--duration S] [--seed S]
    python -m bench.sim_scale fd [--duration S] [--seed S]

Each run is one ``kelipsfs sim`` invocation (same code path as the CLI); results are printed as
a Markdown table and written as JSON under bench/results/. The bytes-per-node flatness ratio is
computed against the N = 100 run of the same invocation. The same figures on paper (and for
100,000 and 1,000,000 nodes): bench/paper.py, printed beside these by ``python -m bench sim``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path
from typing import Any

from daemon.sim.engine import SimConfig, run

RESULTS = Path(os.environ.get("KELIPSFS_BENCH_RESULTS", Path(__file__).parent / "results"))


def scale(duration: float, seed: int, sizes: list[int]) -> list[dict[str, Any]]:
    rows = []
    for n in sizes:
        started = time.perf_counter()
        r = run(SimConfig(nodes=n, duration=duration, churn_per_min=1.0, loss=0.01, seed=seed))
        r["wall_s"] = round(time.perf_counter() - started, 1)
        r["command"] = (f"kelipsfs sim --nodes {n} --duration {duration:g} --churn 1 "
                        f"--loss 0.01 --seed {seed} --json")
        rows.append(r)
        print(json.dumps(r), flush=True)
    return rows


def fd(duration: float, seed: int, nodes: int) -> dict[str, Any]:
    started = time.perf_counter()
    r = run(SimConfig(nodes=nodes, duration=duration, churn_per_min=1.0, loss=0.05, seed=seed))
    r["wall_s"] = round(time.perf_counter() - started, 1)
    r["command"] = (f"kelipsfs sim --nodes {nodes} --duration {duration:g} --churn 1 "
                    f"--loss 0.05 --seed {seed} --json")
    print(json.dumps(r), flush=True)
    return r


def table(rows: list[dict[str, Any]]) -> str:
    base = rows[0]["bytes_per_node_per_s"]
    out = ["| N | k | lookups | success | hops p50/p99 | detect p50/p99 (s) | false pos. | "
           f"B/node/s | vs N={rows[0]['nodes']} | state max/mean (bound) | "
           "max without tuples (3√N) | max tuples (F/k) | largest group (N/k) |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        n, k = r["nodes"], r["groups"]
        out.append(
            f"| {n:,} | {k} | {r['lookups']:,} | "
            f"{r['lookup_success_rate']:.2%} | {r['hops_p50']}/{r['hops_p99']} | "
            f"{r['fd_detect_s_p50']}/{r['fd_detect_s_p99']} | {r['false_positives']} | "
            f"{r['bytes_per_node_per_s']:,.0f} | {r['bytes_per_node_per_s'] / base:.2f} | "
            f"{r['state_entries_per_node_max']}/{r['state_entries_per_node_mean']} "
            f"({r['state_bound']}) | {r.get('state_members_max', '–')} "
            f"({3 * math.sqrt(n):.1f}) | {r.get('state_tuples_max', '–')} "
            f"({r['files'] / k:.1f}) | {r.get('group_size_max', '–')} ({n / k:.1f}) |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=["scale", "fd"])
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--nodes", type=int, nargs="*", default=None)
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    if args.what == "scale":
        rows = scale(args.duration, args.seed, args.nodes or [100, 1000, 10000])
        (RESULTS / "sim_scale.json").write_text(json.dumps(rows, indent=1))
        print(table(rows))
    else:
        r = fd(args.duration, args.seed, (args.nodes or [1000])[0])
        (RESULTS / "sim_fd.json").write_text(json.dumps(r, indent=1))


if __name__ == "__main__":
    main()
