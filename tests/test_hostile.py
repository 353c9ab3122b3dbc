"""Hostile conditions on real hosts: each test builds a lab of namespaced hosts (tests/netlab.py).

Every test runs in its own ``unshare --net --mount`` (see ``lab_test``), undoes its faults and
kills its processes whatever happens, and prints its measurements as ``LAB-RESULT`` lines.
"""

from __future__ import annotations

import functools
import random
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon.core.manifest import CHUNK_SIZE
from daemon.digest import digest_of
from kelipsfs.client import Client as ClientT
from kelipsfs.client import ClientError
from tests.netlab import Host, Lab, fetch, lab_test, report

pytestmark = [pytest.mark.lab, pytest.mark.slow]

T_FAIL = 4.0
T_CLEANUP = 2 * T_FAIL
GOSSIP = 0.5
HEARTBEAT = 1.0
#: Detection bound: T_fail after the last heartbeat rise (up to one heartbeat interval before the
#: crash), plus a few gossip periods to spread, plus the 0.25 s polling step.
DETECT_BOUND = T_FAIL + HEARTBEAT + 4 * GOSSIP + 0.5
#: Size of the files stored in chunks here (three chunks, in one object).
CHUNKED = 2 * CHUNK_SIZE + 7


def _members(lab: Lab, host: Host) -> dict[str, dict[str, Any]]:
    return {m["address"]: m for m in lab.status(host)["members"]}


def _all_alive(lab: Lab, hosts: list[Host]) -> bool:
    want = {h.address for h in hosts}
    for host in hosts:
        members = _members(lab, host)
        if not want <= set(members) or any(members[a]["state"] != "alive" for a in want):
            return False
    return True


def _payloads(seed: int, count: int, prefix: str) -> dict[str, bytes]:
    rng = random.Random(seed)
    return {f"{prefix}/f{i:03d}": rng.randbytes(rng.randrange(1, 8192)) for i in range(count)}


def _assert_all_readable(lab: Lab, hosts: list[Host], files: dict[str, bytes]) -> None:
    items = [(host, name) for host in hosts for name in files]
    results = lab.get_many(items)
    bad = [(h.ns, n, r) for (h, n), r in zip(items, results, strict=True)
           if r != files[n]]
    assert not bad, f"{len(bad)} of {len(items)} reads wrong, e.g. {bad[:3]}"


def _start_with_files(lab: Lab, seed: int, count: int, prefix: str) -> dict[str, bytes]:
    """Start every host, wait for full membership, put ``count`` files spread over the hosts."""
    lab.start_all()
    lab.wait_for(lambda: _all_alive(lab, lab.hosts), 30, "every member alive everywhere")
    files = _payloads(seed, count, prefix)
    n = len(lab.hosts)
    results = lab.put_many([(lab.hosts[i % n], name, data)
                            for i, (name, data) in enumerate(files.items())])
    failed = [r for r in results if isinstance(r, Exception)]
    assert not failed, f"{len(failed)} puts failed: {failed[:3]}"
    return files


def _stored_copies(lab: Lab, hosts: list[Host]) -> int:
    return sum(lab.status(h)["members"][0]["objects"] for h in hosts)


