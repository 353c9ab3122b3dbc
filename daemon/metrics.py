"""Counters and gauges of one node, rendered in the Prometheus text format at /metrics."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

Labels = tuple[tuple[str, str], ...]

#: Counters without labels start at zero so that a scrape before the first event already shows them
#: (Prometheus' advice: a missing series is not the same as a zero one).
_UNLABELLED_COUNTERS = (
    "kelips_gossip_bytes_out_total",
    "kelips_gossip_bytes_in_total",
    "kelips_lookup_hops_total",
    "kelips_repairs_total",
)

_HELP = {
    "kelips_gossip_bytes_out_total": "Bytes of gossip datagrams sent.",
    "kelips_gossip_bytes_in_total": "Bytes of gossip datagrams received.",
    "kelips_rejected_packets_total": "Datagrams or requests dropped, by reason.",
    "kelips_lookups_total": "Lookups served to clients, by result.",
    "kelips_lookup_hops_total": "Request/response exchanges made by lookups.",
    "kelips_repairs_total": "Objects copied to restore the replication factor.",
    "kelips_puts_total": "Client puts, by result.",
    "kelips_reads_sent_to_holders_total": "Large reads answered with the holders to fetch from.",
    "kelips_puts_sent_to_holders_total": "Large uploads answered with the holders to send to.",
    "kelips_inline_reads_total": "Reads answered with the object inside the lookup datagram.",
    "kelips_member_events_total": "Membership events, by kind (joined, failed, revived, ...).",
    "kelips_members": "Known own-group members (including this node), by state.",
    "kelips_contacts": "Contacts in foreign groups.",
    "kelips_objects": "Objects stored on this node.",
}


class Metrics:
    """Labelled counters plus gauges computed on demand."""

    def __init__(self) -> None:
        self._counters: dict[tuple[str, tuple[tuple[str, str], ...]], float] = defaultdict(float)
        self._gauges: dict[str, Callable[[], dict[tuple[tuple[str, str], ...], float]]] = {}
        for name in _UNLABELLED_COUNTERS:
            self._counters[(name, ())] = 0.0

    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        self._counters[(name, tuple(sorted(labels.items())))] += amount

    def value(self, name: str, **labels: str) -> float:
        return self._counters.get((name, tuple(sorted(labels.items()))), 0.0)

    def gauge(self, name: str, read: Callable[[], dict[Labels, float]]) -> None:
        self._gauges[name] = read

    def render(self) -> str:
        lines: list[str] = []
        by_name: dict[str, list[tuple[tuple[tuple[str, str], ...], float]]] = defaultdict(list)
        for (name, labels), value in self._counters.items():
            by_name[name].append((labels, value))
        for name, read in self._gauges.items():
            by_name[name].extend(read().items())
        for name in sorted(by_name):
            kind = "counter" if name.endswith("_total") else "gauge"
            lines.append(f"# HELP {name} {_HELP.get(name, name)}")
            lines.append(f"# TYPE {name} {kind}")
            for labels, value in sorted(by_name[name]):
                label_text = ",".join(f'{k}="{v}"' for k, v in labels)
                suffix = f"{{{label_text}}}" if label_text else ""
                lines.append(f"{name}{suffix} {value:g}")
        return "\n".join(lines) + "\n"
