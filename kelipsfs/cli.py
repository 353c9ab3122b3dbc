"""The ``kelipsfs`` command: one entry point, one subcommand per job."""

from __future__ import annotations

import sys

USAGE = """usage: kelipsfs COMMAND [ARGS]

commands:
  sim        simulate a cluster of N nodes (see kelipsfs sim --help)
"""


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command == "sim":
        from daemon.sim.cli import main as sim_main
        return sim_main(rest)
    print(f"kelipsfs: unknown command {command!r}\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
