"""A test harness: real `kelipsfs node` processes on distinct loopback addresses.

Every process is started in its own session and killed (SIGKILL after a bounded SIGTERM wait)
when the harness closes, whatever the test did. Addresses are 127.0.0.x, never anything that
could leave the machine.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

READY_TIMEOUT = 30.0
CLI_TIMEOUT = 120.0


def node_id_in_group(group: int, k: int, salt: str) -> str:
    """A node id (hex) that hashes into ``group``: tests that need every group populated
    write it into the data dir's node.json instead of hoping random ids spread."""
    import hashlib

    from daemon.core.ids import group_of_node
    for i in range(100_000):
        node_id = hashlib.sha1(f"{salt}-{i}".encode()).digest()
        if group_of_node(node_id, k) == group:
            return node_id.hex()
    raise AssertionError(f"no id of group {group} of {k}")


def preset_identity(data_dir: Path, node_id_hex: str) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "node.json").write_text(json.dumps({"node_id": node_id_hex, "incarnation": 0}))


def store_version_ahead(address: str, name: str, data: bytes, ahead_s: float) -> int:
    """Put ``data`` straight into a node's store as a version stamped ``ahead_s`` seconds
    ahead of now (a replica upload, as a holder receives it): what a writer whose clock runs
    ahead, or one writing at this very moment, leaves on the holders before its tuple is
    known. Returns that version's clock. (Open cluster: the key derives from the id.)"""
    import trio

    from daemon.digest import digest_of
    from daemon.peers import PeerClient, stream_of
    from daemon.security import Authenticator, open_cluster_key

    clock = int((time.time() + ahead_s) * 1000) << 16
    host, port = address.rsplit(":", 1)
    query = {"clock": clock, "writer": "ab" * 20, "size": len(data), "mode": 0o644,
             "mtime_ns": 1}

    async def upload() -> None:
        peers = PeerClient(Authenticator(open_cluster_key("kelipsfs")), 20.0)
        try:
            with trio.fail_after(30):
                async with peers.stream("PUT", (host, int(port)), "/v1/replica/" + name,
                                        query, body=stream_of(data),
                                        content_digest=digest_of(data)) as response:
                    answer = await response.aread()
                    assert response.status_code == 200, answer
        finally:
            await peers.aclose()

    trio.run(upload)
    return clock


def object_call(address: str, method: str, name: str, data: bytes | None = None) -> Any:
    """A raw object of the DHT (``/v1/objects/NAME``, stored as record ``o/NAME``): put
    ``data`` (returns the answer's JSON), get it (``data`` None: returns the bytes), or with
    method "STAT" its tuple and holders. (Open cluster: the key derives from the id.)"""
    import trio

    from daemon.digest import digest_of
    from daemon.peers import PeerClient, stream_of
    from daemon.security import Authenticator, open_cluster_key

    host, port = address.rsplit(":", 1)
    where = (host, int(port))

    async def call() -> Any:
        peers = PeerClient(Authenticator(open_cluster_key("kelipsfs")), 20.0)
        try:
            with trio.fail_after(60):
                if method == "PUT":
                    assert data is not None
                    async with peers.stream("PUT", where, "/v1/objects/" + name,
                                            {"size": len(data), "mode": 0o644, "mtime_ns": 1},
                                            body=stream_of(data),
                                            content_digest=digest_of(data)) as response:
                        answer = await response.aread()
                        assert response.status_code == 200, answer
                        return json.loads(answer)
                if method == "STAT":
                    doc, _ = await peers.call_json("GET", where, "/v1/objects-stat/" + name)
                    return doc
                response, _ = await peers.call("GET", where, "/v1/objects/" + name)
                return response.content
        finally:
            await peers.aclose()

    return trio.run(call)


