"""Scale on paper: state, bandwidth and hops per node, from the protocol's own parameters.

    python -m bench.paper [--nodes 100 1000 10000 100000 1000000] [--measured sim_scale.json]

Nothing here is guessed or copied: the parameters are ``CoreConfig()``'s defaults
(daemon/core/config.py), the wire sizes are the codec's (daemon/core/codec.py), the per-message
constants are the node's (daemon/core/node.py) and the simulator's (HTTP overhead, object names
and checksums), all imported. Assumptions, the simulator's scenario: k = round(√N), F = N
objects, r copies, names of 11 bytes (``obj/NNNNNNN``), 32-byte checksums, no churn.

- **state** = (N/k − 1) own-group members + c·(k − 1) contacts + F/k tuples.
- **bandwidth** (bytes sent per node per second) = datagrams + anti-entropy, where
  datagrams = (fanout·D + P + A·(1 + fanout·p_ack)) / T_gossip: every round sends ``fanout``
  gossip datagrams of at most D bytes (full in practice: cold tuples fill what heartbeats
  leave), one probe P to a contact, an ack A to the probe it receives on average and to the
  gossip that asks for one (p_ack); anti-entropy = 2·S / T_ae: every node pushes its snapshot
  S (alive members and the group's tuples, over HTTP) to one group member every T_ae and
  answers one such push on average. The datagram part does not depend on N; S grows as
  3·√N entries + F/k tuples, so the total does, slowly.
- **hops** = 2·(1 − 1/k) + (1/k)·(1 − r/(N/k)): a name of a foreign group costs one exchange
  with a contact and one with a holder; a name of the own group one with a holder, none when
  this node holds it.
- **heartbeat digests per datagram** against the group size: the failure detector's figures
  (detection time, false positives) are only measured where a datagram carries a digest of
  every member of the group; beyond that no formula here predicts them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from daemon.core import codec
from daemon.core import node as core_node
from daemon.core.config import AUTH_TRAILER, CoreConfig, groups_for
from daemon.core.ids import NODE_ID_BYTES
from daemon.core.messages import MemberEntry, Snapshot, TupleEntry, Version
from daemon.sim.engine import HTTP_OVERHEAD

PAPER_SIZES = (100_000, 1_000_000)
SIM_NAME = "obj/0000000"  # the simulator's object names (daemon/sim/engine.py)
CHECKSUM_BYTES = 32  # the content digest (daemon.digest.DIGEST_SIZE)


def tuple_bytes(replication: int) -> int:
    """Encoded size of one of the simulator's file tuples with ``replication`` holders."""
    node_id = b"\0" * NODE_ID_BYTES
    entry = TupleEntry(SIM_NAME, Version(0, node_id), 0, 4096, 0o644, 0,
                       b"\0" * CHECKSUM_BYTES, (node_id,) * replication, False)
    return codec.tuple_size(entry)


def datagram_sizes(cfg: CoreConfig) -> dict[str, int]:
    """Bytes on the wire (MAC trailer included) of a full gossip, a probe and an ack."""
    return {"gossip": cfg.max_datagram,
            "probe": codec.gossip_size(core_node._PROBE_ENTRIES, 0, 0) + AUTH_TRAILER,
            "ack": codec.ACK_SIZE + AUTH_TRAILER}