@lab_test(timeout=420)
def test_kill_one_of_five_hosts_loses_nothing(tmp_path: Path) -> None:
    with Lab(tmp_path, hosts=5, settings=["k=1"]) as lab:
        started = time.monotonic()
        files = _start_with_files(lab, 1, 500, "s1")
        # and files stored in chunks: each is its manifest and one object of three chunks
        chunked = {f"s1/chunked{i}": random.Random(i).randbytes(CHUNKED + i) for i in range(5)}
        results = lab.put_many([(lab.hosts[i], name, data)
                                for i, (name, data) in enumerate(chunked.items())])
        assert not [r for r in results if isinstance(r, Exception)], results
        files |= chunked
        objects = len(files) + len(chunked)
        put_seconds = time.monotonic() - started  # start and membership included
        lab.wait_for(lambda: _stored_copies(lab, lab.hosts) == 3 * objects, 60,
                     "three copies of every file")

        victim = random.Random().choice(lab.hosts)
        survivors = [h for h in lab.hosts if h is not victim]
        killed_at = time.monotonic()
        lab.kill(victim)
        failed_after: dict[int, float] = {}
        removed_after: dict[int, float] = {}
        while len(removed_after) < len(survivors) and time.monotonic() - killed_at < 40:
            for host in survivors:
                entry = _members(lab, host).get(victim.address)
                now = time.monotonic() - killed_at
                if entry is None or entry["state"] == "failed":
                    failed_after.setdefault(host.index, now)
                if entry is None:
                    removed_after.setdefault(host.index, now)
            time.sleep(0.25)
        assert len(removed_after) == len(survivors), (failed_after, removed_after)
        assert max(failed_after.values()) <= DETECT_BOUND, failed_after
        # forgotten T_cleanup after the last heartbeat rise, which was up to one interval before
        assert min(removed_after.values()) >= T_CLEANUP - HEARTBEAT, removed_after
        assert max(removed_after.values()) <= T_CLEANUP + HEARTBEAT + 4 * GOSSIP + 0.5

        repair = lab.wait_for(lambda: _stored_copies(lab, survivors) == 3 * objects, 120,
                              "three copies restored on the survivors")
        started = time.monotonic()
        _assert_all_readable(lab, survivors, files)
        read_seconds = time.monotonic() - started
        report("kill_one_of_five", files=len(files), start_and_put_s=round(put_seconds, 2),
               victim=victim.ns,
               detect_s_max=round(max(failed_after.values()), 2),
               detect_s_min=round(min(failed_after.values()), 2),
               removed_s_max=round(max(removed_after.values()), 2),
               repaired_s_after_removal=round(repair, 2),
               reads=len(files) * len(survivors), read_s=round(read_seconds, 2))


def _version(put_result: Any) -> tuple[int, str]:
    """The version of the name's binding a put made: of two puts of one name, the one with
    the higher binding version stays."""
    clock, writer = put_result["version"]
    return (int(clock), str(writer))


def _converged(lab: Lab) -> bool:
    return _all_alive(lab, lab.hosts)


@lab_test(timeout=420)
def test_partition_two_three_heals_with_last_writer_wins(tmp_path: Path) -> None:
    with Lab(tmp_path, hosts=5, settings=["k=1"]) as lab:
        lab.start_all()
        lab.wait_for(lambda: _converged(lab), 30, "five members alive everywhere")
        rng = random.Random(2)
        acked: dict[str, list[tuple[tuple[int, str], bytes]]] = {}
        refused: list[tuple[float, Exception]] = []  # (seconds into the partition, error)
        parted_at = time.monotonic()

        def write(batch: list[tuple[Host, str, bytes]]) -> None:
            started = time.monotonic() - parted_at
            for (_, name, data), result in zip(batch, lab.put_many(batch), strict=True):
                if isinstance(result, Exception):
                    refused.append((started, result))
                else:
                    acked.setdefault(name, []).append((_version(result), data))

        write([(lab.hosts[i % 5], f"s2/base{i}", rng.randbytes(2000)) for i in range(50)])
        assert len(acked) == 50
        side_a, side_b = lab.hosts[:2], lab.hosts[2:]
        lab.partition(side_a, side_b)
        parted_at = time.monotonic()
        rounds = 0
        while time.monotonic() - parted_at < 60:
            batch: list[tuple[Host, str, bytes]] = []
            for side, label in ((side_a, "a"), (side_b, "b")):
                host = side[rounds % len(side)]
                batch.append((host, f"s2/{label}{rounds}", rng.randbytes(3000)))
                batch.append((host, f"s2/both{rounds % 10}", rng.randbytes(1000)))
                batch.append((host, f"s2/base{rng.randrange(50)}", rng.randbytes(1500)))
            write(batch)
            rounds += 1
            time.sleep(0.5)
        # each side has failed and then forgotten the other: it sees only its own side alive
        views: dict[str, int] = {}

        def sides_apart() -> bool:
            views.update({h.ns: sum(m["state"] == "alive" for m in lab.status(h)["members"])
                          for h in lab.hosts})
            return views == {h.ns: 2 if h in side_a else 3 for h in lab.hosts}
        lab.wait_for(sides_apart, 10, f"each side alone (last: {views})")
        lab.heal_all()
        healed_at = time.monotonic()
        converge = lab.wait_for(lambda: _converged(lab), 120, "membership converged after heal")
        expected = {name: max(versions)[1] for name, versions in acked.items()}
        writes = sum(len(v) for v in acked.values())

        def all_read() -> bool:
            items = [(h, n) for h in lab.hosts for n in expected]
            results = lab.get_many(items)
            return all(r == expected[n] for (_, n), r in zip(items, results, strict=True))

        readable = lab.wait_for(all_read, 180, "every acknowledged write readable everywhere",
                                step=2.0)
        # Until the far side is declared failed (t_fail), a write may be placed on holders all
        # across the cut: it is refused with a clear error, never acknowledged. Afterwards each
        # side reaches holders of its own and every write is accepted.
        assert all(at < T_FAIL + 2.0 and isinstance(exc, ClientError)
                   and ("stored on 0" in str(exc) or "unreachable" in str(exc))
                   for at, exc in refused), refused[:3]
        report("partition_2_3", partition_s=round(healed_at - parted_at, 1),
               acked_writes=writes, refused_writes_before_detection=len(refused),
               names=len(expected),
               alive_seen_at_end_of_partition=views,
               membership_converged_s=round(converge, 2),
               all_reads_right_s=round(readable + converge, 2))


