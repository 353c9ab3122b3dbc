"""The benchmarks execute (quick sizes); their figures are never asserted in tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_benchmarks_run_quick(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "bench", "sim", "node", "mount", "--quick"],
                            capture_output=True, text=True, timeout=600,
                            env={**os.environ,
                                 "KELIPSFS_BENCH_RESULTS": str(tmp_path)})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    for name in ("sim_scale.json", "node.json", "mount.json"):
        assert (tmp_path / name).stat().st_size > 0
    assert "| figure |" in result.stdout


@pytest.mark.slow
def test_lookup_benchmark_runs_quick(tmp_path: Path) -> None:
    """kelipsfs vs Kademlia on a few processes each; only proves the part executes."""
    pytest.importorskip("kademlia")
    result = subprocess.run([sys.executable, "-m", "bench", "lookup", "--quick"],
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "KELIPSFS_BENCH_RESULTS": str(tmp_path)})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    doc = json.loads((tmp_path / "lookup.json").read_text())
    assert {run["system"] for run in doc["runs"]} == {"kelipsfs", "kademlia"}
    assert "| N | phase | system |" in result.stdout
