"""A lab of kelipsfs hosts with their own IPv4 addresses, in network namespaces, with faults.

Safety first: the lab only ever runs inside a fresh network *and* mount namespace. A test marked
``@lab_test`` re-executes itself as ``unshare --net --mount --propagation private -- pytest
NODEID``; only that inner run, after checking that its network namespace is not the machine's,
builds anything. So no test address is ever contacted from the machine's own namespace and
nothing survives the run: the named namespaces live on a tmpfs over /run/netns that only the
private mount namespace sees, and every node process gets SIGKILL when the test process dies
(PR_SET_PDEATHSIG), besides the normal cleanup in ``Lab.close``.

Topology: namespace ``kbr`` holds the bridge ``br0``; host i lives in namespace ``h{i}`` with
``eth0`` = 10.77.0.i/24, veth'd into the bridge; the test process itself (the "driver", acting as
the users' machine) sits at 10.77.0.254 on the same bridge. Faults act on host-to-host traffic
in each host's namespace (iptables chains ``KLAB-IN``/``KLAB-OUT``, ``tc tbf``, the bridge port's
link state) and are undone by ``heal_all``, which ``close`` calls too.
"""

from __future__ import annotations

import ctypes
import functools
import inspect
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio

from kelipsfs.client import Client, Target

LAB_ENV = "KELIPSFS_LAB_INSIDE"
SUBNET = "10.77.0"
DRIVER_ADDRESS = f"{SUBNET}.254"
PORT = 7400
READY_TIMEOUT = 30.0
REPO = Path(__file__).resolve().parent.parent
T = TypeVar("T")

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """preexec_fn: the kernel kills the child when the test process goes, however it goes."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({result.returncode}): {result.stderr}")
    return result


OUTER_NETNS_ENV = "KELIPSFS_LAB_OUTER_NETNS"


def _netns_inode() -> int:
    return os.stat("/proc/self/ns/net").st_ino


def _isolated() -> bool:
    """True when this process's network namespace is not the one the test was started in."""
    outer = os.environ.get(OUTER_NETNS_ENV)
    return outer is not None and int(outer) != _netns_inode()


def _fresh() -> bool:
    """A new network namespace has nothing but its loopback interface."""
    return [name for _, name in socket.if_nameindex()] == ["lo"]


def lab_test(timeout: float) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Run the decorated test in a fresh network + mount namespace, bounded by ``timeout``.

    Outside the namespace the wrapper starts the inner pytest run of the same test and fails
    with its output if it fails; inside it refuses to run unless isolated, then runs the body.
    """

    def decorate(fn: Callable[..., None]) -> Callable[..., None]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> None:
            if os.environ.get(LAB_ENV) == "1":
                if not _isolated() or not _fresh():
                    raise RuntimeError("a lab test must run in its own, new network namespace")
                fn(*args, **kwargs)
                return
            _run_isolated(fn, timeout)

        return wrapper

    return decorate


def _run_isolated(fn: Callable[..., None], timeout: float) -> None:
    if os.geteuid() != 0:
        pytest.fail("lab tests need root (network namespaces, iptables)")
    source = Path(inspect.getsourcefile(fn) or "")
    nodeid = f"{source.relative_to(REPO)}::{fn.__name__}"
    env = dict(os.environ, **{LAB_ENV: "1", OUTER_NETNS_ENV: str(_netns_inode())})
    cmd = ["unshare", "--net", "--mount", "--propagation", "private", "--",
           sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
           "-o", "addopts=", nodeid]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate(timeout=30)
        pytest.fail(f"lab test exceeded {timeout:.0f} s:\n{output[-6000:]}")
    print(output[-6000:])
    if proc.returncode != 0:
        pytest.fail(f"lab test failed (exit {proc.returncode}):\n{output[-8000:]}")


def report(name: str, **figures: Any) -> None:
    """Print a scenario's measurements as one JSON line (collected for the closing note)."""
    print("LAB-RESULT " + json.dumps({"scenario": name, **figures}, sort_keys=True), flush=True)
    target = os.environ.get("KELIPSFS_LAB_RESULTS")
    if target:
        with open(target, "a") as fh:
            fh.write(json.dumps({"scenario": name, **figures}, sort_keys=True) + "\n")