@dataclass
class NodeProc:
    index: int
    address: str
    data_dir: Path
    proc: subprocess.Popen[str] | None = None
    log: Path | None = None
    extra: list[str] = field(default_factory=list)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class Cluster:
    """Start, stop, kill and talk to nodes; close() always cleans up."""

    def __init__(self, root: Path, settings: list[str] | None = None,
                 key_file: Path | None = None) -> None:
        self.root = root
        self.port = random.randint(20000, 40000)
        self.settings = settings or []
        self.key_file = key_file
        self.nodes: list[NodeProc] = []
        self.extra_procs: list[subprocess.Popen[str]] = []

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def new_node(self, join: list[NodeProc] | None = None, bootstrap: str | None = None,
                 extra: list[str] | None = None, wait: bool = True) -> NodeProc:
        index = len(self.nodes)
        node = NodeProc(index, f"127.0.0.{10 + index}:{self.port}",
                        self.root / f"node{index}", extra=list(extra or []))
        self.nodes.append(node)
        args = ["--listen", node.address]
        for other in join or []:
            args += ["--join", other.address]
        if bootstrap:
            args += ["--bootstrap", bootstrap]
        node.extra = args + node.extra
        self.start(node, wait)
        return node

    def start(self, node: NodeProc, wait: bool = True) -> None:
        node.data_dir.mkdir(parents=True, exist_ok=True)
        node.log = node.data_dir / f"node-{int(time.time() * 1000)}.log"
        cmd = [sys.executable, "-m", "kelipsfs.cli", "node", "--data-dir", str(node.data_dir),
               *node.extra]
        for setting in self.settings:
            cmd += ["--set", setting]
        if self.key_file is not None:
            cmd += ["--cluster-key-file", str(self.key_file)]
        with open(node.log, "w") as log:
            node.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, text=True,
                                         start_new_session=True)
        if wait:
            self.wait_ready(node)

    def wait_ready(self, node: NodeProc) -> None:
        """Ready = the node wrote its endpoint file with its own pid (after joining)."""
        assert node.proc is not None
        deadline = time.monotonic() + READY_TIMEOUT
        endpoint = node.data_dir / "endpoint.json"
        while time.monotonic() < deadline:
            try:
                if json.loads(endpoint.read_text()).get("pid") == node.proc.pid:
                    return
            except (OSError, ValueError):
                pass
            if node.proc.poll() is not None:
                raise RuntimeError(f"node {node.index} exited {node.proc.returncode}:\n"
                                   f"{self.log_text(node)}")
            time.sleep(0.05)
        raise TimeoutError(f"node {node.index} not ready in {READY_TIMEOUT}s:\n"
                           f"{self.log_text(node)}")

    def log_text(self, node: NodeProc) -> str:
        return node.log.read_text()[-4000:] if node.log and node.log.exists() else ""

    def kill(self, node: NodeProc, sig: int = signal.SIGKILL) -> None:
        if node.proc is not None and node.proc.poll() is None:
            os.killpg(node.proc.pid, sig)
            try:
                node.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(node.proc.pid, signal.SIGKILL)
                node.proc.wait(timeout=10)

    def stop(self, node: NodeProc) -> int:
        self.kill(node, signal.SIGTERM)
        assert node.proc is not None
        return node.proc.returncode

    def close(self) -> None:
        for proc in self.extra_procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        for node in self.nodes:
            if node.proc is not None and node.proc.poll() is None:
                os.killpg(node.proc.pid, signal.SIGKILL)
                node.proc.wait(timeout=10)

    def cli(self, node: NodeProc, *args: str, check: bool = True,
            input_bytes: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        cmd = [sys.executable, "-m", "kelipsfs.cli", *args, "--node", node.address]
        if self.key_file is not None:
            cmd += ["--cluster-key-file", str(self.key_file)]
        result = subprocess.run(cmd, capture_output=True, timeout=CLI_TIMEOUT,
                                input=input_bytes, cwd=self.root)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed ({result.returncode}): "
                                 f"{result.stderr.decode(errors='replace')}")
        return result

    def status(self, node: NodeProc) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(self.cli(node, "status", "--json").stdout)
        return doc

    def wait_for(self, predicate: Any, timeout: float, what: str, step: float = 0.5) -> None:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                if predicate():
                    return
            except (AssertionError, ValueError, KeyError) as exc:
                last = exc
            time.sleep(step)
        raise TimeoutError(f"timed out after {timeout}s waiting for {what}"
                           + (f" (last error: {last})" if last else ""))
