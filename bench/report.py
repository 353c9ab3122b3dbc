"""The combined benchmark report: one Markdown document and one JSON document for all parts.

    python -m bench report          # rebuild latest.md / latest.json from the parts' JSON

Each part writes its own JSON under the results directory (bench/results/, or
$KELIPSFS_BENCH_RESULTS); this module reads them back and writes ``latest.md`` (printed too)
and ``latest.json`` beside them: a header with the machine (CPUs, CPU model, kernel, OS,
Python), the date, the commit and the load average, then every part's table with its ratios,
built from its JSON only.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import chunk_bench, lookup_bench, metadata_bench, mount_bench, paper, sim_scale


def results_dir() -> Path:
    return Path(os.environ.get("KELIPSFS_BENCH_RESULTS", Path(__file__).parent / "results"))


def _mark(ok: bool) -> str:
    return "✔" if ok else "✘"


def _sim_section(rows: list[dict[str, Any]]) -> str:
    return "\n".join([
        sim_scale.table(rows), "",
        f"On paper, for the measured N (beside the measured values) and for "
        f"{', '.join(f'{n:,}' for n in paper.PAPER_SIZES)} nodes; **bold** is the formula's "
        "result, the terms before it are the formula's terms in order:", "",
        paper.table(rows), "", *paper.formulas()])


def poisson_upper(events: int, tail: float = 0.025) -> float:
    """Upper confidence bound of a Poisson mean after ``events`` were counted: the mean for
    which seeing ``events`` or fewer has probability ``tail`` (0.025: the two-sided 95 %
    interval's upper end). Bisection on the CDF: no scipy needed."""
    def cdf(mean: float) -> float:
        term = total = math.exp(-mean)
        for i in range(1, events + 1):
            term *= mean / i
            total += term
        return total

    low, high = float(events), float(events) + 10.0 * math.sqrt(events + 1) + 10.0
    for _ in range(100):
        middle = (low + high) / 2
        low, high = (middle, high) if cdf(middle) > tail else (low, middle)
    return high


def _fd_section(r: dict[str, Any]) -> str:
    p50, p99 = r["fd_detect_s_p50"], r["fd_detect_s_p99"]
    declared = r["false_positives"] / r["false_positive_rate"] if r["false_positive_rate"] \
        else None

    def detect(value: float | None, bound: float) -> tuple[str, str]:
        if value is None:
            return "– (no crash detected in this run)", f"≤ {bound:g} s"
        return f"{value} s", f"≤ {bound:g} s {_mark(value <= bound)}"

    (m50, t50), (m99, t99) = detect(p50, 5), detect(p99, 10)
    return "\n".join([
        f"N = {r['nodes']:,} (k = {r['groups']}), {r['loss']:.0%} datagram loss, "
        f"{r['churn_per_min_pct']:g} %/min churn, {r['duration_s']:,.0f} s measured.", "",
        "| figure | measured | target |", "|---|---|---|",
        f"| detection p50 ({r['fd_detections']:,} crash × observer pairs, {r['crashes']:,} "
        f"crashes) | {m50} | {t50} |",
        f"| detection p99 | {m99} | {t99} |",
        f"| false failure declarations | {r['false_positives']:,}"
        + (f" of {declared:,.0f} ({r['false_positive_rate']:.2%})" if declared else "")
        + " | 0, or a measured rate |",
        *_pair_rate(r),
        f"| lookup success / hops p99 | {r['lookup_success_rate']:.3%} ({r['lookups']:,} "
        f"lookups) / {r['hops_p99']} | |",
        f"| bytes per node per second | {r['bytes_per_node_per_s']:,.0f} | |",
        f"| objects lost ({r['repairs']:,} repairs) | {r['lost_objects']} | |"])


def _pair_rate(r: dict[str, Any]) -> list[str]:
    """The false declarations as a rate per monitored (observer, member) pair and hour, with
    its 95 % upper bound: the issue's "a measured rate with its bound". Pairs: every node
    watches the other members of its group, about N·(N/k − 1) pairs."""
    pairs = r["nodes"] * (r["nodes"] / r["groups"] - 1)
    hours = r["duration_s"] / 3600
    if pairs <= 0 or hours <= 0:
        return []
    exposure = pairs * hours
    rate, bound = r["false_positives"] / exposure, poisson_upper(r["false_positives"]) / exposure
    return [f"| … per monitored (observer, member) pair and hour | {rate:.2g} (95 % upper "
            f"bound {bound:.2g}, Poisson; ~{pairs:,.0f} pairs × {hours:.2g} h) "
            "| a rate with its bound ✔ |"]


def _node_section(doc: dict[str, Any]) -> str:
    g, big, rep = doc["get_4k_ms"], doc["large"], doc["repair"]
    return "\n".join([
        f"{doc.get('nodes', 5)} `kelipsfs node` processes on 127.0.0.x (k = 1, r = 3); "
        f"large transfers: median of {big.get('repeats', 1)}.", "",
        "| figure | kelipsfs | baseline (same run) | ratio | target |", "|---|---|---|---|---|",
        f"| `get` of 4 KiB, p50 / p99 | {g['p50']:.2f} / {g['p99']:.2f} ms | local read "
        f"{g['local_read_p50']:.3f} ms | | p50 ≤ 3 ms {_mark(g['p50'] <= 3)} |",
        f"| `kelipsfs put` of {big['mib']:,.0f} MiB | {big['put_mib_s']:,.0f} MiB/s | `cp` + "
        f"`sync` {big['cp_mib_s']:,.0f} MiB/s | {big['put_vs_cp']:.0%} | ≥ 40 % "
        f"{_mark(big['put_vs_cp'] >= 0.4)} |",
        *([f"| `kelipsfs put` of {big['mib']:,.0f} MiB | {big['put_mib_s']:,.0f} MiB/s | 3 × "
           f"`cp` + `sync` {big['cp3_mib_s']:,.0f} MiB/s (the r = 3 copies' work) | "
           f"{big['put_vs_cp3']:.0%} | |"] if "cp3_mib_s" in big else []),
        *([f"| `kelipsfs put` of {big['mib']:,.0f} MiB | {big['put_mib_s']:,.0f} MiB/s | plain "
           f"Python peers storing 3 verified, fsynced copies {big['plain3_mib_s']:,.0f} MiB/s "
           f"(`bench.plain_peers`) | {big['put_vs_plain3']:.0%} | |"]
          if "plain3_mib_s" in big else []),
        f"| `kelipsfs get` of {big['mib']:,.0f} MiB | {big['get_mib_s']:,.0f} MiB/s | `cp` + "
        f"`sync` {big['cp_mib_s']:,.0f} MiB/s | {big['get_vs_cp']:.0%} | ≥ 40 % "
        f"{_mark(big['get_vs_cp'] >= 0.4)} |",
        f"| kill -9 of a holder → r copies of its {rep['objects_on_victim']} objects | "
        f"{rep['seconds_to_r_copies']:.1f} s | | | ≤ 15 s "
        f"{_mark(rep['seconds_to_r_copies'] <= 15)} |"])


def _mount_section(doc: dict[str, Any]) -> str:
    repeats = f"median of {doc['repeat']} repeats" if doc.get("repeat", 1) > 1 else "one run"
    copies = doc.get("copies_3_nodes")
    return "\n".join([
        f"Local directory on the same disk, a one-node mount and a mount on a three-node "
        f"cluster (r = 3, k = 1), measured in turn in the same run ({repeats}); ratio = the "
        f"mount's speed / the local directory's."
        + (f" Copies of the big file on the three nodes, per repeat: "
           f"{', '.join(map(str, copies))}." if copies else ""), "",
        mount_bench.table(doc)])


def _metadata_section(doc: dict[str, Any]) -> str:
    repeats = f"median of {doc['repeat']} repeats" if doc.get("repeat", 1) > 1 else "one run"
    return "\n".join([
        f"Seconds, {doc['tarball']} and a clone of this repository, on a local directory, a "
        f"JuiceFS mount (sqlite3 metadata, local storage), a one-node kelipsfs mount and one on "
        f"a three-node cluster (r = 3), in turn in the same run ({repeats}). Goal: one node at "
        f"most JuiceFS's time, three nodes at most twice it.", "",
        metadata_bench.table(doc)])


def _chunks_section(doc: dict[str, Any]) -> str:
    return "\n".join([
        "Large files written in place, on a local directory, a JuiceFS mount (sqlite3 "
        "metadata, local storage), a one-node kelipsfs mount and one on a three-node cluster "
        "(r = 3), in turn in the same run. Goals: the 1-byte write sends at most two chunks and "
        "the manifest and takes at most 3x JuiceFS's time; sqlite3 at most 2x JuiceFS's; the "
        "sparse file under 10 MiB on disk cluster-wide.", "",
        chunk_bench.table(doc)])


def _lookup_section(doc: dict[str, Any]) -> str:
    return "\n".join([
        f"{doc['values']:,} values of {doc['value_size']:,} B, gets at {doc['rate_per_s']:g}/s "
        f"from a non-holder; then {doc['kill_share']:.0%} of the nodes killed, "
        f"{doc['detect_wait_s']:g} s wait, the same gets again. Second table: kelipsfs / "
        "Kademlia.", "", *lookup_bench.report(doc["runs"])])


@dataclass(frozen=True)
class Part:
    name: str
    title: str
    json_file: str
    full: tuple[str, ...]  # arguments after the interpreter
    quick: tuple[str, ...]
    render: Callable[[Any], str]


PARTS: dict[str, Part] = {p.name: p for p in (
    Part("sim", "Simulator: scale, and on paper", "sim_scale.json",
         ("-m", "bench.sim_scale", "scale", "--duration", "60"),
         ("-m", "bench.sim_scale", "scale", "--duration", "5", "--nodes", "50", "200"),
         _sim_section),
    Part("fd", "Simulator: failure detection", "sim_fd.json",
         ("-m", "bench.sim_scale", "fd", "--duration", "3600"),
         ("-m", "bench.sim_scale", "fd", "--duration", "10", "--nodes", "200"), _fd_section),
    Part("node", "Nodes: get latency, large put/get, repair", "node.json",
         ("-m", "bench.node_bench",),
         ("-m", "bench.node_bench", "--size-mib", "8", "--gets", "50", "--objects", "5"),
         _node_section),
    Part("mount", "Mount vs local directory", "mount.json",
         ("-m", "bench.mount_bench",),
         ("-m", "bench.mount_bench", "--size-mib", "8", "--files", "20", "--repeat", "1"),
         _mount_section),
    Part("metadata", "Small files and metadata vs JuiceFS", "metadata.json",
         ("-m", "bench.metadata_bench",), ("-m", "bench.metadata_bench", "--quick"),
         _metadata_section),
    Part("chunks", "Large files written in place vs JuiceFS", "chunks.json",
         ("-m", "bench.chunk_bench",), ("-m", "bench.chunk_bench", "--quick"),
         _chunks_section),
    Part("lookup", "Lookup vs Kademlia", "lookup.json",
         ("-m", "bench.lookup_bench",),
         ("-m", "bench.lookup_bench", "--nodes", "8", "--values", "50", "--ksizes", "3"),
         _lookup_section),
)}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _os_name() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return platform.system()


def _commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                              cwd=Path(__file__).parent).stdout.strip()
    try:
        head = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head}{' (with uncommitted changes)' if dirty else ''}" if head else "unknown"