def digest_slots(cfg: CoreConfig, contacts: int, hot_tuples: bool = False) -> int:
    """Heartbeat digests one gossip datagram carries when no member is new
    (node._build_own_message): the budget less the contact entries and the rotating full
    own-group entries (and, while tuples change, less their reserve), in digests."""
    whole = cfg.max_datagram - AUTH_TRAILER - codec.GOSSIP_OVERHEAD
    foreign = min(contacts, int(whole * cfg.foreign_share) // codec.MEMBER_SIZE)
    budget = whole - codec.MEMBER_SIZE * (foreign + core_node._ROTATING_FULL)
    if hot_tuples:
        budget -= int(whole * cfg.tuple_share)
    return budget // codec.BEAT_SIZE


def snapshot_fixed_bytes() -> int:
    """A snapshot's bytes besides its entries: header, sender, MAC trailer, HTTP overhead."""
    empty = Snapshot(MemberEntry(b"\0" * NODE_ID_BYTES, "", 0, 0, 0), (), ())
    return codec.message_size(empty) + AUTH_TRAILER + HTTP_OVERHEAD


def predict(n: int, files: int | None = None, cfg: CoreConfig | None = None) -> dict[str, Any]:
    """Every paper figure for N = n (F = n objects unless given)."""
    cfg = cfg or CoreConfig()
    f_objects = n if files is None else files
    k = groups_for(n)
    group = n / k
    c = cfg.contacts_per_group
    contacts = c * (k - 1)
    tuples = f_objects / k
    t_bytes = tuple_bytes(cfg.replication)
    sizes = datagram_sizes(cfg)
    fanout = cfg.fanout
    p_ack = cfg.rtt_refresh_probability
    per_round = (fanout * sizes["gossip"] + sizes["probe"]
                 + sizes["ack"] * (1 + fanout * p_ack))
    datagrams = per_round / cfg.gossip_interval
    snapshot = (snapshot_fixed_bytes()
                + codec.MEMBER_SIZE * (group - 1 + contacts) + t_bytes * tuples)
    anti_entropy = 2 * snapshot / cfg.anti_entropy_interval
    holds = min(1.0, cfg.replication / group)
    return {
        "nodes": n, "k": k, "files": f_objects, "group": group, "contacts": contacts,
        "tuples": tuples, "tuple_bytes": t_bytes,
        "state": group - 1 + contacts + tuples,
        "datagram_bytes_per_s": datagrams, "snapshot_bytes": snapshot,
        "anti_entropy_bytes_per_s": anti_entropy,
        "bytes_per_node_per_s": datagrams + anti_entropy,
        "hops": 2 * (1 - 1 / k) + (1 / k) * (1 - holds),
        "digest_slots": digest_slots(cfg, contacts),
        "parameters": {"fanout": fanout, "gossip_interval_s": cfg.gossip_interval,
                       "max_datagram": sizes["gossip"], "probe_bytes": sizes["probe"],
                       "ack_bytes": sizes["ack"], "p_ack": p_ack, "contacts_per_group": c,
                       "replication": cfg.replication,
                       "anti_entropy_interval_s": cfg.anti_entropy_interval,
                       "member_bytes": codec.MEMBER_SIZE, "beat_bytes": codec.BEAT_SIZE},
    }


def formulas(cfg: CoreConfig | None = None) -> list[str]:
    """The formulas with this configuration's numbers in them, for the report."""
    cfg = cfg or CoreConfig()
    s = datagram_sizes(cfg)
    p = predict(100, cfg=cfg)
    rare = (s["probe"] / core_node._DEPARTED_EVERY
            + cfg.explore_probability * (s["probe"] + s["ack"])) / cfg.gossip_interval
    return [
        f"- state = (N/k − 1) members + c·(k − 1) contacts + F/k tuples; c = "
        f"{cfg.contacts_per_group}, k = round(√N), F = N (the simulator's scenario).",
        f"- bandwidth = datagrams + anti-entropy. Datagrams = (fanout·D + P + A·(1 + fanout·"
        f"p_ack)) / T_gossip = ({cfg.fanout}·{s['gossip']:,} + {s['probe']} + {s['ack']}·(1 + "
        f"{cfg.fanout}·{cfg.rtt_refresh_probability:g})) / {cfg.gossip_interval:g} s = "
        f"{p['datagram_bytes_per_s']:,.0f} B/s for every N. Anti-entropy = 2·S / "
        f"{cfg.anti_entropy_interval:g} s with the snapshot S = "
        f"{codec.MEMBER_SIZE}·(N/k − 1 + c·(k − 1)) + {p['tuple_bytes']}·F/k + "
        f"{snapshot_fixed_bytes()} bytes (member entries, tuples, header + MAC + HTTP). "
        "Left out: pushes to joining nodes (1 %/min churn: S/6,000 per node per second), "
        f"probes of forgotten members and of contact candidates (≤ {rare:.0f} B/s, only "
        "while there are any), pull replies (only after 2 silent rounds).",
        "- hops = 2·(1 − 1/k) + (1/k)·(1 − r·k/N): contact + holder for a foreign group's "
        "name, the holder alone in the own group (none when this node holds a copy).",
        f"- digests/datagram: heartbeat digests ({codec.BEAT_SIZE} B) one gossip datagram "
        f"carries beside {core_node._ROTATING_FULL} rotating full entries and its share of "
        f"contact entries, with no tuple changing (as few as {digest_slots(cfg, 1, True)} "
        "while tuples change). A group larger than that no longer hears every heartbeat "
        "in every message.",
    ]


def _num(x: float) -> str:
    return f"{x:,.0f}" if abs(x - round(x)) < 0.05 or x >= 100 else f"{x:,.1f}"


def _opt(x: object) -> str:
    return "–" if x is None else str(x)


def table(measured: list[dict[str, Any]], sizes: tuple[int, ...] = PAPER_SIZES,
          cfg: CoreConfig | None = None) -> str:
    """Paper rows for every measured N (beside the measured value) and for ``sizes``."""
    hops_p99 = max((r["hops_p99"] for r in measured if r.get("hops_p99") is not None),
                   default=None)
    out = ["| N | k | state = (N/k−1) + c(k−1) + F/k | measured mean / max | "
           "B/node/s = datagrams + anti-entropy | measured | hops (formula) | measured "
           "p50/p99 | digests/datagram vs group | detection p50/p99 |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    rows = [(r["nodes"], r) for r in measured] + [(n, None) for n in sizes]
    for n, m in rows:
        files = m.get("files") if m else None
        p = predict(n, files, cfg)
        state = (f"{_num(p['group'] - 1)} + {_num(p['contacts'])} + {_num(p['tuples'])} = "
                 f"**{_num(p['state'])}**")
        bw = (f"{p['datagram_bytes_per_s']:,.0f} + {p['anti_entropy_bytes_per_s']:,.0f} = "
              f"**{p['bytes_per_node_per_s']:,.0f}**")
        fits = p["digest_slots"] >= p["group"] - 1
        digests = f"{p['digest_slots']} {'≥' if fits else '<'} {_num(p['group'] - 1)} " \
                  f"{'✔' if fits else '✘'}"
        if m:
            cells = [f"{m['state_entries_per_node_mean']} / {m['state_entries_per_node_max']}",
                     f"{m['bytes_per_node_per_s']:,.0f}",
                     f"{m['hops_p50']}/{m['hops_p99']}",
                     f"{_opt(m['fd_detect_s_p50'])}/{_opt(m['fd_detect_s_p99'])} s"]
        else:
            cells = ["(not run)", "(not run)",
                     f"–/{hops_p99} (p99 of the measured runs)" if hops_p99 else "–",
                     "not derived" + ("" if fits else " (group outgrows the digests)")]
        out.append(f"| {n:,} | {p['k']:,} | {state} | {cells[0]} | {bw} | {cells[1]} | "
                   f"{p['hops']:.3f} | {cells[2]} | {digests} | {cells[3]} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Scale figures on paper (see module doc).")
    parser.add_argument("--nodes", type=int, nargs="+", default=list(PAPER_SIZES))
    parser.add_argument("--measured", type=Path, default=None,
                        help="a sim_scale.json whose rows are checked against the formulas")
    args = parser.parse_args(argv)
    measured = json.loads(args.measured.read_text()) if args.measured else []
    print(table(measured, tuple(args.nodes)))
    print()
    print("\n".join(formulas()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
