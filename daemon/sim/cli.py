"""``kelipsfs sim``: run the simulator from the command line and print what it measured."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from daemon.core.balance import JOIN_CHOICES
from daemon.core.ids import ConfigError

from .engine import SimConfig, run

DEFINITIONS = """\
metrics (measured after --warmup; --json prints them as one JSON object on the last line):
  nodes, groups            N and the number of affinity groups k (default round(sqrt(N)))
  lookups                  lookups issued from random live nodes for objects whose last write
                           is at least --settle seconds old and of which a copy still exists
  lookup_success_rate      share of lookups that reached a live holder of the current version
  hops_p50, hops_p99       request/response exchanges that got an answer in one lookup (one to
                           a contact, one to a holder; 0 or 1 inside the own group)
  attempts_p99             requests sent in one lookup, including ones to dead or cut-off nodes
  lookup_latency_ms_*      time for the whole lookup over the virtual network (TCP model)
  fd_detect_s_p50, _p99    for each crash and each member of the crashed node's group that was
                           up at the time: seconds until that member declared it failed
  false_positives          declarations of failure about a node that was alive (declarations
                           across an active partition, and until t_cleanup + 10 s after it
                           heals, are counted apart as partition_declarations)
  false_positive_rate      false_positives / all failure declarations
  bytes_per_node_per_s     membership traffic (gossip, acks, joins, snapshots, a new node's
                           status requests to choose its id; incl. MAC and HTTP overhead) sent,
                           per live node per second
  data_bytes_per_node_per_s  lookup and placement requests/answers (object bytes not counted)
  state_entries_per_node_max  largest soft state seen on any node (members alive or failed,
                           contacts, file tuples, graveyard, up to 4 forgotten members kept
                           for partition healing; not the fixed 24-entry caches of candidate
                           and spare contacts), sampled every 10 s
  state_bound              3*sqrt(N) + files/k, the bound that state is checked against
  state_members_max        largest state without the file tuples (against 3*sqrt(N)) ...
  state_tuples_max         ... and the most file tuples on any node (against files/k)
  group_size_max           most live nodes in one group (mean N/k), sampled every 10 s
  convergence_s_after_heal seconds after a partition heals until every live node that was up
                           before it sees every such member of its group alive (null: no
                           partition)
  lost_objects             objects with no live copy of their current version at the end
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kelipsfs sim",
        description="Deterministic discrete-event simulation of a kelipsfs cluster: the real "
                    "protocol core on a virtual network with latency, loss, churn and partitions.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=DEFINITIONS)
    parser.add_argument("--nodes", type=int, required=True, help="number of nodes N")
    parser.add_argument("--duration", type=float, required=True,
                        help="simulated seconds measured after the warm-up")
    parser.add_argument("--churn", type=float, default=0.0, metavar="PER_MIN",
                        help="percent of nodes that crash per minute; each is replaced after "
                             "20-60 s by a restart on its data (half) or a new node (default 0)")
    parser.add_argument("--loss", type=float, default=0.0, metavar="FRACTION",
                        help="datagram loss probability on every link (default 0)")
    parser.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    parser.add_argument("--groups", type=int, default=None, help="k (default round(sqrt(N)))")
    parser.add_argument("--files", type=int, default=None, help="objects written (default N)")
    parser.add_argument("--lookups-per-s", type=float, default=20.0)
    parser.add_argument("--writes-per-s", type=float, default=2.0,
                        help="overwrites of existing objects per second")
    parser.add_argument("--warmup", type=float, default=20.0)
    parser.add_argument("--settle", type=float, default=5.0)
    parser.add_argument("--partition-at", type=float, default=None, metavar="SECONDS",
                        help="split the plane into two halves this long after the warm-up")
    parser.add_argument("--partition-for", type=float, default=60.0, metavar="SECONDS")
    parser.add_argument("--join-choices", type=int, default=JOIN_CHOICES, metavar="D",
                        help="candidate ids a new node weighs by their groups' sizes; 1 = a "
                             f"plain random id (default {JOIN_CHOICES})")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a protocol parameter (e.g. --set t_fail=5)")
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    return parser


def _overrides(pairs: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep:
            raise ConfigError(f"--set wants KEY=VALUE, got {pair!r}")
        try:
            value: Any = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out[key.strip()] = value
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.nodes < 2 or args.duration <= 0 or not 0 <= args.loss < 1 or args.churn < 0 \
            or args.join_choices < 1:
        print("kelipsfs sim: --nodes >= 2, --duration > 0, 0 <= --loss < 1, --churn >= 0, "
              "--join-choices >= 1", file=sys.stderr)
        return 2
    try:
        config = SimConfig(nodes=args.nodes, duration=args.duration, churn_per_min=args.churn,
                           loss=args.loss, seed=args.seed, k=args.groups, files=args.files,
                           lookups_per_s=args.lookups_per_s, writes_per_s=args.writes_per_s,
                           warmup=args.warmup, settle=args.settle, partition_at=args.partition_at,
                           partition_for=args.partition_for, join_choices=args.join_choices,
                           core=_overrides(args.set))
        config.core_config()
    except (ConfigError, TypeError) as exc:
        print(f"kelipsfs sim: {exc}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    result = run(config)
    result["wall_s"] = round(time.perf_counter() - started, 1)
    if args.json:
        print(json.dumps(result))
    else:
        print(summary(result))
    return 0


def summary(r: dict[str, Any]) -> str:
    lines = [
        f"kelipsfs sim: N={r['nodes']} k={r['groups']} {r['duration_s']:.0f} s simulated, "
        f"churn {r['churn_per_min_pct']}%/min, loss {r['loss']:.1%}, seed {r['seed']}",
        f"  lookups       {r['lookups']} ok {_pct(r['lookup_success_rate'])}  hops p50/p99 "
        f"{r['hops_p50']}/{r['hops_p99']}  attempts p99 {r['attempts_p99']}  latency p50/p99 "
        f"{r['lookup_latency_ms_p50']}/{r['lookup_latency_ms_p99']} ms",
        f"  detection     p50 {r['fd_detect_s_p50']} s  p99 {r['fd_detect_s_p99']} s over "
        f"{r['fd_detections']} (crash, observer) pairs; false positives {r['false_positives']}",
        f"  traffic       {r['bytes_per_node_per_s']} B/node/s membership, "
        f"{r['data_bytes_per_node_per_s']} B/node/s lookups",
        f"  state         max {r['state_entries_per_node_max']} entries/node "
        f"(mean {r['state_entries_per_node_mean']}, bound {r['state_bound']}); without "
        f"tuples {r['state_members_max']}, tuples {r['state_tuples_max']}, largest group "
        f"{r['group_size_max']}",
        f"  churn         {r['crashes']} crashes, {r['joins']} joins, {r['repairs']} repairs, "
        f"{r['lost_objects']} objects lost",
    ]
    if r["convergence_s_after_heal"] is not None:
        lines.append(f"  partition     converged {r['convergence_s_after_heal']} s after heal")
    lines.append(f"  wall time     {r.get('wall_s')} s")
    return "\n".join(lines)


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3%}"


if __name__ == "__main__":
    raise SystemExit(main())