def machine() -> dict[str, Any]:
    return {"nproc": len(os.sched_getaffinity(0)), "cpus": os.cpu_count(),
            "cpu_model": _cpu_model(), "kernel": platform.release(), "os": _os_name(),
            "python": platform.python_version(), "commit": _commit()}


def load_average() -> str:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


def build(ran: dict[str, int | None], mode: str, started: str, load_before: str,
          results: Path | None = None) -> tuple[str, dict[str, Any]]:
    """The report of the parts in ``ran`` (part -> exit code, None: not run now, read only)."""
    results = results or results_dir()
    m = machine()
    doc: dict[str, Any] = {"started": started, "finished": time.strftime("%Y-%m-%d %H:%M %Z"),
                           "mode": mode, "machine": m, "load_before": load_before,
                           "load_after": load_average(), "results_dir": str(results), "parts": {}}
    lines = [f"# kelipsfs benchmarks: {mode} run" if mode != "report" else
             "# kelipsfs benchmarks (rebuilt from the parts' JSON)", "",
             f"- date: {started} to {doc['finished']}",
             f"- machine: {m['nproc']} CPUs usable (nproc; {m['cpus']} online), "
             f"{m['cpu_model']}; Linux {m['kernel']}, {m['os']}; Python {m['python']}",
             f"- code: commit {m['commit']}",
             f"- load average (1/5/15 min) before: {load_before}, after: {doc['load_after']}",
             f"- results: {results}"]
    if mode == "quick":
        lines.append("- **quick run**: sizes small enough to prove every part executes; "
                     "the figures mean nothing")
    for name, code in ran.items():
        part = PARTS[name]
        command = "python " + " ".join(part.quick if mode == "quick" else part.full)
        lines += ["", f"## {part.title}", "", f"`{command}`" if mode != "report" else
                  f"JSON: `{part.json_file}`", ""]
        entry: dict[str, Any] = {"command": command if mode != "report" else None}
        doc["parts"][name] = entry
        path = results / part.json_file
        if code not in (0, None):
            entry["status"] = f"failed (exit {code})"
            lines.append(f"**Failed** (exit {code}): see the part's output above.")
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            entry["status"] = f"no results ({exc})"
            lines.append(f"No results: {exc}.")
            continue
        entry["status"] = "ok"
        entry["data"] = data
        if name == "sim":
            entry["paper"] = [paper.predict(r["nodes"], r.get("files")) for r in data] + \
                             [paper.predict(n) for n in paper.PAPER_SIZES]
        lines.append(part.render(data))
    return "\n".join(lines) + "\n", doc


def write(markdown: str, doc: dict[str, Any], results: Path | None = None) -> Path:
    results = results or results_dir()
    results.mkdir(parents=True, exist_ok=True)
    (results / "latest.md").write_text(markdown)
    (results / "latest.json").write_text(json.dumps(doc, indent=1))
    return results / "latest.md"


def rebuild(names: list[str] | None = None) -> int:
    """``python -m bench report``: every part whose JSON is present, nothing run."""
    results = results_dir()
    wanted = names or [n for n, p in PARTS.items() if (results / p.json_file).exists()]
    if not wanted:
        print(f"no part's JSON in {results}", file=sys.stderr)
        return 1
    started = time.strftime("%Y-%m-%d %H:%M %Z")
    markdown, doc = build(dict.fromkeys(wanted), "report", started, load_average(), results)
    path = write(markdown, doc, results)
    print(markdown, end="", flush=True)
    print(f"(written to {path} and {path.with_suffix('.json')})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(rebuild(sys.argv[1:] or None))
