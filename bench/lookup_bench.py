"""Lookup vs Kademlia: the same N nodes, values and gets for kelipsfs and for the
Kademlia DHT from PyPI (``kademlia`` 2.2.3, asyncio), before and after killing 20 % of them.

    python -m bench.lookup_bench [--nodes 20 50] [--values 1000] [--replications 3 20]
                                 [--ksizes 3 20]

Why it is built this way (fairness, the point of the exercise):

- every node of both systems is its own OS process on its own 127.0.0.x address
  (kelipsfs: ``kelipsfs node`` wrapped by ``kelips-node`` below to count traffic; Kademlia:
  ``bench.kademlia_node``), and the two clusters never run at the same time;
- equal replication: kelipsfs r = 3 against Kademlia ``ksize`` = 3, and kelipsfs r = 20
  against Kademlia's default ksize = 20 (``--replications``, ``--ksizes``); every kelipsfs run
  is compared with every Kademlia run of the same N, and the ratio table says which pairs have
  r = ksize. What r = 20 means in kelipsfs: a name's holders are chosen among the members of
  its affinity group (N/k ≈ √N nodes on average), so any r at least the group's size puts a
  copy on every member of the group and the *effective* number of copies is the group's
  size, not r. Kademlia ksize = 20 keeps 20 copies (on every node at N = 20). The daemon
  accepts replication 1..16 (``CoreConfig``), so an r above that is set as 16, which places
  exactly as r = 20 would whenever no group has more than 16 members (the run records the
  group sizes and warns otherwise); the JSON records the r asked for (``replication``), the
  one set (``replication_set``), the group sizes and the measured mean number of holders per
  value (``effective_copies``, from the tuples' holder lists; for Kademlia from the nodes'
  stores). kelipsfs runs with k = round(√N) affinity groups (the daemon's default k = 1 would
  make every lookup local, which is not the Kelips being compared);
- the same values (``--values`` of ``--value-size`` random bytes, 1,000 × 1 KiB), each got
  once per phase from a node chosen at random among the live nodes that do *not* hold it;
- gets arrive open-loop at a fixed rate (``--rate``, default 50/s) for both systems, so a slow
  get does not hold back the next one (Kademlia waits 5 s for a dead peer) and a fast system
  is not made to queue;
- latency: both are timed inside the node. Kademlia around ``await server.get(key)``;
  kelipsfs by the node itself from the arrival of ``GET /v1/objects/NAME`` (a raw object of
  the DHT, as Kademlia's values are) to the verified bytes in hand (lookup + fetch; the
  ``x-kelips-elapsed-us`` response header). The driver's control
  connection is charged to neither; kelipsfs's end-to-end time (driver → node → … → driver,
  over a kept-alive connection) is reported too, as client p50/p99;
- messages: every one-way message between nodes counts (a request and its response are 2),
  the driver's control exchange for neither (for kelipsfs it is reported apart: 2 per get).
  Kademlia: datagrams sent by all nodes during the window (find_value, and the store the
  lookup sends to the nearest node without the value); kelipsfs: lookup datagrams
  (LookupRequest / LookupReply, one message each) and node-to-node HTTP requests of the get
  path (``/v1/lookup``, ``/v1/replica``, the fallbacks) and their responses, counted where
  they are sent;
- bytes: payload bytes written to sockets between nodes (UDP payload for Kademlia; lookup
  datagrams and HTTP headers and bodies for kelipsfs, attributed to the request each TCP
  connection carries); IP/UDP/TCP headers and TCP handshakes/ACKs are not counted for either.
  kelipsfs's gossip (UDP) and any HTTP that is not on a get's path (repairs after the kill)
  are reported as background, per second, not charged to gets;
- failures: a failed get records the HTTP status and the node's message (``failures`` and
  ``failed_examples`` in the JSON), and for both systems how many failed gets were of a
  value no live node held any more (``failed_no_live_copy``: every copy killed);
- after the kill (SIGKILL of the same share of nodes in both systems) both wait the same
  detection time: kelipsfs's t_fail + 4 gossip periods + 1 heartbeat = 7 s.

Prints Markdown tables and writes bench/results/lookup.json (or $KELIPSFS_BENCH_RESULTS).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daemon.core.config import MAX_REPLICATION, CoreConfig
from daemon.digest import digest_of

RESULTS = Path(os.environ.get("KELIPSFS_BENCH_RESULTS", Path(__file__).parent / "results"))
_DEFAULTS = CoreConfig()  # the daemon's defaults: what the kelipsfs clusters run with
DETECT_S = _DEFAULTS.t_fail + 4 * _DEFAULTS.gossip_interval + _DEFAULTS.heartbeat_interval
GET_TIMEOUT = 30.0
CATEGORIES = ("files_get", "lookup", "replica_get", "stat", "other")
GET_PATH = ("files_get", "lookup", "replica_get")
MIN_GETS_P99 = 100  # fewer gets: their nearest-rank p99 is their maximum


# --- counting inside a kelipsfs node process ---------------------------------------------------

COUNTS: dict[str, int] = {f"{kind}:{c}": 0 for kind in ("tcp_bytes", "requests")
                          for c in CATEGORIES}
COUNTS.update(udp_bytes=0, udp_datagrams=0, lookup_udp_bytes=0, lookup_udp_datagrams=0,
              lookup_udp_requests=0, tcp_connects=0, tcp_connect_errors=0)
_LOOKUP_CODES = (7, 8)  # type byte (2nd) of LookupRequest / LookupReply datagrams


def _classify(head: bytes) -> str | None:
    """The category of an HTTP request from its first bytes; None if ``head`` starts none."""
    if head.startswith(b"GET "):
        path = head[4:]
        for prefix, cat in ((b"/v1/objects/", "files_get"), (b"/v1/lookup", "lookup"),
                            (b"/v1/replica/", "replica_get"), (b"/v1/objects-stat/", "stat")):
            if path.startswith(prefix):
                return cat
        return "other"
    if head[:4] in (b"PUT ", b"POST", b"DELE", b"HEAD", b"PATC", b"OPTI"):
        return "other"
    return None


def _install_counters(sock_path: Path) -> None:
    """Wrap trio's socket send/recv/sendto/connect to count what this process puts on the wire.

    A TCP connection's bytes (both directions' *sent* bytes, each counted by its sender) are
    attributed to the category of the request it carries: the client side learns it when it
    sends the request line, the server side when it receives it. Counters are served as JSON to
    whoever connects to ``sock_path`` (a Unix socket, from a thread, so trio is not involved).
    """
    from trio._socket import _SocketType  # the class every trio socket is

    current: dict[int, str] = {}
    orig_send, orig_recv = _SocketType.send, _SocketType.recv
    orig_sendto, orig_connect = _SocketType.sendto, _SocketType.connect

    async def send(self: Any, data: Any, flags: int = 0) -> int:
        n: int = await orig_send(self, data, flags)
        if self.type == socket.SOCK_STREAM:
            cat = _classify(bytes(data[:16]))
            if cat is not None:
                current[id(self)] = cat
                COUNTS["requests:" + cat] += 1
            COUNTS["tcp_bytes:" + current.get(id(self), "other")] += n
        return n

    async def recv(self: Any, bufsize: int, flags: int = 0) -> bytes:
        data: bytes = await orig_recv(self, bufsize, flags)
        if data and self.type == socket.SOCK_STREAM:
            cat = _classify(data[:16])
            if cat is not None:
                current[id(self)] = cat
        return data

    async def sendto(self: Any, *args: Any) -> int:
        n: int = await orig_sendto(self, *args)
        data = args[0]
        if len(data) > 1 and data[1] in _LOOKUP_CODES:  # the one-datagram lookup
            COUNTS["lookup_udp_bytes"] += n
            COUNTS["lookup_udp_datagrams"] += 1
            COUNTS["lookup_udp_requests"] += data[1] == _LOOKUP_CODES[0]
        else:  # gossip
            COUNTS["udp_bytes"] += n
            COUNTS["udp_datagrams"] += 1
        return n

    async def connect(self: Any, address: Any) -> None:
        if self.type == socket.SOCK_STREAM:
            COUNTS["tcp_connects"] += 1
        try:
            await orig_connect(self, address)
        except OSError:
            COUNTS["tcp_connect_errors"] += 1
            raise

    _SocketType.send = send  # type: ignore[method-assign]
    _SocketType.recv = recv  # type: ignore[method-assign]
    _SocketType.sendto = sendto  # type: ignore[method-assign]
    _SocketType.connect = connect  # type: ignore[method-assign]

    with suppress(FileNotFoundError):
        sock_path.unlink()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(sock_path))
    server.listen(16)

    def serve() -> None:
        while True:
            conn, _ = server.accept()
            with conn:
                conn.sendall(json.dumps(dict(COUNTS)).encode())

    threading.Thread(target=serve, daemon=True).start()


def kelips_node(argv: list[str]) -> int:
    """``kelipsfs node`` with the counters installed (ARGV as for ``kelipsfs node``)."""
    data_dir = Path(argv[argv.index("--data-dir") + 1])
    data_dir.mkdir(parents=True, exist_ok=True)
    _install_counters(data_dir / "counters.sock")
    from kelipsfs.cli import main as cli_main
    return cli_main(["node", *argv])


def read_counters(data_dir: Path) -> dict[str, int]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(str(data_dir / "counters.sock"))
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    doc: dict[str, int] = json.loads(b"".join(chunks))
    return doc


# --- a small HTTP/1.1 client for the driver ----------------------------------------------------

@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes
    sent: int
    received: int


class RawHttp:
    """Signed HTTP/1.1 requests over kept-alive sockets, one set per thread.

    Why not httpx: the driver's own overhead lands in kelipsfs's latency, and a blocking
    socket adds the least; it also gives the exact bytes the client sent and received.
    """

    def __init__(self) -> None:
        from daemon.security import Authenticator, open_cluster_key
        self._auth = Authenticator(open_cluster_key("kelipsfs"))
        self._lock = threading.Lock()  # the authenticator's nonce source is not thread-safe
        self._local = threading.local()

    def _conn(self, addr: tuple[str, int], timeout: float) -> socket.socket:
        conns: dict[tuple[str, int], socket.socket] = self._local.__dict__.setdefault("c", {})
        sock = conns.get(addr)
        if sock is None:
            sock = socket.create_connection(addr, timeout=timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conns[addr] = sock
        sock.settimeout(timeout)
        return sock

    def _drop(self, addr: tuple[str, int]) -> None:
        conns: dict[tuple[str, int], socket.socket] = self._local.__dict__.setdefault("c", {})
        sock = conns.pop(addr, None)
        if sock is not None:
            sock.close()

    def request(self, addr: tuple[str, int], method: str, path: str,
                query: dict[str, object] | None = None, body: bytes = b"",
                extra: dict[str, str] | None = None, timeout: float = GET_TIMEOUT) -> Reply:
        from daemon.peers import target_for
        target = target_for(path, query)
        sha = digest_of(body)
        with self._lock:
            headers = self._auth.sign_request(method, target, sha, time.time())
        headers.update(extra or {})
        if body or method in ("PUT", "POST"):
            headers["content-length"] = str(len(body))
        head = f"{method} {target} HTTP/1.1\r\nhost: {addr[0]}:{addr[1]}\r\n" + "".join(
            f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        data = head.encode() + body
        for attempt in (0, 1):  # a kept-alive connection the server closed: one fresh retry
            sock = self._conn(addr, timeout)
            try:
                sock.sendall(data)
                reply = self._read(sock, len(data))
            except (ConnectionError, EOFError) as exc:
                self._drop(addr)
                if attempt == 1 or isinstance(exc, ConnectionRefusedError):
                    raise
                continue
            except OSError:
                self._drop(addr)
                raise
            if reply.headers.get("connection", "").lower() == "close":
                self._drop(addr)
            return reply
        raise AssertionError("unreachable")

    @staticmethod
    def _read(sock: socket.socket, sent: int) -> Reply:
        buf = b""
        while b"\r\n\r\n" not in buf:
            buf += _more(sock)
        head, rest = buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        received = len(head) + 4
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body = b""
            while True:
                while b"\r\n" not in rest:
                    rest += _more(sock)
                size_line, rest = rest.split(b"\r\n", 1)
                size = int(size_line.split(b";")[0], 16)
                while len(rest) < size + 2:
                    rest += _more(sock)
                received += len(size_line) + 2 + size + 2
                body += rest[:size]
                rest = rest[size + 2:]
                if size == 0:
                    break
        else:
            length = int(headers.get("content-length", "0"))
            while len(rest) < length:
                rest += _more(sock)
            body = rest[:length]
            received += length
        return Reply(status, headers, body, sent, received)


def _more(sock: socket.socket) -> bytes:
    data = sock.recv(65536)
    if not data:
        raise EOFError("connection closed")
    return data


# --- results -------------------------------------------------------------------------------------

@dataclass
class Get:
    ok: bool
    seconds: float  # as the driver saw it (end to end)
    sent: int = 0
    received: int = 0
    node_seconds: float | None = None  # as the node measured it (kelipsfs: x-kelips-elapsed-us)
    error: str = ""  # a failed get: HTTP status and the node's message
    index: int = -1


def _no_live_copy(failed: list[Get], held: list[set[int]]) -> int:
    """Failed gets of a value no live node held when the window began (every copy killed):
    no system could have served them. ``held`` is per value the live nodes holding it
    (kelipsfs: as its tuple names them; Kademlia: from the nodes' stores)."""
    return sum(not held[g.index] for g in failed)


@dataclass
class Window:
    """One measured phase of one system: the gets and the traffic counted around them."""

    gets: list[Get]
    seconds: float
    messages: float = 0.0
    requests: float = 0.0
    bytes: float = 0.0
    detail: dict[str, Any] = field(default_factory=dict)
    skipped: int = 0  # values every live node holds: no get from a non-holder is possible

    def row(self) -> dict[str, Any]:
        """p50/p99 are of the time measured inside the node (both systems); kelipsfs's
        end-to-end time (driver -> node -> ... -> driver) is in client_p50/p99_ms."""
        good = [g for g in self.gets if g.ok]
        ok = [g.node_seconds if g.node_seconds is not None else g.seconds for g in good]
        client = [g.seconds for g in good]
        n = len(self.gets)
        failures: dict[str, int] = {}
        for g in self.gets:
            if not g.ok:
                failures[g.error or "?"] = failures.get(g.error or "?", 0) + 1
        return {"gets": n, "skipped_every_node_holds": self.skipped,
                "success": sum(g.ok for g in self.gets) / n if n else 0.0,
                "messages_per_get": self.messages / n if n else 0.0,
                "requests_per_get": self.requests / n if n else 0.0,
                "bytes_per_get": self.bytes / n if n else 0.0,
                "p50_ms": _pct(ok, 50) * 1e3 if ok else None,
                "p99_ms": _pct(ok, 99) * 1e3 if ok else None,
                "client_p50_ms": _pct(client, 50) * 1e3 if client else None,
                "client_p99_ms": _pct(client, 99) * 1e3 if client else None,
                "failures": dict(sorted(failures.items(), key=lambda kv: -kv[1])[:10]),
                "window_s": self.seconds, **self.detail}


def _mean_size(sets: list[set[int]]) -> float:
    """The mean number of live nodes holding a value (its copies) at the start of a window."""
    return sum(map(len, sets)) / len(sets) if sets else 0.0


def _pct(values: list[float], p: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(p / 100 * len(ordered)) - 1))]


