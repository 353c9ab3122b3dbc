"""Deterministic discrete-event simulation of N Kelips nodes over a virtual network.

Every node is the real ``daemon.core.KelipsNode``; this module only plays the role the trio
daemon plays in production -- delivering messages, running timers, storing object copies and
doing the data path (lookups, inserts, repair copies) -- against a virtual network and a virtual
clock. One seed gives one run, bit for bit.

Simplifications (stated so results are read correctly): a lookup or insert is evaluated against
the nodes' state at the instant it starts (its latency is computed, but state does not change
during those few milliseconds); object bytes are not modelled, only which version each node
holds; stream (TCP) messages are never lost, a loss costs a retransmission timeout instead.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from daemon.core import codec
from daemon.core.balance import JOIN_CHOICES, candidate_ids, census, least_loaded
from daemon.core.config import AUTH_TRAILER, CoreConfig, groups_for
from daemon.core.ids import NodeId, group_of_name, group_of_node
from daemon.core.messages import (
    Ack,
    Envelope,
    Gossip,
    Leave,
    MemberEntry,
    Message,
    Outgoing,
    Snapshot,
    TupleEntry,
)
from daemon.core.node import KelipsNode

from .network import VirtualNetwork
from .stats import percentile, rounded

HTTP_OVERHEAD = 200  # bytes of request line and headers around a stream message
LOOKUP_REQUEST = 260  # bytes: a lookup or placement request over HTTP
LOOKUP_TIMEOUT = 1.0  # seconds a requester waits for a host that does not answer
STATUS_ROW = 200  # bytes of one membership row in a status answer (JSON), for the join census
PORT = 7400

_TICK, _DELIVER, _CRASH, _JOIN, _LOOKUP, _WRITE, _SAMPLE, _SPLIT, _HEAL, _CONVERGE = range(10)


@dataclass
class SimConfig:
    nodes: int
    duration: float
    churn_per_min: float = 0.0  # percent of the nodes that crash (and are replaced) per minute
    loss: float = 0.0
    seed: int = 1
    k: int | None = None
    files: int | None = None
    lookups_per_s: float = 20.0
    writes_per_s: float = 2.0
    warmup: float = 20.0
    settle: float = 5.0  # a lookup targets objects whose last write is at least this old
    partition_at: float | None = None
    partition_for: float = 60.0
    join_choices: int = JOIN_CHOICES  # candidate ids a new node weighs (1: plain random ids)
    core: dict[str, Any] = field(default_factory=dict)

    def core_config(self) -> CoreConfig:
        k = self.k if self.k is not None else groups_for(self.nodes)
        return CoreConfig(k=k, **self.core)


class _Host:
    __slots__ = (
        "address",
        "crashed_at",
        "gen",
        "incarnation",
        "node",
        "node_id",
        "slot",
        "up_since",
    )

    def __init__(self, slot: int, node_id: NodeId, address: tuple[str, int]) -> None:
        self.slot = slot
        self.node: KelipsNode | None = None
        self.node_id = node_id
        self.address = address
        self.incarnation = 0
        self.gen = 0
        self.up_since = 0.0
        self.crashed_at: float | None = None


class Simulation:
    """One seeded run. ``run()`` returns the metrics dict described in ``kelipsfs sim --help``."""

    def __init__(self, config: SimConfig) -> None:
        self.cfg = config
        self.core = config.core_config()
        self.rng = random.Random(config.seed)
        self.net = VirtualNetwork(config.loss, random.Random(config.seed * 7919 + 1))
        self.hosts: list[_Host] = []
        self.by_addr: dict[tuple[str, int], _Host] = {}
        self.by_id: dict[NodeId, _Host] = {}
        self.live: list[_Host] = []
        self._live_pos: dict[int, int] = {}
        self.disks: dict[NodeId, dict[str, int]] = {}
        self.current: dict[str, int] = {}  # name -> clock of the last acknowledged write
        self.written_at: dict[str, float] = {}
        self.names: list[str] = []
        self.heap: list[tuple[float, int, int, Any, Any]] = []
        self.seq = 0
        self.now = 0.0
        self.tag = KelipsNode(self.core, b"\0" * 20, ("0.0.0.1", 1), 0, random.Random(0), 0).tag
        # metrics
        self.measure_from = config.warmup
        self.maint_bytes = 0
        self.data_bytes = 0
        self.node_seconds = 0.0
        self._alive_since_measure: dict[int, float] = {}
        self.lookups = 0
        self.lookup_ok = 0
        self.hops: list[int] = []
        self.attempts: list[int] = []
        self.latencies: list[float] = []
        self.writes = 0
        self.writes_acked = 0
        self.detect: list[float] = []
        self.false_positives = 0
        self.partition_declarations = 0
        self.declarations = 0
        self.crashes = 0
        self.joins = 0
        self.repairs = 0
        self.state_max = 0
        self.state_members_max = 0
        self.state_tuples_max = 0
        self.group_size_max = 0
        self.state_sum = 0
        self.state_samples = 0
        self.split_at: float | None = None
        self.healed_at: float | None = None
        self.converged_at: float | None = None
        self.lost_objects = 0
        self.failures: dict[str, int] = {}
        self._measuring = False

    # --- plumbing ------------------------------------------------------------------------------

    def push(self, at: float, kind: int, a: Any = None, b: Any = None) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (at, self.seq, kind, a, b))

    def _new_host(self, node_id: NodeId) -> _Host:
        slot = self.net.add_host()
        address = (f"10.{(slot >> 16) & 255}.{(slot >> 8) & 255}.{slot & 255}", PORT)
        host = _Host(slot, node_id, address)
        self.hosts.append(host)
        self.by_addr[address] = host
        self.by_id[node_id] = host
        self.disks.setdefault(node_id, {})
        return host

    def _start(self, host: _Host, now: float) -> KelipsNode:
        host.incarnation += 1
        host.gen += 1
        host.up_since = now
        node = KelipsNode(self.core, host.node_id, host.address, host.incarnation,
                          random.Random(self.rng.getrandbits(64)), now)
        host.node = node
        self._live_pos[host.slot] = len(self.live)
        self.live.append(host)
        if now >= self.measure_from:
            self._alive_since_measure[host.slot] = now
        self.push(node.next_deadline(), _TICK, host, host.gen)
        return node

    def _stop(self, host: _Host, now: float) -> None:
        host.node = None
        host.crashed_at = now
        pos = self._live_pos.pop(host.slot)
        last = self.live.pop()
        if last is not host:
            self.live[pos] = last
            self._live_pos[last.slot] = pos
        since = self._alive_since_measure.pop(host.slot, None)
        if since is not None:
            self.node_seconds += now - since

    def send(self, src: _Host, outs: list[Outgoing]) -> None:
        measuring = self.now >= self.measure_from
        for dest, message in outs:
            target = self.by_addr.get(dest)
            size = codec.message_size(message) + AUTH_TRAILER
            if isinstance(message, (Gossip, Ack, Leave)):
                delay = None if target is None else self.net.datagram_delay(src.slot, target.slot)
            else:
                size += HTTP_OVERHEAD
                delay = None if target is None else self.net.stream_delay(src.slot, target.slot)
                if delay is not None:
                    delay /= 2  # one direction of the exchange; the reply is its own message
            if measuring:
                self.maint_bytes += size
            if delay is not None and target is not None:
                self.push(self.now + delay, _DELIVER, target, message)

    def _after(self, host: _Host) -> None:
        """Drain a node's events into the metrics after every call into it."""
        node = host.node
        if node is None:
            return
        for event in node.drain_events():
            if event.kind == "failed":
                self._on_declared(host, event.node_id)

    def _on_declared(self, observer: _Host, subject_id: NodeId) -> None:
        now = self.now
        if now < self.measure_from:
            return
        self.declarations += 1
        subject = self.by_id[subject_id]
        node = observer.node
        assert node is not None
        member = node.members.get(subject_id)
        known_incarnation = member.incarnation if member is not None else -1
        if subject.node is None or known_incarnation < subject.incarnation:
            crashed_at = subject.crashed_at
            if crashed_at is not None and observer.up_since < crashed_at:
                self.detect.append(now - crashed_at)
            return
        if self._partition_excuses(observer, subject):
            self.partition_declarations += 1
        else:
            self.false_positives += 1

    def _partition_excuses(self, a: _Host, b: _Host) -> bool:
        if self.split_at is None:
            return False
        settle = self.core.t_cleanup + 10.0
        in_window = self.healed_at is None or self.now <= self.healed_at + settle
        return in_window and self.net.hosts[a.slot].side != self.net.hosts[b.slot].side

    # --- setup ---------------------------------------------------------------------------------

    def _bootstrap(self) -> None:
        """Start N nodes in the state a converged cluster has: own group plus c contacts.

        The nodes joined one after another, each choosing its id the way a new node does
        (``daemon.core.balance``) against the exact group sizes a converged cluster reports."""
        k = self.core.k
        groups: dict[int, list[_Host]] = {}
        for _ in range(self.cfg.nodes):
            candidates = candidate_ids(self.rng, self.cfg.join_choices)
            sizes = {g: len(groups.get(g, ())) for g in {group_of_node(c, k) for c in candidates}}
            host = self._new_host(least_loaded(candidates, k, sizes))
            groups.setdefault(group_of_node(host.node_id, k), []).append(host)
        for host in self.hosts:
            self._start(host, 0.0)
        entries = {h.slot: h.node.entry() for h in self.hosts if h.node is not None}
        c = self.core.contacts_per_group
        for host in self.hosts:
            node = host.node
            assert node is not None
            members: list[MemberEntry] = []
            for group, hosts in groups.items():
                if group == node.group:
                    members.extend(entries[h.slot] for h in hosts)
                else:
                    picked = self.rng.sample(hosts, min(c, len(hosts)))
                    members.extend(entries[h.slot] for h in picked)
            node.receive(0.0, Envelope(self.tag, k, Snapshot(node.entry(), tuple(members), ())))
            node.drain_events()

    def _seed_files(self) -> None:
        """Write the F objects, then give every member of each group the tuples of its group,
        as a converged cluster has them (like the membership in ``_bootstrap``): the figures
        are about a cluster holding F objects, not about the minute a bulk load of F objects
        takes to spread by gossip in groups of ~100 members (measured: ~60 s at 100 members
        and 100 tuples per group). Every later write spreads by gossip alone."""
        count = self.cfg.files if self.cfg.files is not None else self.cfg.nodes
        by_group: dict[int, list[TupleEntry]] = {}
        for i in range(count):
            name = f"obj/{i:07d}"
            self.names.append(name)
            t = self._write(name)
            if t is not None:
                by_group.setdefault(group_of_name(name, self.core.k), []).append(t)
        for host in self.live:
            node = host.node
            assert node is not None
            for t in by_group.get(node.group, ()):
                node.merge_tuple(self.now, t)

    # --- data path -----------------------------------------------------------------------------

    def _ask(self, src: _Host, dest: MemberEntry) -> tuple[_Host | None, float]:
        """One request/response from src to a node: (responder or None, time it took)."""
        target, delay = self._reach(src, dest)
        if target is not None and self.now >= self.measure_from:
            self.data_bytes += 2 * LOOKUP_REQUEST
        return target, delay

    def _reach(self, src: _Host, dest: MemberEntry) -> tuple[_Host | None, float]:
        target = self.by_addr.get(dest.address)
        if target is None or target.node is None or target.node_id != dest.node_id:
            return None, LOOKUP_TIMEOUT
        delay = self.net.stream_delay(src.slot, target.slot)
        if delay is None:
            return None, LOOKUP_TIMEOUT
        return target, delay

    def _holders_for(self, src: _Host, name: str) -> tuple[list[MemberEntry], int, int, float]:
        """Placement for a write: (holders, hops, attempts, seconds)."""
        node = src.node
        assert node is not None
        plan = node.plan_insert(name)
        if plan.local:
            return node.placement(name), 0, 0, 0.0
        target, attempts, spent = self._first_contact(src, plan.ask)
        if target is None:
            return [], 0, attempts, spent
        assert target.node is not None
        return target.node.placement(name), 1, attempts, spent

    def _first_contact(self, src: _Host, contacts: Sequence[MemberEntry]
                       ) -> tuple[_Host | None, int, float]:
        """Ask ``contacts`` in order until one answers: (it or None, attempts, seconds). The
        ones that do not answer are reported unreachable to the asking node's core."""
        assert src.node is not None
        spent = 0.0
        for attempts, contact in enumerate(contacts, 1):
            target, took = self._ask(src, contact)
            spent += took
            if target is not None:
                return target, attempts, spent
            src.node.report_unreachable(self.now, contact.node_id)
        return None, len(contacts), spent

    def _write(self, name: str) -> TupleEntry | None:
        """One write through a random node; the tuple if it was acknowledged."""
        if not self.live:
            return None
        writer = self.rng.choice(self.live)
        node = writer.node
        assert node is not None
        holders, _, _, _ = self._holders_for(writer, name)
        version = node.new_version(int(self.now * 1000))
        stored: list[_Host] = []
        for entry in holders:
            if entry.node_id == writer.node_id:
                stored.append(writer)
                continue
            target, _ = self._ask(writer, entry)
            if target is not None:
                stored.append(target)
        self.writes += 1
        if not stored:
            return None
        self.writes_acked += 1
        t = TupleEntry(name, version, 0, 4096, 0o644, int(self.now * 1e9), b"\x11" * 32,
                       tuple(sorted(h.node_id for h in stored)), False)
        for host in stored:
            self.disks[host.node_id][name] = version.clock
            assert host.node is not None
            host.node.record_write(self.now, t)
        # announced to the group as the daemon does (DataPlane.publish): by the writer when
        # the name is of its group, else by the first holder told
        announcer = writer if node.group_of(name) == node.group else stored[0]
        assert announcer.node is not None
        self.send(announcer, announcer.node.announce(self.now, t))
        self.current[name] = version.clock
        self.written_at[name] = self.now
        return t

    def _lookup(self) -> None:
        if not self.live or not self.names:
            return
        name = self.names[self.rng.randrange(len(self.names))]
        if self.now - self.written_at.get(name, -1e9) < self.cfg.settle:
            return
        if not self._object_survives(name):
            return  # every copy is gone: not a routing question (counted as lost_objects)
        src = self.rng.choice(self.live)
        node = src.node
        assert node is not None
        hops = attempts = 0
        spent = 0.0
        plan = node.plan_lookup(name, self.now)
        holders: list[MemberEntry] = []
        found = None
        if plan.local:
            found = plan.entry
            if found is not None:
                holders = node.live_holders(found)
        else:
            target, attempts, spent = self._first_contact(src, plan.ask)
            if target is not None:
                hops += 1
                assert target.node is not None
                answer = target.node.answer_lookup(name)
                found = answer.entry
                holders = node.fetch_order(answer.holders)
                if found is None and answer.candidates:
                    found, holders, more, tried, took = self._ask_candidates(
                        src, name, answer.candidates)
                    hops += more
                    attempts += tried
                    spent += took
        got = None
        if found is not None:
            for entry in holders:
                if entry.node_id == src.node_id:
                    got = self.disks[src.node_id].get(name)
                    if got is not None and got >= found.version.clock:
                        break
                    got = None
                    continue
                attempts += 1
                target, took = self._ask(src, entry)
                spent += took
                if target is None:
                    continue
                hops += 1
                have = self.disks[target.node_id].get(name)
                if have is not None and have >= found.version.clock:
                    got = have
                    break
        self.lookups += 1
        self.hops.append(hops)
        self.attempts.append(attempts)
        self.latencies.append(spent)
        if got is not None and got == self.current.get(name):
            self.lookup_ok += 1
        else:
            reason = ("no_contact" if not plan.local and hops == 0 else
                      "unknown_name" if found is None else
                      "no_live_holder" if got is None else "stale_version")
            self.failures[reason] = self.failures.get(reason, 0) + 1

    def _ask_candidates(self, src: _Host, name: str, candidates: tuple[MemberEntry, ...]
                        ) -> tuple[TupleEntry | None, list[MemberEntry], int, int, float]:
        """The contact did not know the name: ask the members a write would have chosen."""
        hops = attempts = 0
        spent = 0.0
        for entry in candidates:
            attempts += 1
            target, took = self._ask(src, entry)
            spent += took
            if target is None or target.node is None:
                continue
            hops += 1
            local = target.node.tuples.get(name)
            if local is not None:
                # The candidate is a holder answering with its tuple: the fetch is this hop.
                return local, [entry], hops - 1, attempts - 1, spent - took
        return None, [], hops, attempts, spent

    def _object_survives(self, name: str) -> bool:
        clock = self.current[name]
        return any(self.disks[h.node_id].get(name) == clock for h in self.live)

    def _repair(self, host: _Host) -> None:
        node = host.node
        assert node is not None
        for task in node.repair_tasks(self.now):
            have = self.disks[host.node_id].get(task.entry.name)
            if have is None or have < task.entry.version.clock:
                continue
            added = []
            for entry in task.targets:
                target, _ = self._ask(host, entry)
                if target is None:
                    continue
                self.disks[target.node_id][task.entry.name] = have
                added.append(target)
            if not added:
                continue
            self.repairs += 1
            updated = node.repair_done(self.now, task.entry, tuple(h.node_id for h in added))
            for target in added:
                assert target.node is not None
                target.node.record_write(self.now, updated)

    # --- churn and partitions ------------------------------------------------------------------

    def _crash(self) -> None:
        if len(self.live) <= 2:
            return
        host = self.rng.choice(self.live)
        self._stop(host, self.now)
        self.crashes += 1
        self.push(self.now + self.rng.uniform(20.0, 60.0), _JOIN, host)

    def _join(self, old: _Host) -> None:
        """Half the crashed hosts come back on their data; the rest are replaced by new nodes,
        which choose their id by the group sizes they learn through their seed."""
        restart = self.rng.random() < 0.5
        seed = self.rng.choice(self.live) if self.live else None
        if restart:
            host = old
        else:
            candidates = candidate_ids(self.rng, self.cfg.join_choices)
            chosen = candidates[0]
            if seed is not None and len(candidates) > 1:
                chosen = self._census(seed, candidates)
            host = self._new_host(chosen)
        node = self._start(host, self.now)
        self.joins += 1
        if seed is not None:
            self.send(host, [Outgoing(seed.address, node.join_request())])

    def _census(self, seed: _Host, candidates: list[NodeId]) -> NodeId:
        """What the daemon does at a first start: the seed's status, then one status from a
        contact of each candidate group the seed does not know the size of."""
        k = self.core.k
        node = seed.node
        assert node is not None
        contacts = {g: [m.entry() for m in node.live_contacts(g)]
                    for g in {group_of_node(c, k) for c in candidates}}
        self._count_status(node)
        sizes, ask = census(candidates, k, node.group, node.group_size(), contacts)
        for group, contact in ask.items():
            target, _ = self._reach(seed, contact)  # the newcomer's request, sent from the seed
            if target is not None and target.node is not None:
                self._count_status(target.node)
                sizes[group] = target.node.group_size()
        return least_loaded(candidates, k, sizes)

    def _count_status(self, node: KelipsNode) -> None:
        if self.now >= self.measure_from:
            self.maint_bytes += 2 * HTTP_OVERHEAD + STATUS_ROW * (len(node.members) + 1)

    def _converged(self) -> bool:
        """Every live node sees every live member of its group (up since before the heal)."""
        assert self.healed_at is not None
        groups: dict[int, set[NodeId]] = {}
        for host in self.live:
            if host.up_since <= self.healed_at and host.node is not None:
                groups.setdefault(host.node.group, set()).add(host.node_id)
        for host in self.live:
            node = host.node
            if node is None or host.up_since > self.healed_at:
                continue
            seen = {m.node_id for m in node.own_alive()}
            seen.add(host.node_id)
            if not groups[node.group] <= seen:
                return False
        return True

    # --- main loop -----------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        self._bootstrap()
        end = cfg.warmup + cfg.duration
        # The objects go in right after the start, so the cluster has settled by the first
        # sample (the contact budgets of the heavy groups trimmed: a few seconds).
        self.push(cfg.warmup / 20, _WRITE, True)
        if cfg.churn_per_min > 0:
            self.push(cfg.warmup / 2 + self._exp(self._crash_rate()), _CRASH)
        if cfg.lookups_per_s > 0:
            self.push(cfg.warmup + self._exp(cfg.lookups_per_s), _LOOKUP)
        if cfg.writes_per_s > 0:
            self.push(cfg.warmup + self._exp(cfg.writes_per_s), _WRITE, False)
        self.push(cfg.warmup, _SAMPLE)
        if cfg.partition_at is not None:
            self.push(cfg.warmup + cfg.partition_at, _SPLIT)
        heap = self.heap
        pop = heapq.heappop
        tag, k = self.tag, self.core.k
        while heap:
            at, _, kind, a, b = pop(heap)
            if at > end:
                break
            self.now = at
            if kind == _DELIVER:
                node = a.node
                if node is None:
                    continue
                outs = node.receive(at, Envelope(tag, k, b))
                if outs:
                    self.send(a, outs)
                if node.has_events:
                    self._after(a)
            elif kind == _TICK:
                node = a.node
                if node is None or a.gen != b:
                    continue
                outs = node.tick(at)
                if outs:
                    self.send(a, outs)
                self._after(a)
                self._repair(a)
                self.push(max(node.next_deadline(), at + 1e-4), _TICK, a, b)
            elif kind == _LOOKUP:
                self._lookup()
                self.push(at + self._exp(cfg.lookups_per_s), _LOOKUP)
            elif kind == _WRITE:
                if a:
                    self._seed_files()
                else:
                    if self.names:
                        self._write(self.names[self.rng.randrange(len(self.names))])
                    self.push(at + self._exp(cfg.writes_per_s), _WRITE, False)
            elif kind == _CRASH:
                self._crash()
                self.push(at + self._exp(self._crash_rate()), _CRASH)
            elif kind == _JOIN:
                self._join(a)
            elif kind == _SAMPLE:
                if not self._measuring:
                    self._measuring = True
                    self._alive_since_measure = {h.slot: at for h in self.live}
                self._sample()
                self.push(at + 10.0, _SAMPLE)
            elif kind == _SPLIT:
                self.net.split()
                self.split_at = at
                self.push(at + cfg.partition_for, _HEAL)
            elif kind == _HEAL:
                self.net.heal()
                self.healed_at = at
                self.push(at + 0.5, _CONVERGE)
            elif kind == _CONVERGE and self.converged_at is None:
                if self._converged():
                    self.converged_at = at
                else:
                    self.push(at + 0.5, _CONVERGE)
        self.now = end
        return self._report(end)

    def _crash_rate(self) -> float:
        return self.cfg.churn_per_min / 100.0 * self.cfg.nodes / 60.0

    def _exp(self, rate: float) -> float:
        return self.rng.expovariate(rate) if rate > 0 else math.inf

    def _sample(self) -> None:
        sizes: dict[int, int] = {}
        for host in self.live:
            node = host.node
            if node is None:
                continue
            n = node.state_entries()
            tuples = len(node.tuples)
            self.state_max = max(self.state_max, n)
            self.state_members_max = max(self.state_members_max, n - tuples)
            self.state_tuples_max = max(self.state_tuples_max, tuples)
            self.state_sum += n
            self.state_samples += 1
            sizes[node.group] = sizes.get(node.group, 0) + 1
        self.group_size_max = max(self.group_size_max, *sizes.values(), 0)

    def _report(self, end: float) -> dict[str, Any]:
        self.node_seconds += sum(end - since for since in self._alive_since_measure.values())
        self._alive_since_measure.clear()
        self.lost_objects = sum(1 for name in self.names if not self._object_survives(name))
        n = self.cfg.nodes
        files = len(self.names)
        k = self.core.k
        detect = self.detect
        fp_rate = self.false_positives / self.declarations if self.declarations else 0.0
        return {
            "nodes": n,
            "groups": k,
            "duration_s": self.cfg.duration,
            "churn_per_min_pct": self.cfg.churn_per_min,
            "loss": self.cfg.loss,
            "seed": self.cfg.seed,
            "files": files,
            "lookups": self.lookups,
            "lookup_success_rate": rounded(self.lookup_ok / self.lookups
                                           if self.lookups else None, 5),
            "lookup_failures": dict(sorted(self.failures.items())),
            "hops_p50": percentile(self.hops, 50),
            "hops_p99": percentile(self.hops, 99),
            "attempts_p99": percentile(self.attempts, 99),
            "lookup_latency_ms_p50": rounded(_ms(percentile(self.latencies, 50)), 2),
            "lookup_latency_ms_p99": rounded(_ms(percentile(self.latencies, 99)), 2),
            "writes": self.writes,
            "writes_acked": self.writes_acked,
            "fd_detect_s_p50": rounded(percentile(detect, 50)),
            "fd_detect_s_p99": rounded(percentile(detect, 99)),
            "fd_detections": len(detect),
            "false_positives": self.false_positives,
            "false_positive_rate": rounded(fp_rate, 6),
            "partition_declarations": self.partition_declarations,
            "crashes": self.crashes,
            "joins": self.joins,
            "repairs": self.repairs,
            "lost_objects": self.lost_objects,
            "bytes_per_node_per_s": rounded(self.maint_bytes / self.node_seconds
                                            if self.node_seconds else None, 1),
            "data_bytes_per_node_per_s": rounded(self.data_bytes / self.node_seconds
                                                 if self.node_seconds else None, 1),
            "state_entries_per_node_max": self.state_max,
            "state_entries_per_node_mean": rounded(self.state_sum / self.state_samples
                                                   if self.state_samples else None, 1),
            # the bound: own group N/k + 2 contacts per foreign group + F/k, k = sqrt(N)
            "state_bound": round(3 * math.sqrt(n) + files / k, 1),
            # its two parts apart: every entry but the tuples (against 3*sqrt(N)), the tuples
            # (against F/k: names are hashed onto groups, so the fullest group has more)
            "state_members_max": self.state_members_max,
            "state_tuples_max": self.state_tuples_max,
            "group_size_max": self.group_size_max,
            "convergence_s_after_heal": rounded(self.converged_at - self.healed_at
                                                if self.converged_at is not None
                                                and self.healed_at is not None else None, 2),
        }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000.0


def run(config: SimConfig) -> dict[str, Any]:
    return Simulation(config).run()


__all__ = ["Message", "SimConfig", "Simulation", "run"]
