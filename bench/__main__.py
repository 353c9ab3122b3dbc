"""One entry point for the benchmarks.

    python -m bench [all|sim|fd|node|mount|lookup ...] [--quick|--full]
    python -m bench report [PART ...]

Runs the parts named (``all``, the default: every part, in the order above), each as its own
process that prints its table and writes its JSON; then builds the report of the parts that ran
(bench/report.py): Markdown printed to stdout and written to ``latest.md``, and ``latest.json``
combining every part's JSON, beside the parts' JSON. A part that fails is reported as failed;
the others still run, and the exit status is the first failure's.

``--full`` (the default) writes under bench/results/. ``--quick`` runs every part small enough
to prove it executes (what CI calls) and writes under a new temporary directory, never over
the committed results ($KELIPSFS_BENCH_RESULTS, when set, is used for both). ``report``
rebuilds latest.md / latest.json from the JSON already there (every part found), running nothing.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

from bench import report


def main(argv: list[str]) -> int:
    unknown = [a for a in argv if a.startswith("-") and a not in ("--quick", "--full")]
    names = [a for a in argv if not a.startswith("-")] or ["all"]
    if names[0] == "report" and not unknown:
        return report.rebuild(names[1:] or None)
    wanted = list(report.PARTS) if names == ["all"] else names
    bad = [n for n in wanted if n not in report.PARTS] + unknown
    if bad or ("--quick" in argv and "--full" in argv):
        print(f"usage: python -m bench [all|{'|'.join(report.PARTS)} ...] [--quick|--full]"
              f" | report [PART ...]  (not understood: {' '.join(bad) or '--quick --full'})",
              file=sys.stderr)
        return 2
    quick = "--quick" in argv
    if quick and "KELIPSFS_BENCH_RESULTS" not in os.environ:
        # a quick run proves the code runs; it must not overwrite the real figures
        os.environ["KELIPSFS_BENCH_RESULTS"] = tempfile.mkdtemp(prefix="kelipsfs-quick-")
    results = report.results_dir()
    started = time.strftime("%Y-%m-%d %H:%M %Z")
    load_before = report.load_average()
    ran: dict[str, int | None] = {}
    for name in wanted:
        part = report.PARTS[name]
        print(f"## {name}{' (quick)' if quick else ''}", flush=True)
        ran[name] = subprocess.run([sys.executable, *(part.quick if quick else part.full)]
                                   ).returncode
    markdown, doc = report.build(ran, "quick" if quick else "full", started, load_before,
                                 results)
    path = report.write(markdown, doc, results)
    print(f"\n{markdown}\n(written to {path} and {path.with_suffix('.json')})", flush=True)
    return next((code for code in ran.values() if code), 0)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