def _declared_failures(lab: Lab, host: Host) -> float:
    return lab.metrics(host).get('kelips_member_events_total{kind="failed"}', 0.0)


@pytest.mark.soak
@lab_test(timeout=540)
def test_twenty_percent_loss_five_minutes_no_false_failures(tmp_path: Path) -> None:
    duration = 300.0
    with Lab(tmp_path, hosts=5, settings=["k=1"]) as lab:
        files = _start_with_files(lab, 3, 50, "s3")
        before = {h.index: _declared_failures(lab, h) for h in lab.hosts}
        lab.loss(0.20)
        started = time.monotonic()
        rng = random.Random(3)
        lookups = wrong = 0
        latencies: list[float] = []
        while time.monotonic() - started < duration:
            host = rng.choice(lab.hosts)
            name = rng.choice(list(files))
            t0 = time.monotonic()
            try:
                ok = lab.get(host, name) == files[name]
            except Exception:  # counted: a lookup must succeed despite the loss
                ok = False
            latencies.append(time.monotonic() - t0)
            lookups += 1
            wrong += not ok
            for h in lab.hosts:
                members = _members(lab, h)
                assert all(m["state"] == "alive" for m in members.values()), (h.ns, members)
            time.sleep(0.5)
        lab.heal_all()
        after = {h.index: _declared_failures(lab, h) for h in lab.hosts}
        false_failures = sum(after[i] - before[i] for i in after)
        assert false_failures == 0, (before, after)
        assert wrong == 0, f"{wrong} of {lookups} lookups failed"
        latencies.sort()
        report("loss_20pct_5min", duration_s=duration, false_failures=false_failures,
               lookups=lookups, failed_lookups=wrong,
               lookup_p50_ms=round(1000 * latencies[len(latencies) // 2], 1),
               lookup_p99_ms=round(1000 * latencies[int(len(latencies) * 0.99)], 1))


class _Workload:
    """Users reading and writing through random hosts while the test breaks things.

    Every call may be retried on another host, at most ``attempts`` times 0.5 s apart: an
    error that survives the retries is a client error and is recorded.
    """

    def __init__(self, lab: Lab, files: dict[str, bytes], seed: int, attempts: int = 4) -> None:
        self.lab = lab
        self.files = dict(files)  # name -> last acknowledged content
        self.rng = random.Random(seed)
        self.attempts = attempts
        self.errors: list[str] = []
        self.ops = 0
        self.retries = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> _Workload:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=120)

    def _try(self, op: Callable[[Host], Any]) -> Any:
        last: Exception | None = None
        for attempt in range(self.attempts):
            if attempt:
                self.retries += 1
                time.sleep(0.5)
            try:
                return op(self.rng.choice(self.lab.hosts))
            except Exception as exc:  # the retry decides; the last error is kept
                last = exc
        raise AssertionError(f"failed after {self.attempts} attempts: {last!r}")

    def _run(self) -> None:
        n = 0
        while not self.stop.is_set():
            self.ops += 1
            try:
                if n % 3 == 0:
                    name, data = f"w/{n}", self.rng.randbytes(self.rng.randrange(1, 20000))
                    self._try(lambda h, n=name, d=data: self.lab.put(h, n, d))
                    self.files[name] = data
                else:
                    name = self.rng.choice(list(self.files))
                    got = self._try(lambda h, n=name: self.lab.get(h, n, timeout=15))
                    if got != self.files[name]:
                        self.errors.append(f"{name}: wrong content")
            except AssertionError as exc:
                self.errors.append(str(exc))
            n += 1
            time.sleep(0.05)


@lab_test(timeout=540)
def test_rolling_restart_loses_nothing(tmp_path: Path) -> None:
    with Lab(tmp_path, hosts=5, settings=["k=1"]) as lab:
        files = _start_with_files(lab, 4, 200, "s4")
        downtimes: list[float] = []
        with _Workload(lab, files, seed=4) as work:
            for host in lab.hosts:
                started = time.monotonic()
                assert lab.kill(host, signal.SIGTERM) == 0, lab.log(host)
                peer = lab.hosts[host.index % len(lab.hosts)]  # the next host
                lab.start(host, join=[peer])
                downtimes.append(time.monotonic() - started)
                lab.wait_for(lambda: _all_alive(lab, lab.hosts), 60, f"{host.ns} back everywhere")
                time.sleep(2.0)
        assert not work.errors, work.errors[:5]
        everything = work.files
        items = [(h, n) for h in lab.hosts for n in everything]
        results = lab.get_many(items)
        wrong = [(h.ns, n) for (h, n), r in zip(items, results, strict=True) if r != everything[n]]
        assert not wrong, f"{len(wrong)} of {len(items)} reads wrong: {wrong[:5]}"
        copies = lab.wait_for(lambda: _stored_copies(lab, lab.hosts) >= 3 * len(everything), 60,
                              "at least three copies of everything")
        report("rolling_restart", hosts=len(lab.hosts), files=len(everything),
               client_ops=work.ops, client_retries=work.retries, client_errors=len(work.errors),
               restart_s_max=round(max(downtimes), 2), copies_ok_after_s=round(copies, 2),
               verified_reads=len(items))


@lab_test(timeout=300)
def test_bootstrap_down_running_nodes_unaffected_new_nodes_join_through_members(
        tmp_path: Path) -> None:
    with Lab(tmp_path, hosts=6, settings=["k=1", "bootstrap_refresh=2.0"]) as lab:
        introducer_host, first, *others = lab.hosts
        introducer = lab.start_bootstrap(introducer_host)
        cluster = [first, others[0], others[1]]
        for host in cluster:
            lab.start(host, bootstrap=introducer)
        lab.wait_for(lambda: _all_alive(lab, cluster), 30, "three members via the bootstrap")
        files = _payloads(5, 30, "s5")
        assert not [r for r in lab.put_many([(first, n, d) for n, d in files.items()])
                    if isinstance(r, Exception)]
        lab.stop_bootstrap()
        down_at = time.monotonic()
        while time.monotonic() - down_at < 10:  # several refresh periods without the service
            assert _all_alive(lab, cluster)
            time.sleep(1.0)
        assert all(h.alive for h in cluster), "a node died with the bootstrap service"
        assert sum(_declared_failures(lab, h) for h in cluster) == 0
        late = lab.put(others[1], "s5/after", b"written with the introducer down")
        assert late["path"] == "s5/after"
        files["s5/after"] = b"written with the introducer down"
        newcomers = others[2:]  # one still names the dead introducer, one only a member
        lab.start(newcomers[0], bootstrap=introducer, join=[others[0]])
        lab.start(newcomers[1], join=[others[1]])
        everyone = cluster + newcomers
        joined = lab.wait_for(lambda: _all_alive(lab, everyone), 30, "newcomers joined")
        _assert_all_readable(lab, newcomers, files)
        report("bootstrap_down", members=len(everyone), down_for_s=round(
            time.monotonic() - down_at, 1), newcomers_joined_s=round(joined, 2),
            false_failures=0, reads_on_newcomers=len(files) * len(newcomers))


def _rss_kib(host: Host) -> int:
    assert host.proc is not None
    for line in Path(f"/proc/{host.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _state(lab: Lab, host: Host) -> tuple[object, object]:
    """What hostile input must not change: the membership and the objects with versions."""
    members = sorted((m["id"], m["state"], m["incarnation"]) for m in lab.status(host)["members"])
    listing = lab.run(host, lambda c: c.listing("s6/"))
    return members, listing


def _hostile_datagrams(count: int, valid: bytes, seed: int) -> Iterator[bytes]:
    """Random, truncated, bit-flipped, re-signed-with-another-key, replayed and huge datagrams."""
    from daemon.security import Authenticator
    rng = random.Random(seed)
    stranger = Authenticator(b"\x01" * 32)
    for i in range(count):
        kind = i % 6
        if kind == 0:
            yield rng.randbytes(rng.randrange(1, 1400))
        elif kind == 1:
            data = bytearray(valid)
            for _ in range(rng.randrange(1, 4)):
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
            yield bytes(data)
        elif kind == 2:
            yield valid[:rng.randrange(len(valid))] if i % 12 == 2 else valid + rng.randbytes(9)
        elif kind == 3:
            body = bytearray(valid[:-48])
            body[rng.randrange(len(body))] = rng.randrange(256)
            yield stranger.seal(bytes(body), time.time())
        elif kind == 4:
            yield valid  # a replay of an authentic datagram the node already accepted
        else:
            yield rng.randbytes(rng.randrange(1201, 9000))


def _http_cases(name: str) -> list[tuple[str, str, bytes]]:
    """(method, target, body) per endpoint: bad names, bad queries, garbage bodies."""
    long = "x" * 300
    return [
        ("POST", "/v1/sync", b"garbage"), ("POST", "/v1/sync", b"\x01\x01" + b"\xff" * 64),
        ("GET", "/v1/lookup", b""), ("GET", "/v1/lookup?name=%00", b""),
        ("GET", f"/v1/lookup?name={long}", b""), ("GET", "/v1/placement?name=", b""),
        ("GET", "/v1/list?prefix=%00", b""), ("GET", f"/v1/list?prefix={long}", b""),
        ("POST", "/v1/tuple", b"{not json"), ("POST", "/v1/tuple", b"[1,2,3]"),
        ("PUT", f"/v1/replica/{name}", b"data"), ("PUT", f"/v1/replica/{name}?size=-5", b""),
        ("PUT", f"/v1/replica/{name}?size=4&checksum=zz", b"data"),
        ("GET", f"/v1/replica/{long}", b""), ("DELETE", "/v1/replica/", b""),
        ("PUT", f"/v1/files/{name}?size=abc", b"data"), ("PUT", f"/v1/files/{name}?size=2",
                                                          b"longer than two bytes"),
        ("PUT", "/v1/files/a%2F..%2Fb?size=1", b"x"), ("GET", f"/v1/files/{long}/x", b""),
        ("DELETE", "/v1/files/", b""), ("GET", "/v1/stat/%00", b""),
        ("GET", "/v1/files?prefix=%00", b""), ("PATCH", "/v1/status", b""),
        ("GET", "/v1/nowhere", b""), ("POST", "/v1/ns/op", b"{not json"),
        ("POST", "/v1/ns/op", b'{"kind": "make_inode", "key": 0, "args": {}}'),
        ("POST", "/v1/ns/op", b'{"kind": "rm -rf", "key": 1, "args": {}}'),
        ("POST", "/v1/records", b'{"records": [{"tuple": 1}]}'),
        ("POST", "/v1/records", b'{"records": [{"tuple": {"name": "../x"}}]}'),
        ("GET", "/v1/entries?dir=0", b""), ("GET", "/v1/entries?dir=x", b""),
        ("PUT", f"/v1/objects/{name}?size=abc", b"data"), ("GET", "/v1/objects/%00", b""),
    ]


@lab_test(timeout=400)
def test_hostile_input_changes_nothing_and_strangers_get_nothing(tmp_path: Path) -> None:
    import httpx

    from daemon.core import codec
    from daemon.core.ids import cluster_tag
    from daemon.core.messages import Envelope, Gossip, MemberEntry
    from daemon.security import Authenticator, load_key

    with Lab(tmp_path, hosts=4, settings=["k=1"]) as lab:
        target, peer, third, stranger = lab.hosts
        for host in (target, peer, third):
            lab.start(host, join=[target] if host is not target else [])
        trio_hosts = [target, peer, third]
        lab.wait_for(lambda: _all_alive(lab, trio_hosts), 30, "three members alive")
        files = _payloads(6, 20, "s6")
        assert not [r for r in lab.put_many([(peer, n, d) for n, d in files.items()])
                    if isinstance(r, Exception)]
        lab.wait_for(lambda: _stored_copies(lab, trio_hosts) == 3 * len(files), 30, "copies")
        assert lab.key_file is not None
        auth = Authenticator(load_key(lab.key_file))
        before = _state(lab, target)
        rss_before = _rss_kib(target)
        rejected_before = sum(v for k, v in lab.metrics(target).items()
                              if k.startswith("kelips_rejected_packets_total"))

        # -- datagrams: one authentic (old news: heartbeat 0 of a known member), then the storm
        known = next(m for m in lab.status(target)["members"] if m["address"] == peer.address)
        sender = MemberEntry(bytes.fromhex(known["id"]), peer.ip, 7400, known["incarnation"], 0)
        valid = auth.seal(codec.encode(Envelope(cluster_tag("kelipsfs"), 1, Gossip(
            sender, 0, False, (), ()))), time.time())
        count = 100_000
        sent_at = time.monotonic()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.sendto(valid, (target.ip, 7400))
            for i, data in enumerate(_hostile_datagrams(count, valid, seed=6)):
                sock.sendto(data, (target.ip, 7400))
                if i % 50 == 0:
                    time.sleep(0.002)  # paced: a burst beyond the socket buffer is the kernel's
        send_s = time.monotonic() - sent_at

        def counted() -> float:
            return sum(v for k, v in lab.metrics(target).items()
                       if k.startswith("kelips_rejected_packets_total")) - rejected_before
        lab.wait_for(lambda: counted() >= 0.95 * count, 60, "hostile datagrams counted")

        # -- HTTP: unsigned, signed by a stranger, and signed but malformed, at every endpoint
        statuses: dict[int, int] = {}
        with httpx.Client(base_url=f"http://{target.address}", timeout=10) as http:
            for method, path, body in _http_cases("s6/f000"):
                for signer in (None, Authenticator(b"\x02" * 32), auth):
                    headers = {} if signer is None else signer.sign_request(
                        method, path, digest_of(body), time.time())
                    response = http.request(method, path, content=body, headers=headers)
                    assert 400 <= response.status_code < 500, (method, path, response.text)
                    statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            huge = http.post("/v1/sync", content=b"x" * (4 << 20), headers=auth.sign_request(
                "POST", "/v1/sync", digest_of(b"x" * (4 << 20)), time.time()))
            assert huge.status_code == 413
        for raw in (b"GARBAGE\r\n\r\n", b"GET /v1/status HTTP/1.1\r\nHost: x\r\n"
                    + b"X-Junk: " + b"a" * 200_000 + b"\r\n\r\n",
                    b"PUT /v1/files/s6/f001 HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n"):
            with socket.create_connection((target.ip, 7400), timeout=10) as conn:
                conn.sendall(raw)
                answer = conn.recv(100)
                assert answer == b"" or answer.split(b" ")[1].startswith(b"4"), answer

        assert target.alive
        assert _state(lab, target) == before, "hostile input changed the node's state"
        _assert_all_readable(lab, [target], files)
        rss_growth = _rss_kib(target) - rss_before
        assert rss_growth < 64 * 1024, f"memory grew by {rss_growth} KiB"

        # -- a node and a client without the cluster key
        wrong_key = tmp_path / "other.key"
        lab._cli("keygen", str(wrong_key))
        lab.start(stranger, join=[target], key_file=wrong_key, wait=False)
        assert stranger.proc is not None
        assert stranger.proc.wait(timeout=60) != 0, "a node with another key joined"
        keyed = wrong_key
        for call in (lambda c: c.status(), lambda c: c.listing(""),
                     lambda c: c.stat("s6/f000")):
            with pytest.raises(ClientError):
                lab.run(target, call, key_file=keyed)
        with pytest.raises(ClientError):
            lab.run(target, functools.partial(fetch, name="s6/f000"), key_file=keyed)
        spool = tmp_path / "intruder"
        spool.write_bytes(b"intruder")
        with pytest.raises(ClientError):
            lab.run(target, lambda c: c.put(spool, "s6/f000", False), key_file=keyed)
        with pytest.raises(ClientError):
            lab.run(target, lambda c: c.remove("s6/f000"), key_file=keyed)
        # it never got in; its datagrams (like the re-signed ones above) fail the MAC
        assert stranger.address not in _members(lab, target)
        assert _state(lab, target) == before
        _assert_all_readable(lab, trio_hosts, files)
        report("hostile_input", datagrams=count, send_s=round(send_s, 1),
               rejected=int(counted()), http_cases=sum(statuses.values()),
               http_statuses=statuses, rss_growth_kib=rss_growth,
               stranger_exit=stranger.proc.returncode)


async def _stat(client: ClientT, name: str) -> Any:
    return await client.stat(name)




@lab_test(timeout=400)
def test_disk_full_on_one_holder_loses_and_tears_nothing(tmp_path: Path) -> None:
    with Lab(tmp_path, hosts=4, settings=["k=1"]) as lab:
        small = lab.hosts[1]
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "kelips-small",
                        str(small.data_dir)], check=True)
        try:
            lab.start_all()
            lab.wait_for(lambda: _all_alive(lab, lab.hosts), 30, "four members alive")
            rng = random.Random(7)
            files = {f"s7/f{i:02d}": rng.randbytes(1 << 20) for i in range(40)}
            results = lab.put_many([(lab.hosts[i % 4], n, d) for i, (n, d) in
                                    enumerate(files.items())], limit=2)
            acked = {n: d for (n, d), r in zip(files.items(), results, strict=True)
                     if not isinstance(r, Exception)}
            errors = [str(r) for r in results if isinstance(r, Exception)]
            assert all("space" in e.lower() for e in errors), errors[:3]
            usage = shutil.disk_usage(small.data_dir)
            assert usage.free < 2 << 20, "the small disk never filled: the test proved nothing"
            # nothing torn: every acknowledged object reads back whole, from every host
            _assert_all_readable(lab, lab.hosts, acked)
            listing = lab.run(lab.hosts[0], lambda c: c.listing("s7/"))
            listed = {o["name"] for o in listing["objects"]}
            assert listed == set(acked), (sorted(set(acked) - listed), sorted(listed - set(acked)))
            # the full node still serves what it holds and keeps running
            assert small.alive
            held = lab.status(small)["members"][0]["objects"]
            # and the objects it had no room for got their third copy elsewhere
            copies = lab.wait_for(lambda: _stored_copies(lab, lab.hosts) == 3 * len(acked), 60,
                                  "three copies of every acknowledged object")
            stats = lab.get_many([(small, n) for n in acked])
            assert all(r == acked[n] for n, r in zip(acked, stats, strict=True))
            report("disk_full", small_disk_mib=12, puts=len(files), acked=len(acked),
                   refused=len(errors), objects_on_full_host=held,
                   three_copies_after_s=round(copies, 2),
                   free_kib_on_full_host=usage.free // 1024)
        finally:
            lab.close()
            subprocess.run(["umount", "-l", str(small.data_dir)], check=False)


@lab_test(timeout=540)
def test_kill_9_during_puts_keeps_every_acknowledged_object(tmp_path: Path) -> None:
    with Lab(tmp_path, hosts=1, settings=["k=1"]) as lab:
        node = lab.hosts[0]
        rng = random.Random(8)
        # name -> (version, content) of the newest acknowledged write; a put of the same name
        # may run concurrently with another, so "newest" is by version, not by batch order
        acked: dict[str, tuple[tuple[int, str], bytes]] = {}
        tried: dict[str, list[bytes]] = {}  # name -> contents put without an acknowledgement
        lost = torn = checked = 0
        kills_mid_batch = 0
        batch_s = 0.0
        for round_ in range(21):  # round 0 times an unbroken batch; 20 kills follow
            lab.start(node)
            # the previous round's state, after a kill -9 and a restart
            names = sorted(set(acked) | set(tried))
            reads = lab.get_many([(node, n) for n in names])
            checked += len(names)
            newer: list[str] = []
            for name, got in zip(names, reads, strict=True):
                if isinstance(got, ClientError):
                    assert "no such file or directory" in str(got) or "404" in str(got), got
                    lost += name in acked
                    continue
                assert not isinstance(got, Exception), got
                allowed = ([acked[name][1]] if name in acked else []) + tried.get(name, [])
                if got not in allowed:
                    torn += 1
                elif name not in acked or got != acked[name][1]:
                    newer.append(name)  # a complete later write that lost its acknowledgement
                    acked[name] = ((0, ""), got)
            stats = lab.many([(node, functools.partial(_stat, name=n)) for n in newer])
            for name, stat in zip(newer, stats, strict=True):
                assert not isinstance(stat, Exception), stat
                acked[name] = (_version(stat), acked[name][1])
            assert lost == 0 and torn == 0, (round_, lost, torn)
            tried.clear()
            batch: list[tuple[Host, str, bytes]] = []
            for i in range(200):
                name = (rng.choice(sorted(acked)) if acked and i % 4 == 0
                        else f"s8/r{round_}/o{i}")
                # every twentieth a file stored in chunks (three chunks in one run)
                data = rng.randbytes(CHUNKED if i % 20 == 7 else
                                     rng.choice((100, 5000, 70_000, 300_000)))
                batch.append((node, name, data))
            # a random point inside the batch, as long as an unbroken one takes
            killer = threading.Timer(rng.uniform(0.02, 0.98) * batch_s, lambda: lab.kill(node))
            started = time.monotonic()
            if round_:
                killer.start()
            results = lab.put_many(batch, limit=4)
            if round_:
                killer.join()
            else:
                batch_s = time.monotonic() - started
                lab.kill(node)
            failures = sum(isinstance(r, Exception) for r in results)
            kills_mid_batch += 0 < failures < len(batch)
            for (_, name, data), result in zip(batch, results, strict=True):
                if isinstance(result, Exception):
                    tried.setdefault(name, []).append(data)
                elif name not in acked or _version(result) > acked[name][0]:
                    acked[name] = (_version(result), data)
        lab.start(node)
        report("crash_consistency", kills=20, puts=21 * 200, chunked_puts=21 * 10,
               batch_s=round(batch_s, 2),
               acknowledged_names=len(acked),
               rounds_killed_mid_batch=kills_mid_batch, checked_after_restart=checked,
               lost=lost, torn=torn)


@lab_test(timeout=300)
def test_latency_bandwidth_cap_and_a_cut_host(tmp_path: Path) -> None:
    with Lab(tmp_path, hosts=4, settings=["k=1"]) as lab:
        first, capped, cut, slow = lab.hosts
        lab.start(first)
        lab.start(capped, join=[first])
        lab.start(cut, join=[first])
        lab.settings.append("send_delay=0.05")  # 50 ms more on every datagram of this host
        lab.start(slow, join=[first])
        lab.settings.pop()
        lab.wait_for(lambda: _all_alive(lab, lab.hosts), 30, "four members alive")

        def slow_rtts() -> list[float]:
            rtts = [_members(lab, h)[slow.address]["rtt_ms"] for h in (first, capped, cut)]
            return [r for r in rtts if r is not None]
        rtt_seen = lab.wait_for(lambda: len(slow_rtts()) == 3 and min(slow_rtts()) >= 50, 60,
                                "the delayed host's RTT measured by everyone")
        rtts = slow_rtts()

        lab.cap_bandwidth(capped, "8mbit")
        big = random.Random(9).randbytes(4 << 20)
        started = time.monotonic()
        lab.put(capped, "s9/big", big)
        capped_put_s = time.monotonic() - started
        assert lab.get(first, "s9/big") == big
        assert _all_alive(lab, lab.hosts), "a capped link caused a false failure"

        lab.cut(cut)
        cut_at = time.monotonic()
        others = [first, capped, slow]
        detected = lab.wait_for(lambda: all(_members(lab, h)[cut.address]["state"] == "failed"
                                            for h in others), 30, "the cut host failed")
        assert detected <= DETECT_BOUND + 1.0  # + the slow host's 50 ms delays
        lab.reconnect(cut)
        cut_for = time.monotonic() - cut_at
        back = lab.wait_for(lambda: _all_alive(lab, lab.hosts), 60, "the cut host back")
        assert lab.get(cut, "s9/big") == big
        lab.heal_all()
        report("latency_cap_cut", slow_host_rtt_ms=sorted(rtts), rtt_measured_s=round(rtt_seen, 1),
               put_4mib_through_8mbit_cap_s=round(capped_put_s, 2),
               cut_detected_s=round(detected, 2), cut_for_s=round(cut_for, 1),
               cut_host_back_s=round(back, 2))
