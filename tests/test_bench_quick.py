"""The benchmarks execute (quick sizes) and land in one report; their figures are never asserted.

One ``python -m bench all --quick`` run (every part, small) proves that each part runs, that
latest.md and latest.json are written where the quick run was told to, and that they hold every
part's table and data. Timings are read by people (bench/README.md), never by CI.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from bench import paper, report

RESULTS = Path(__file__).parent.parent / "bench" / "results"


@pytest.mark.slow
def test_all_quick_writes_one_report_with_every_part() -> None:
    with_kademlia = importlib.util.find_spec("kademlia") is not None
    parts = list(report.PARTS) if with_kademlia else [p for p in report.PARTS if p != "lookup"]
    env = {k: v for k, v in os.environ.items() if k != "KELIPSFS_BENCH_RESULTS"}
    result = subprocess.run([sys.executable, "-m", "bench", *parts, "--quick"],
                            capture_output=True, text=True, timeout=900, env=env)
    written = re.findall(r"^\(written to (.+)/latest\.md and ", result.stdout, re.M)
    assert written, result.stdout[-3000:] + result.stderr[-3000:]
    where = Path(written[-1]).resolve()
    # never over the committed results: a directory of its own under the temporary directory
    assert where.parent == Path(tempfile.gettempdir()).resolve(), where
    assert where.name.startswith("kelipsfs-quick-"), where
    try:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        _check_quick_report(where, parts, result.stdout)
    finally:
        shutil.rmtree(where, ignore_errors=True)


def _check_quick_report(where: Path, parts: list[str], stdout: str) -> None:
    markdown = (where / "latest.md").read_text()
    doc = json.loads((where / "latest.json").read_text())
    assert markdown in stdout  # printed as well as written
    assert markdown.startswith("# kelipsfs benchmarks: quick run")
    assert f"- machine: {len(os.sched_getaffinity(0))} CPUs usable" in markdown
    assert doc["mode"] == "quick" and doc["machine"]["python"]
    assert list(doc["parts"]) == parts
    for name in parts:
        part = report.PARTS[name]
        assert f"## {part.title}\n" in markdown
        assert doc["parts"][name]["status"] == "ok"
        assert doc["parts"][name]["data"] == json.loads((where / part.json_file).read_text())

    sim = doc["parts"]["sim"]
    assert [r["nodes"] for r in sim["data"]] == [50, 200]
    assert [p["nodes"] for p in sim["paper"]] == [50, 200, 100_000, 1_000_000]
    for row in ("| 50 | 7 |", "| 200 | 14 |", "| 100,000 | 316 |", "| 1,000,000 | 1,000 |"):
        assert row in markdown
    assert "datagrams + anti-entropy" in markdown and "| detection p50" in markdown
    assert "`kelipsfs put` of 8 MiB" in markdown

    mount = doc["parts"]["mount"]["data"]
    assert mount["copies_3_nodes"] == [3]  # r = 3 on three nodes: the 3-node case is real
    mount_rows = [line for line in markdown.splitlines()
                  if line.startswith(("| write 8 MiB", "| read 8 MiB", "| create 20 ", "| ls -l"))]
    assert len(mount_rows) == 4
    assert not any("not measured" in line for line in mount_rows)

    if "lookup" in parts:
        runs = doc["parts"]["lookup"]["data"]["runs"]
        assert {run["system"] for run in runs} == {"kelipsfs", "kademlia"}
        assert "| N | phase | system |" in markdown and "| N | phase | kelipsfs / |" in markdown


def test_report_rebuilds_from_the_committed_json(tmp_path: Path) -> None:
    """`python -m bench report` renders every part from JSON alone (old mount.json included)."""
    for part in report.PARTS.values():
        shutil.copy(RESULTS / part.json_file, tmp_path)
    (tmp_path / "mount.json").write_text(json.dumps(
        {key: value for key, value in json.loads((RESULTS / "mount.json").read_text()).items()
         if key != "mount3"}))
    result = subprocess.run([sys.executable, "-m", "bench", "report"], capture_output=True,
                            text=True, timeout=120,
                            env={**os.environ, "KELIPSFS_BENCH_RESULTS": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    markdown = (tmp_path / "latest.md").read_text()
    for part in report.PARTS.values():
        assert f"## {part.title}\n\nJSON: `{part.json_file}`" in markdown
    assert "| write 256 MiB (cp + sync) |" in markdown and "not measured" in markdown
    assert set(json.loads((tmp_path / "latest.json").read_text())["parts"]) == set(report.PARTS)


def test_bench_refuses_unknown_parts() -> None:
    result = subprocess.run([sys.executable, "-m", "bench", "nosuchpart", "--quick"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "nosuchpart" in result.stderr


def test_paper_figures_follow_their_formulas() -> None:
    """Only what the formulas say by construction: datagram traffic does not depend on N,
    anti-entropy and state grow with it, hops tend to 2."""
    rows = [paper.predict(n) for n in (100, 10_000, 1_000_000)]
    assert len({r["datagram_bytes_per_s"] for r in rows}) == 1
    assert rows[0]["anti_entropy_bytes_per_s"] < rows[1]["anti_entropy_bytes_per_s"] \
        < rows[2]["anti_entropy_bytes_per_s"]
    for r in rows:
        assert r["state"] == pytest.approx(r["group"] - 1 + r["contacts"] + r["tuples"])
        assert 1.8 < r["hops"] < 2.0
    assert rows[2]["k"] == 1000 and rows[2]["state"] == pytest.approx(999 + 1998 + 1000)


@pytest.mark.parametrize(("events", "upper"), [(0, 3.689), (1, 5.572), (8, 15.763), (16, 25.983)])
def test_poisson_upper_bound_matches_the_tables(events: int, upper: float) -> None:
    """The false-declaration rate's bound: the two-sided 95 % upper end of a Poisson mean
    (Garwood's exact interval: 3.689 for 0 events, 5.572 for 1, 15.763 for 8)."""
    assert report.poisson_upper(events) == pytest.approx(upper, abs=1e-3)


def test_the_fd_section_gives_false_declarations_as_a_rate_with_its_bound() -> None:
    run = {"nodes": 1000, "groups": 32, "duration_s": 3600.0, "loss": 0.05,
           "churn_per_min_pct": 1.0, "fd_detect_s_p50": 4.5, "fd_detect_s_p99": 6.0,
           "fd_detections": 100, "crashes": 10, "false_positives": 8,
           "false_positive_rate": 8 / 17621, "lookup_success_rate": 1.0, "lookups": 10,
           "hops_p99": 2, "bytes_per_node_per_s": 6000.0, "repairs": 0, "lost_objects": 0}
    text = report._fd_section(run)
    pairs = 1000 * (1000 / 32 - 1)
    assert f"{8 / pairs:.2g} (95 % upper bound {15.763 / pairs:.2g}, Poisson" in text


def test_a_p99_of_fewer_than_100_gets_is_not_judged() -> None:
    """With fewer than 100 gets a nearest-rank p99 is the largest of them: the lookup report
    judges the p50 alone there and says so; with enough gets on both sides it judges both."""
    from bench import lookup_bench

    def row(gets: int, p50: float, p99: float) -> dict[str, object]:
        return {"gets": gets, "p50_ms": p50, "p99_ms": p99}

    assert lookup_bench._latency_mark(row(1000, 1.0, 2.5), row(53, 1.2, 1.8)) \
        == "✔ (p50; p99 of 53 gets not judged)"
    assert lookup_bench._latency_mark(row(1000, 1.0, 2.5), row(1000, 1.2, 1.8)) == "✘"
    assert lookup_bench._latency_mark(row(1000, 1.0, 1.5), row(1000, 1.2, 1.8)) == "✔"
    assert lookup_bench._pct([float(i) for i in range(53)], 99) == 52.0  # the maximum