def open_loop(jobs: list[Callable[[], Get | None]], rate: float
              ) -> tuple[list[Get | None], float]:
    """Start job i at i / rate seconds (each on a pool thread); wait for all of them."""
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=512) as pool:
        futures = []
        for i, job in enumerate(jobs):
            delay = started + i / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            futures.append(pool.submit(job))
        results = [f.result() for f in futures]
    return results, time.perf_counter() - started


def parallel(fn: Callable[[int], Any], count: int, workers: int = 8) -> list[Any]:
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(fn, range(count)))


@dataclass
class Dataset:
    names: list[str]
    values: list[bytes]
    sha: list[str]

    @classmethod
    def make(cls, count: int, size: int, seed: int) -> Dataset:
        rng = random.Random(seed)
        values = [rng.randbytes(size) for _ in range(count)]
        return cls([f"lookup/v{i:05d}" for i in range(count)], values,
                   [digest_of(v).hex() for v in values])


def _error_text(body: bytes) -> str:
    """The node's error message from a failed get's body (JSON or text), shortened."""
    text = body.decode("utf-8", "replace")
    with suppress(ValueError, AttributeError):
        doc = json.loads(text)
        text = str(doc.get("error", doc))
    return text[:160]


def _proc_kill(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


class _Processes:
    """The node processes of one cluster and which of them are still alive."""

    procs: list[subprocess.Popen[bytes]]
    alive: set[int]

    def kill(self, victims: list[int]) -> None:
        for i in victims:
            _proc_kill(self.procs[i])
            self.alive.discard(i)

    def close(self) -> None:
        for proc in self.procs:
            _proc_kill(proc)


# --- kelipsfs ------------------------------------------------------------------------------------

class KelipsCluster(_Processes):
    """N ``kelips-node`` processes on 127.0.0.10.. (one port), joined through the first."""

    def __init__(self, root: Path, n: int, k: int, r: int) -> None:
        self.root, self.n, self.k, self.r = root, n, k, r
        self.port = random.randint(20000, 40000)
        self.addrs = [(f"127.0.0.{10 + i}", self.port) for i in range(n)]
        self.dirs = [root / f"kelips{i}" for i in range(n)]
        self.procs: list[subprocess.Popen[bytes]] = []
        self.alive = set(range(n))
        self.http = RawHttp()

    def _spawn(self, i: int) -> subprocess.Popen[bytes]:
        self.dirs[i].mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "bench.lookup_bench", "kelips-node",
               "--listen", f"{self.addrs[i][0]}:{self.port}", "--data-dir", str(self.dirs[i]),
               "--set", f"k={self.k}", "--set", f"replication={self.r}",
               "--set", "log_level=warning"]
        if i:
            cmd += ["--join", f"{self.addrs[0][0]}:{self.port}"]
        with open(self.dirs[i] / "node.log", "w") as log:
            return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log,
                                    start_new_session=True)

    def _wait_ready(self, i: int, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        endpoint = self.dirs[i] / "endpoint.json"
        while time.monotonic() < deadline:
            with suppress(OSError, ValueError):
                if json.loads(endpoint.read_text()).get("pid") == self.procs[i].pid:
                    return
            if self.procs[i].poll() is not None:
                raise RuntimeError(f"kelipsfs node {i} exited: "
                                   f"{(self.dirs[i] / 'node.log').read_text()[-2000:]}")
            time.sleep(0.05)
        raise TimeoutError(f"kelipsfs node {i} not ready")

    def start(self) -> None:
        self.procs.append(self._spawn(0))
        self._wait_ready(0)
        for i in range(1, self.n):
            self.procs.append(self._spawn(i))
            if i % 10 == 0:  # a 2-core machine: don't start 50 interpreters at once
                self._wait_ready(i)
        for i in range(self.n):
            self._wait_ready(i)

    def status(self, i: int) -> dict[str, Any]:
        reply = self.http.request(self.addrs[i], "GET", "/v1/status", timeout=10)
        doc: dict[str, Any] = json.loads(reply.body)
        return doc

    def converged(self) -> bool:
        """Every live node knows every live member of its group and a contact in every
        other non-empty group (what Kelips needs for one-hop lookups)."""
        docs = {i: self.status(i) for i in self.alive}
        groups: dict[int, set[str]] = {}
        for doc in docs.values():
            groups.setdefault(doc["group"], set()).add(doc["node_id"])
        for doc in docs.values():
            alive = {m["id"] for m in doc["members"] if m["state"] == "alive"}
            if not groups[doc["group"]] <= alive:
                return False
            have = {int(g) for g, c in doc["contacts_per_group"].items() if c}
            if not set(groups) - {doc["group"]} <= have:
                return False
        return True

    def wait_converged(self, timeout: float) -> float:
        started = time.monotonic()
        while not self.converged():
            if time.monotonic() - started > timeout:
                raise TimeoutError("kelipsfs cluster did not converge")
            time.sleep(1.0)
        return time.monotonic() - started

    def put(self, data: Dataset, rng: random.Random) -> None:
        from daemon.peers import CONTENT_DIGEST_HEADER
        origins = [rng.randrange(self.n) for _ in data.names]

        def one(i: int) -> None:
            value = data.values[i]
            reply = self.http.request(
                self.addrs[origins[i]], "PUT", "/v1/objects/" + data.names[i],
                {"size": len(value), "mode": 0o644, "mtime_ns": 0}, value,
                {CONTENT_DIGEST_HEADER: data.sha[i]})
            if reply.status != 200:
                raise RuntimeError(f"put {data.names[i]}: {reply.status} {reply.body[:200]!r}")

        parallel(one, len(data.names))

    def holders(self, data: Dataset, rng: random.Random) -> list[set[int]]:
        """For every name, the nodes (indexes) its tuple names, asked of a random live node."""
        index = {self.status(i)["node_id"]: i for i in self.alive}
        alive = sorted(self.alive)

        def one(i: int) -> set[int]:
            reply = self.http.request(self.addrs[rng.choice(alive)], "GET",
                                      "/v1/objects-stat/" + data.names[i], timeout=GET_TIMEOUT)
            if reply.status != 200:
                return set()
            doc = json.loads(reply.body)
            return {index[h] for h in doc["tuple"]["holders"] if h in index}

        return parallel(one, len(data.names))

    def counters(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for i in self.alive:
            for key, value in read_counters(self.dirs[i]).items():
                total[key] = total.get(key, 0) + value
        return total

    def measure(self, data: Dataset, rng: random.Random, rate: float) -> Window:
        held = self.holders(data, rng)
        alive = sorted(self.alive)
        sources = [rng.choice([a for a in alive if a not in held[i]] or alive)
                   for i in range(len(data.names))]

        def job(i: int) -> Callable[[], Get | None]:
            def run() -> Get | None:
                started = time.perf_counter()
                try:
                    r = self.http.request(self.addrs[sources[i]], "GET",
                                          "/v1/objects/" + data.names[i])
                except OSError as exc:
                    return Get(False, time.perf_counter() - started,
                               error=f"client: {type(exc).__name__}", index=i)
                seconds = time.perf_counter() - started
                ok = r.status == 200 and digest_of(r.body).hex() == data.sha[i]
                elapsed = r.headers.get("x-kelips-elapsed-us")
                error = ""
                if not ok:
                    error = (f"{r.status}: {_error_text(r.body)}" if r.status != 200
                             else "200: wrong bytes").replace(data.names[i], "NAME")
                return Get(ok, seconds, r.sent, r.received,
                           int(elapsed) / 1e6 if elapsed else None, error, i)
            return run

        before = self.counters()
        done, seconds = open_loop([job(i) for i in range(len(data.names))], rate)
        gets = [g for g in done if g is not None]
        after = self.counters()
        d = {k: after.get(k, 0) - before.get(k, 0) for k in after}
        n = len(gets)
        # Node to node, as Kademlia's (whose gets are issued inside the node): lookup
        # datagrams one each (request, reply), HTTP lookups and holder fetches 2 each.
        http_requests = d["requests:lookup"] + d["requests:replica_get"]
        requests = http_requests + d["lookup_udp_requests"]
        messages = 2 * http_requests + d["lookup_udp_datagrams"]
        path_bytes = (d["tcp_bytes:lookup"] + d["tcp_bytes:replica_get"]
                      + d["lookup_udp_bytes"])
        failed = [g for g in gets if not g.ok]
        return Window(gets, seconds, messages=messages, requests=requests, bytes=path_bytes,
                      detail={
                          "live_holders_mean": _mean_size(held),
                          "client_messages_per_get": 2.0,  # GET /v1/objects and its response
                          "client_bytes_per_get": (sum(g.sent for g in gets)
                                                   + d["tcp_bytes:files_get"]) / n,
                          "lookup_datagrams_per_get": d["lookup_udp_datagrams"] / n,
                          "http_lookup_requests_per_get": d["requests:lookup"] / n,
                          "holder_requests_per_get": d["requests:replica_get"] / n,
                          "gossip_bytes_per_s": d["udp_bytes"] / seconds,
                          "gossip_datagrams_per_s": d["udp_datagrams"] / seconds,
                          "other_http_bytes_per_s":
                              (d["tcp_bytes:other"] + d["tcp_bytes:stat"]) / seconds,
                          "other_http_requests": d["requests:other"] + d["requests:stat"],
                          "tcp_connect_errors": d["tcp_connect_errors"],
                          "sources_holding": sum(sources[i] in held[i] for i in range(n)),
                          "failed_no_live_copy": _no_live_copy(failed, held),
                          "failed_examples": [
                              {"name": data.names[g.index], "error": g.error,
                               "live_holders": sorted(held[g.index]),
                               "source": sources[g.index]} for g in failed[:10]]})


def run_kelips(n: int, r: int, data: Dataset, victims: list[int], args: argparse.Namespace,
               root: Path) -> dict[str, Any]:
    """One kelipsfs cluster of N nodes asked for r copies: r above the daemon's maximum is
    set as that maximum, the same placement (every group member) while no group is larger."""
    k = max(1, round(math.sqrt(n)))
    r_set = min(r, MAX_REPLICATION)
    rng = random.Random(args.seed)
    for attempt in range(5):  # ids are random: a small N can leave a group empty, and the
        # names hashed to it could not be stored; start again with new ids then
        cluster = KelipsCluster(root / f"kelips-{n}-r{r}-{attempt}", n, k, r_set)
        started = time.monotonic()
        try:
            cluster.start()
            converge = cluster.wait_converged(180)
            groups = [cluster.status(i)["group"] for i in range(n)]
            if len(set(groups)) == k:
                break
        except BaseException:
            cluster.close()
            raise
        cluster.close()
        print(f"  kelipsfs N={n} k={k}: a group is empty, starting again", flush=True)
    else:
        raise RuntimeError(f"kelipsfs N={n} k={k}: a group was empty in 5 clusters")
    try:
        sizes = sorted((groups.count(g) for g in set(groups)), reverse=True)
        print(f"  kelipsfs N={n} k={k} r={r}"
              f"{f' (set {r_set}, the daemon maximum)' if r_set != r else ''}: up in "
              f"{time.monotonic() - started:.0f} s (converged {converge:.0f} s after the last "
              f"start), group sizes {sizes}", flush=True)
        if r_set != r and sizes[0] > r_set:
            print(f"  warning: a group of {sizes[0]} members is larger than the {r_set} copies "
                  f"set, so r = {r} is not what runs", flush=True)
        phases = _phases(cluster, data, rng, victims, args)
        return {"system": "kelipsfs", "replication": r, "replication_set": r_set, "k": k,
                "nodes": n, "group_sizes": sizes,
                "effective_copies": phases["before"]["live_holders_mean"], **phases}
    finally:
        cluster.close()


def _phases(cluster: KelipsCluster | KademliaCluster, data: Dataset, rng: random.Random,
            victims: list[int], args: argparse.Namespace) -> dict[str, Any]:
    """Store the values, measure, kill the victims, wait the detection time, measure again."""
    started = time.monotonic()
    cluster.put(data, rng)
    print(f"  {len(data.names)} stored in {time.monotonic() - started:.1f} s", flush=True)
    time.sleep(args.settle)
    before = cluster.measure(data, rng, args.rate).row()
    print(f"  before: {_brief(before)}", flush=True)
    cluster.kill(victims)
    time.sleep(DETECT_S)
    after = cluster.measure(data, rng, args.rate).row()
    print(f"  after kill: {_brief(after)}", flush=True)
    return {"before": before, "after_kill": after}


# --- Kademlia ------------------------------------------------------------------------------------

class KademliaCluster(_Processes):
    """N ``bench.kademlia_node`` processes on 127.0.0.10.., bootstrapped through the first."""

    def __init__(self, root: Path, n: int, ksize: int) -> None:
        self.root, self.n, self.ksize = root, n, ksize
        self.port = random.randint(20000, 40000)
        self.addrs = [(f"127.0.0.{10 + i}", self.port) for i in range(n)]
        self.procs: list[subprocess.Popen[bytes]] = []
        self.alive = set(range(n))
        self._local = threading.local()
        root.mkdir(parents=True, exist_ok=True)

    def _spawn(self, i: int) -> subprocess.Popen[bytes]:
        cmd = [sys.executable, "-m", "bench.kademlia_node",
               "--listen", f"{self.addrs[i][0]}:{self.port}", "--ksize", str(self.ksize)]
        if i:
            cmd += ["--join", f"{self.addrs[0][0]}:{self.port}"]
        with open(self.root / f"kad{i}.log", "w") as log:
            return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log,
                                    start_new_session=True)

    def _wait_ready(self, i: int) -> None:
        stdout = self.procs[i].stdout
        assert stdout is not None
        line = stdout.readline()
        if line.strip() != b"ready":
            raise RuntimeError(f"Kademlia node {i} failed: "
                               f"{(self.root / f'kad{i}.log').read_text()[-2000:]}")

    def start(self) -> None:
        self.procs.append(self._spawn(0))
        self._wait_ready(0)
        for i in range(1, self.n):
            self.procs.append(self._spawn(i))
            if i % 10 == 0:
                self._wait_ready(i)
        for i in range(1, self.n):
            if i % 10:
                self._wait_ready(i)
        for _ in range(2):  # Kademlia's join lookup again, now that everyone is there
            for i in range(self.n):
                self.call(i, {"op": "refresh"})

    def call(self, i: int, doc: dict[str, Any], timeout: float = 60.0) -> dict[str, Any]:
        conns: dict[int, Any] = self._local.__dict__.setdefault("c", {})
        conn = conns.get(i)
        if conn is None:
            sock = socket.create_connection(self.addrs[i], timeout=timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = conns[i] = (sock, sock.makefile("rb"))
        conn[0].settimeout(timeout)
        conn[0].sendall(json.dumps(doc).encode() + b"\n")
        line = conn[1].readline()
        if not line:
            raise ConnectionError(f"Kademlia node {i} closed its control connection")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def put(self, data: Dataset, rng: random.Random) -> None:
        origins = [rng.randrange(self.n) for _ in data.names]

        def one(i: int) -> None:
            origin = origins[i]
            for _ in range(5):  # a set that found no node to store on: again from elsewhere
                reply = self.call(origin, {"op": "set", "key": data.names[i],
                                           "value": data.values[i].hex()})
                if reply.get("ok"):
                    return
                origin = (origin + 1) % self.n
            raise RuntimeError(f"Kademlia set {data.names[i]} failed: {reply}")

        parallel(one, len(data.names))

    def holders(self, data: Dataset) -> list[set[int]]:
        from kademlia.utils import digest  # type: ignore[import-untyped]
        stored = {i: set(self.call(i, {"op": "keys"})["keys"]) for i in self.alive}
        return [{i for i, keys in stored.items() if digest(name).hex() in keys}
                for name in data.names]

    def counters(self) -> dict[str, dict[str, int]]:
        total: dict[str, dict[str, int]] = {"datagrams": {}, "bytes": {}}
        for i in self.alive:
            doc = self.call(i, {"op": "stats"})
            for what in total:
                for kind, value in doc[what].items():
                    total[what][kind] = total[what].get(kind, 0) + value
        return total

    def measure(self, data: Dataset, rng: random.Random, rate: float) -> Window:
        held = self.holders(data)
        alive = sorted(self.alive)

        def job(i: int) -> Callable[[], Get | None]:
            def run() -> Get | None:
                candidates = [a for a in alive if a not in held[i]]
                while candidates:  # a lookup may have cached the value on our pick since
                    source = rng.choice(candidates)
                    try:
                        reply = self.call(source, {"op": "get", "key": data.names[i]},
                                          timeout=GET_TIMEOUT + 10)
                    except OSError:
                        return Get(False, GET_TIMEOUT, error="driver: no answer", index=i)
                    if not reply["held"]:
                        ok = reply["digest"] == data.sha[i]
                        error = "" if ok else ("no value found" if not reply["digest"]
                                               else "wrong bytes")
                        return Get(ok, reply["seconds"], error=error, index=i)
                    candidates.remove(source)
                return None  # every live node holds it (ksize >= live nodes): not measurable
            return run

        before = self.counters()
        done, seconds = open_loop([job(i) for i in range(len(data.names))], rate)
        gets = [g for g in done if g is not None]
        after = self.counters()
        dgrams = {k: v - before["datagrams"].get(k, 0) for k, v in after["datagrams"].items()}
        nbytes = {k: v - before["bytes"].get(k, 0) for k, v in after["bytes"].items()}
        n = len(gets)
        requests = sum(v for k, v in dgrams.items() if k.startswith("req:"))
        failed = [g for g in gets if not g.ok]
        return Window(gets, seconds, messages=sum(dgrams.values()), requests=requests,
                      bytes=sum(nbytes.values()), skipped=len(done) - n,
                      detail={"live_holders_mean": _mean_size(held),
                              "failed_no_live_copy": _no_live_copy(failed, held),
                              "datagrams_by_kind_per_get":
                              {k: v / n for k, v in sorted(dgrams.items()) if v}})


def run_kademlia(n: int, ksize: int, data: Dataset, victims: list[int],
                 args: argparse.Namespace, root: Path) -> dict[str, Any]:
    rng = random.Random(args.seed)
    cluster = KademliaCluster(root / f"kad-{n}-{ksize}", n, ksize)
    try:
        started = time.monotonic()
        cluster.start()
        print(f"  Kademlia N={n} ksize={ksize}: up in {time.monotonic() - started:.0f} s",
              flush=True)
        phases = _phases(cluster, data, rng, victims, args)
        return {"system": "kademlia", "replication": ksize, "ksize": ksize, "nodes": n,
                "effective_copies": phases["before"]["live_holders_mean"], **phases}
    finally:
        cluster.close()


# --- report --------------------------------------------------------------------------------------

def _brief(row: dict[str, Any]) -> str:
    if not row["gets"]:
        return f"no get possible: every live node holds all {row['skipped_every_node_holds']}"
    if row["p50_ms"] is None:
        return "every get failed"
    failed = f", failures {row['failures']}" if row["failures"] else ""
    if row.get("failed_no_live_copy"):
        failed += f" ({row['failed_no_live_copy']} with no live copy)"
    return (f"success {row['success']:.1%}, {row['messages_per_get']:.2f} msgs/get, "
            f"p50 {row['p50_ms']:.2f} ms, p99 {row['p99_ms']:.2f} ms, "
            f"{row['bytes_per_get']:.0f} B/get{failed}")


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.3g}" if b and not math.isnan(a) and not math.isnan(b) else "–"


def _copies(run: dict[str, Any]) -> str:
    copies = run.get("effective_copies")
    return "" if copies is None else f"{copies:.1f} copies"


def _label(run: dict[str, Any]) -> str:
    """kelipsfs: r asked for (and set, when the daemon capped it), k, and the copies measured;
    Kademlia: ksize and the copies measured. Older JSON lacks the measured copies."""
    copies = _copies(run)
    if run["system"] == "kelipsfs":
        r, r_set = run.get("replication", 3), run.get("replication_set", run.get("replication", 3))
        asked = f"r={r}" + (f" (set {r_set})" if r_set != r else "")
        return f"kelipsfs {asked}, k={run['k']}{': ' + copies if copies else ''}"
    return f"Kademlia ksize={run['ksize']}{f' ({copies})' if copies else ''}"


def report(runs: list[dict[str, Any]]) -> list[str]:
    """Two Markdown tables: every run's rows, then every kelipsfs run against every Kademlia
    run of the same N (ratios kelipsfs / Kademlia and the issue's targets), with a column
    saying whether the pair has equal replication (kelipsfs r = Kademlia ksize).

    The message target is judged both ways the issue allows ("datagrams or requests"):
    one-way messages (a request and its answer are 2) and requests sent. They differ after
    the kill: a request to a dead Kademlia node costs a message but brings no answer, so
    Kademlia's message count drops (6.00 → 5.6) while its requests stay 3.00."""
    out = ["| N | phase | system | success | messages/get (requests) | p50 ms | p99 ms "
           "| client p50 / p99 ms | bytes/get |", "|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        name = _label(run)
        for phase, label in (("before", "all up"), ("after_kill", "20 % killed")):
            r = run[phase]
            if not r["gets"] or r["p50_ms"] is None:
                out.append(f"| {run['nodes']} | {label} | {name} | {_brief(r)} | | | | | |")
                continue
            client = (f"{r['client_p50_ms']:.2f} / {r['client_p99_ms']:.2f}"
                      if run["system"] == "kelipsfs" else "–")
            out.append(f"| {run['nodes']} | {label} | {name} | {r['success']:.1%} of "
                       f"{r['gets']} | "
                       f"{r['messages_per_get']:.2f} ({r['requests_per_get']:.2f}) | "
                       f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {client} | "
                       f"{r['bytes_per_get']:,.0f} |")
    out += ["", "| N | phase | kelipsfs / | Kademlia | equal replication | success | messages "
            "| requests | p50 | p99 | bytes | msgs ≤ ⅓ | requests ≤ ⅓ | p50, p99 below "
            "| success ≥ |", "|---" * 15 + "|"]
    for kel in (r for r in runs if r["system"] == "kelipsfs"):
        r_kel = kel.get("replication", 3)
        copies = _copies(kel)
        for kad in (r for r in runs if r["system"] == "kademlia" and r["nodes"] == kel["nodes"]):
            for phase, label in (("before", "all up"), ("after_kill", "20 % killed")):
                a, b = kel[phase], kad[phase]
                if not a["gets"] or not b["gets"] or None in (a["p50_ms"], b["p50_ms"]):
                    continue
                out.append(
                    f"| {kel['nodes']} | {label} | "
                    f"r={r_kel}{f' ({copies})' if copies else ''} | ksize={kad['ksize']} | "
                    f"{'yes' if r_kel == kad['ksize'] else 'no'} | "
                    f"{_ratio(a['success'], b['success'])} | "
                    f"{_ratio(a['messages_per_get'], b['messages_per_get'])} | "
                    f"{_ratio(a['requests_per_get'], b['requests_per_get'])} | "
                    f"{_ratio(a['p50_ms'], b['p50_ms'])} | {_ratio(a['p99_ms'], b['p99_ms'])} | "
                    f"{_ratio(a['bytes_per_get'], b['bytes_per_get'])} | "
                    f"{_mark(a['messages_per_get'] <= b['messages_per_get'] / 3)} | "
                    f"{_mark(a['requests_per_get'] <= b['requests_per_get'] / 3)} | "
                    f"{_latency_mark(a, b)} | "
                    f"{_mark(a['success'] >= b['success'])} |")
    return out


def _mark(ok: bool) -> str:
    return "✔" if ok else "✘"


def _latency_mark(a: dict[str, Any], b: dict[str, Any]) -> str:
    """p50 and p99 below Kademlia's. A p99 is judged only when both sides had at least
    ``MIN_GETS_P99`` gets: below that the nearest-rank p99 is the largest value seen (Kademlia
    ksize = 20 at N = 20 holds nearly every value on every node, which leaves ~50 gets from a
    non-holder), one sample, not a percentile."""
    fewest = min(a["gets"], b["gets"])
    if fewest < MIN_GETS_P99:
        return f"{_mark(a['p50_ms'] < b['p50_ms'])} (p50; p99 of {fewest} gets not judged)"
    return _mark(a["p50_ms"] < b["p50_ms"] and a["p99_ms"] < b["p99_ms"])


@contextmanager
def _workdir() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="kelipsfs-lookup-"))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["kelips-node"]:
        return kelips_node(argv[1:])
    parser = argparse.ArgumentParser(description="Lookup vs Kademlia (see the module doc).")
    parser.add_argument("--nodes", type=int, nargs="+", default=[20, 50])
    parser.add_argument("--values", type=int, default=1000)
    parser.add_argument("--value-size", type=int, default=1024)
    parser.add_argument("--replications", type=int, nargs="+", default=[3, 20],
                        help="kelipsfs r, one cluster each (above the daemon's 16: set as 16)")
    parser.add_argument("--ksizes", type=int, nargs="+", default=[3, 20])
    parser.add_argument("--kill", type=float, default=0.2, help="share of nodes killed")
    parser.add_argument("--rate", type=float, default=50.0, help="gets started per second")
    parser.add_argument("--settle", type=float, default=5.0,
                        help="seconds between the last put and the first get")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--systems", nargs="+", default=["kelipsfs", "kademlia"])
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the clean-ups below
    data = Dataset.make(args.values, args.value_size, args.seed)
    runs: list[dict[str, Any]] = []
    with _workdir() as root:
        for n in args.nodes:
            victims = random.Random(args.seed + n).sample(range(n), max(1, round(args.kill * n)))
            if "kelipsfs" in args.systems:
                for r in args.replications:
                    print(f"# kelipsfs, N = {n}, r = {r}", flush=True)
                    runs.append(run_kelips(n, r, data, victims, args, root))
            if "kademlia" in args.systems:
                for ksize in args.ksizes:
                    print(f"# Kademlia, N = {n}, ksize = {ksize}", flush=True)
                    runs.append(run_kademlia(n, ksize, data, victims, args, root))
    doc = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": {
        "cpus": os.cpu_count(), "python": platform.python_version(),
        "platform": platform.platform()}, "values": args.values,
        "value_size": args.value_size, "rate_per_s": args.rate, "kill_share": args.kill,
        "detect_wait_s": DETECT_S, "get_timeout_s": GET_TIMEOUT, "runs": runs}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "lookup.json").write_text(json.dumps(doc, indent=1))
    print("\n".join(report(runs)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