@dataclass
class Host:
    index: int
    data_dir: Path
    proc: subprocess.Popen[str] | None = None
    log: Path | None = None
    procs: list[subprocess.Popen[str]] = field(default_factory=list)

    @property
    def ns(self) -> str:
        return f"h{self.index}"

    @property
    def ip(self) -> str:
        return f"{SUBNET}.{self.index}"

    @property
    def address(self) -> str:
        return f"{self.ip}:{PORT}"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class Lab:
    """Hosts, their node processes, faults, and a client (the driver at 10.77.0.254)."""

    def __init__(self, root: Path, hosts: int, settings: Iterable[str] = (),
                 key: bool = True) -> None:
        if os.environ.get(LAB_ENV) != "1" or not _isolated():
            raise RuntimeError("Lab used outside a lab_test (it must run in its own namespace)")
        self.root = root
        self.settings = list(settings)
        self.key_file: Path | None = root / "cluster.key" if key else None
        self.hosts = [Host(i, root / f"h{i}") for i in range(1, hosts + 1)]
        self._bootstrap: subprocess.Popen[str] | None = None
        self._shaped: set[int] = set()

    # ---- topology ------------------------------------------------------------------------

    def __enter__(self) -> Lab:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _build(self) -> None:
        os.makedirs("/run/netns", exist_ok=True)
        _run("mount", "-t", "tmpfs", "lab-netns", "/run/netns")
        _run("ip", "link", "set", "lo", "up")
        _run("ip", "netns", "add", "kbr")
        _run("ip", "-n", "kbr", "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", "kbr", "link", "set", "br0", "up")
        _run("ip", "link", "add", "drv", "type", "veth", "peer", "name", "pdrv", "netns", "kbr")
        _run("ip", "-n", "kbr", "link", "set", "pdrv", "master", "br0", "up")
        _run("ip", "addr", "add", f"{DRIVER_ADDRESS}/24", "dev", "drv")
        _run("ip", "link", "set", "drv", "up")
        for host in self.hosts:
            self._add_host(host)
        if self.key_file is not None:
            self.key_file.parent.mkdir(parents=True, exist_ok=True)
            self._cli("keygen", str(self.key_file))

    def _add_host(self, host: Host) -> None:
        ns = host.ns
        _run("ip", "netns", "add", ns)
        _run("ip", "link", "add", f"p{ns}", "type", "veth", "peer", "name", "eth0", "netns", ns)
        _run("ip", "link", "set", f"p{ns}", "netns", "kbr")
        _run("ip", "-n", "kbr", "link", "set", f"p{ns}", "master", "br0", "up")
        _run("ip", "-n", ns, "addr", "add", f"{host.ip}/24", "dev", "eth0")
        _run("ip", "-n", ns, "link", "set", "eth0", "up")
        _run("ip", "-n", ns, "link", "set", "lo", "up")
        for chain, hook in (("KLAB-IN", "INPUT"), ("KLAB-OUT", "OUTPUT")):
            self._ipt(host, "-N", chain)
            self._ipt(host, "-A", hook, "-j", chain)
        host.data_dir.mkdir(parents=True, exist_ok=True)

    def _ipt(self, host: Host, *args: str) -> None:
        _run("ip", "netns", "exec", host.ns, "iptables", "-w", *args)

    def close(self) -> None:
        for host in self.hosts:
            for proc in [host.proc, *host.procs]:
                if proc is not None and proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=10)
        if self._bootstrap is not None and self._bootstrap.poll() is None:
            os.killpg(self._bootstrap.pid, signal.SIGKILL)
            self._bootstrap.wait(timeout=10)
        for host in self.hosts:
            _run("ip", "netns", "del", host.ns, check=False)
        _run("ip", "netns", "del", "kbr", check=False)
        _run("umount", "-l", "/run/netns", check=False)

    # ---- processes -----------------------------------------------------------------------

    def _cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([sys.executable, "-m", "kelipsfs.cli", *args],
                                capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            raise RuntimeError(f"kelipsfs {' '.join(args)}: {result.stderr}")
        return result

    def _spawn(self, host: Host, args: list[str], log: Path) -> subprocess.Popen[str]:
        cmd = ["ip", "netns", "exec", host.ns, sys.executable, "-m", "kelipsfs.cli", *args]
        with open(log, "a") as fh:
            return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=fh, text=True,
                                    start_new_session=True, preexec_fn=_die_with_parent,
                                    cwd=REPO)

    def start_bootstrap(self, host: Host) -> str:
        """The introducer, on ``host``'s address at port PORT + 1."""
        args = ["bootstrap", "--listen", f"{host.ip}:{PORT + 1}"]
        if self.key_file is not None:
            args += ["--cluster-key-file", str(self.key_file)]
        self._bootstrap = self._spawn(host, args, host.data_dir.parent / "bootstrap.log")
        time.sleep(0.5)
        if self._bootstrap.poll() is not None:
            raise RuntimeError("bootstrap exited at start")
        return f"{host.ip}:{PORT + 1}"

    def stop_bootstrap(self) -> None:
        if self._bootstrap is not None and self._bootstrap.poll() is None:
            os.killpg(self._bootstrap.pid, signal.SIGKILL)
            self._bootstrap.wait(timeout=10)

    def start(self, host: Host, join: Iterable[Host] = (), bootstrap: str | None = None,
              wait: bool = True, key_file: Path | None = None, keyless: bool = False) -> None:
        """Start (or restart, same data dir) the node of ``host``; ready = endpoint.json.

        ``key_file`` replaces the lab's cluster key; ``keyless`` starts an open-cluster node.
        """
        args = ["node", "--data-dir", str(host.data_dir), "--listen", host.address]
        for other in join:
            args += ["--join", other.address]
        if bootstrap:
            args += ["--bootstrap", bootstrap]
        chosen = None if keyless else key_file or self.key_file
        if chosen is not None:
            args += ["--cluster-key-file", str(chosen)]
        for setting in self.settings:
            args += ["--set", setting]
        host.log = self.root / f"{host.ns}.log"  # not in the data dir: it may be a tiny disk
        host.proc = self._spawn(host, args, host.log)
        if wait:
            self.wait_ready(host)

    def start_all(self) -> None:
        """The first host starts the cluster, the others join through it."""
        first, *rest = self.hosts
        self.start(first)
        for host in rest:
            self.start(host, join=[first])

    def wait_ready(self, host: Host) -> None:
        assert host.proc is not None
        endpoint = host.data_dir / "endpoint.json"
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            try:
                if json.loads(endpoint.read_text()).get("pid") == host.proc.pid:
                    return
            except (OSError, ValueError):
                pass
            if host.proc.poll() is not None:
                raise RuntimeError(f"{host.ns} exited {host.proc.returncode}:\n{self.log(host)}")
            time.sleep(0.05)
        raise TimeoutError(f"{host.ns} not ready in {READY_TIMEOUT}s:\n{self.log(host)}")

    def log(self, host: Host) -> str:
        return host.log.read_text()[-4000:] if host.log and host.log.exists() else ""

    def kill(self, host: Host, sig: int = signal.SIGKILL, timeout: float = 30.0) -> int:
        """Signal the host's node and wait for it; returns the exit code."""
        assert host.proc is not None
        if host.proc.poll() is None:
            os.killpg(host.proc.pid, sig)
            try:
                host.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(host.proc.pid, signal.SIGKILL)
                host.proc.wait(timeout=10)
                raise
        return host.proc.returncode

    # ---- faults --------------------------------------------------------------------------

    def cut(self, host: Host) -> None:
        """Silent loss of the whole host: its bridge port goes down (peers time out)."""
        _run("ip", "-n", "kbr", "link", "set", f"p{host.ns}", "down")

    def reconnect(self, host: Host) -> None:
        _run("ip", "-n", "kbr", "link", "set", f"p{host.ns}", "up")

    def partition(self, side_a: Iterable[Host], side_b: Iterable[Host]) -> None:
        """Drop all traffic between the sides (the driver still reaches everyone)."""
        a, b = list(side_a), list(side_b)
        for mine, theirs in ((a, b), (b, a)):
            for host in mine:
                for other in theirs:
                    self._ipt(host, "-A", "KLAB-IN", "-s", other.ip, "-j", "DROP")
                    self._ipt(host, "-A", "KLAB-OUT", "-d", other.ip, "-j", "DROP")

    def loss(self, probability: float, hosts: Iterable[Host] | None = None) -> None:
        """Random loss on every host-to-host link, each direction (iptables statistic).

        Dropped on arrival only, so a packet crosses one drop point: the loss per link and
        direction is ``probability`` (not 1 - (1 - p)^2). The driver's traffic is spared.
        """
        for host in hosts or self.hosts:
            self._ipt(host, "-A", "KLAB-IN", "!", "-s", DRIVER_ADDRESS, "-m", "statistic",
                      "--mode", "random", "--probability", f"{probability:.4f}", "-j", "DROP")

    def metrics(self, host: Host) -> dict[str, float]:
        """The node's /metrics, summed by series name with labels (``name{k="v"}`` keys)."""
        import urllib.request
        with urllib.request.urlopen(f"http://{host.address}/metrics", timeout=10) as response:
            text = response.read().decode()
        values: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                series, value = line.rsplit(" ", 1)
                values[series] = float(value)
        return values

    def cap_bandwidth(self, host: Host, rate: str = "10mbit") -> None:
        """A token-bucket cap on the host's egress (tc tbf; this kernel has no netem)."""
        _run("ip", "netns", "exec", host.ns, "tc", "qdisc", "replace", "dev", "eth0", "root",
             "tbf", "rate", rate, "burst", "32kbit", "latency", "400ms")
        self._shaped.add(host.index)

    def heal_all(self) -> None:
        """Undo every fault: rules flushed, shaping removed, links up."""
        for host in self.hosts:
            self._ipt(host, "-F", "KLAB-IN")
            self._ipt(host, "-F", "KLAB-OUT")
            if host.index in self._shaped:
                _run("ip", "netns", "exec", host.ns, "tc", "qdisc", "del", "dev", "eth0", "root",
                     check=False)
            self.reconnect(host)
        self._shaped.clear()

    # ---- client (the driver) -------------------------------------------------------------

    def target(self, host: Host, key_file: Path | None = None) -> Target:
        from daemon.security import load_key, open_cluster_key
        chosen = key_file or self.key_file
        key = load_key(chosen) if chosen is not None else open_cluster_key("kelipsfs")
        return Target((host.ip, PORT), key)

    def run(self, host: Host, job: Callable[[Client], Awaitable[T]], timeout: float = 60.0,
            key_file: Path | None = None) -> T:
        """Run ``job(client)`` against ``host``'s node, with a bound on the whole call."""
        async def main() -> T:
            client = Client(self.target(host, key_file), timeout=timeout)
            try:
                with trio.fail_after(timeout):
                    return await job(client)
            finally:
                await client.aclose()
        return trio.run(main)

    def status(self, host: Host) -> dict[str, Any]:
        doc: dict[str, Any] = self.run(host, lambda c: c.status(), timeout=10)
        return doc

    def put(self, host: Host, name: str, data: bytes) -> Any:
        path = self.root / "upload.tmp"
        path.write_bytes(data)
        return self.run(host, lambda c: c.put(path, name, False))

    def get(self, host: Host, name: str, timeout: float = 30.0) -> bytes:
        return self.run(host, functools.partial(fetch, name=name), timeout=timeout)

    def many(self, calls: list[tuple[Host, Callable[[Client], Awaitable[T]]]],
             limit: int = 8, timeout: float = 300.0, key_file: Path | None = None
             ) -> list[T | Exception]:
        """Run many client calls concurrently (one pooled client per host); errors returned."""
        async def main() -> list[T | Exception]:
            clients: dict[int, Client] = {}
            results: list[T | Exception] = [RuntimeError("not run")] * len(calls)
            limiter = trio.CapacityLimiter(limit)

            async def one(i: int, host: Host, job: Callable[[Client], Awaitable[T]]) -> None:
                async with limiter:
                    try:
                        results[i] = await job(clients[host.index])
                    except Exception as exc:  # reported to the test, which decides
                        results[i] = exc

            for host, _ in calls:
                if host.index not in clients:
                    clients[host.index] = Client(self.target(host, key_file), timeout=60)
            try:
                with trio.fail_after(timeout):
                    async with trio.open_nursery() as nursery:
                        for i, (host, job) in enumerate(calls):
                            nursery.start_soon(one, i, host, job)
            finally:
                for client in clients.values():
                    await client.aclose()
            return results
        return trio.run(main)

    def put_many(self, items: list[tuple[Host, str, bytes]], limit: int = 8
                 ) -> list[Any | Exception]:
        """Put every (host, name, data); each body goes through a file, as `kelipsfs put`."""
        spool = self.root / "spool"
        spool.mkdir(exist_ok=True)
        calls: list[tuple[Host, Callable[[Client], Awaitable[Any]]]] = []
        for i, (host, name, data) in enumerate(items):
            path = spool / f"{i}"
            path.write_bytes(data)
            calls.append((host, functools.partial(_put, path=path, name=name)))
        return self.many(calls, limit)

    def get_many(self, items: list[tuple[Host, str]], limit: int = 8
                 ) -> list[bytes | Exception]:
        return self.many([(host, functools.partial(fetch, name=name)) for host, name in items],
                         limit)

    def wait_for(self, predicate: Callable[[], bool], timeout: float, what: str,
                 step: float = 0.25) -> float:
        """Poll until ``predicate`` holds; returns the seconds it took."""
        started = time.monotonic()
        last: Exception | None = None
        while time.monotonic() - started < timeout:
            try:
                if predicate():
                    return time.monotonic() - started
            except Exception as exc:  # a node may be mid-restart: keep polling, report the last
                last = exc
            time.sleep(step)
        raise TimeoutError(f"timed out after {timeout}s waiting for {what}"
                           + (f" (last error: {last!r})" if last else ""))


async def _put(client: Client, path: Path, name: str) -> Any:
    return await client.put(path, name, False)


async def fetch(client: Client, name: str) -> bytes:
    """An object's bytes through ``client`` (a lab job)."""
    out = io.BytesIO()
    await client.get(name, out, False)
    return out.getvalue()
