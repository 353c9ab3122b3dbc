"""Bulk connections (daemon.bulk) against a real node: same API and checks as HTTP, raw bodies."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

import kelipsfs.client as client_module
from daemon import bulk
from daemon.core.manifest import CHUNK_SIZE, RUN_CHUNKS, Manifest
from daemon.digest import Stopped, digest_of, new_hasher
from daemon.peers import (
    CONTENT_DIGEST_HEADER,
    TRAILER_MARK,
    LateDigest,
    PeerClient,
    PeerError,
    target_for,
)
from daemon.security import (
    BODY_TRAILER,
    DIGEST_IN_TRAILER,
    MAC_HEADER,
    Authenticator,
    open_cluster_key,
)
from kelipsfs.client import Client, ClientError, Target
from tests.cluster import Cluster, NodeProc

MiB = 1 << 20
TIMEOUT = 20.0


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProc]:
    with Cluster(tmp_path_factory.mktemp("bulk"), settings=["k=1"]) as c:
        yield c.new_node()


def address(node: NodeProc) -> tuple[str, int]:
    host, port = node.address.rsplit(":", 1)
    return host, int(port)


def peers(key: bytes | None = None) -> PeerClient:
    return PeerClient(Authenticator(key or open_cluster_key("kelipsfs")), TIMEOUT)


async def chunks(data: bytes, size: int = 256 * 1024) -> AsyncIterator[bytes]:
    for offset in range(0, len(data), size):
        yield data[offset:offset + size]


def run(fn: object) -> object:
    async def main() -> object:
        with trio.fail_after(60):
            return await fn()  # type: ignore[operator]
    return trio.run(main)


def test_put_and_get_a_large_file_in_bulk(node: NodeProc) -> None:
    data = os.urandom(3 * MiB + 7)
    sha = digest_of(data)

    async def roundtrip() -> tuple[int, bytes, dict[str, str], int]:
        client = peers()
        try:
            query = {"size": len(data), "mode": 0o640, "mtime_ns": 5}
            async with client.stream("PUT", address(node), "/v1/objects/bulk/big", query,
                                     body=chunks(data), content_digest=sha,
                                     bulk_size=len(data)) as put:
                put_status = put.status_code
                await put.aread()
            async with client.stream("GET", address(node), "/v1/objects/bulk/big",
                                     bulk_size=0) as got:
                body = await got.aread()
                headers = dict(got.headers)
                status = got.status_code
            return put_status, body, headers, status
        finally:
            await client.aclose()

    put_status, body, headers, status = run(roundtrip)  # type: ignore[misc]
    assert (put_status, status) == (200, 200)
    assert body == data
    assert headers["x-kelips-checksum"] == digest_of(data).hex()
    assert headers["x-kelips-mode"] == str(0o640)
    # the same object over plain HTTP: one API, two framings
    got = httpx.get(f"http://{node.address}/v1/status")
    assert got.status_code == 401  # unsigned HTTP is still refused the same way


def test_an_unsigned_upload_is_refused_early(node: NodeProc) -> None:
    """A wrong key: 401 arrives while the client is still sending, and the upload stops."""
    data = os.urandom(64 * MiB)
    sha = digest_of(data)

    async def upload() -> tuple[int, bytes]:
        client = peers(key=b"k" * 32)
        try:
            async with client.stream("PUT", address(node), "/v1/objects/bulk/refused",
                                     {"size": len(data)}, body=chunks(data, MiB),
                                     content_digest=sha, bulk_size=len(data)) as answer:
                return answer.status_code, await answer.aread()
        finally:
            await client.aclose()

    status, body = run(upload)  # type: ignore[misc]
    assert status == 401 and b"not authenticated" in body
    assert _get_status(node, "bulk/refused") == 404


def _get_status(node: NodeProc, name: str) -> int:
    """The status of a signed bulk get of ``name``: 404 means nothing was stored."""
    async def get() -> int:
        client = peers()
        try:
            async with client.stream("GET", address(node), "/v1/objects/" + name,
                                     bulk_size=0) as answer:
                await answer.aread()
                return answer.status_code
        finally:
            await client.aclose()

    status: int = run(get)  # type: ignore[assignment]
    return status


def test_a_short_body_stores_nothing(node: NodeProc) -> None:
    data = b"x" * MiB
    sha = digest_of(data * 2)

    async def short() -> None:
        client = peers()
        try:
            async with client.stream("PUT", address(node), "/v1/objects/bulk/short",
                                     {"size": 2 * MiB}, body=chunks(data), content_digest=sha,
                                     bulk_size=2 * MiB):
                pass
        finally:
            await client.aclose()

    with pytest.raises(PeerError, match="body of 1048576 bytes, 2097152 announced"):
        run(short)
    assert _get_status(node, "bulk/short") == 404


def test_errors_of_the_callers_body_propagate(node: NodeProc, tmp_path: Path) -> None:
    async def failing() -> AsyncIterator[bytes]:
        yield b"abc"
        raise FileNotFoundError("the source went away")

    async def put() -> None:
        client = peers()
        try:
            async with client.stream("PUT", address(node), "/v1/objects/bulk/gone", {"size": 9},
                                     body=failing(), content_digest=b"\0" * 32, bulk_size=9):
                pass
        finally:
            await client.aclose()

    with pytest.raises(FileNotFoundError, match="went away"):
        run(put)


def _head(method: str, target: str, headers: dict[str, str]) -> bytes:
    payload = json.dumps({"method": method, "target": target, "headers": headers}).encode()
    return bulk.MAGIC + struct.pack(">I", len(payload)) + payload


def _raw_exchange(node: NodeProc, data: bytes, pause_after: int | None = None) -> bytes | None:
    """Send raw bytes on a fresh connection; whatever comes back before it closes."""
    with socket.create_connection(address(node), timeout=TIMEOUT) as sock:
        if pause_after is not None:
            sock.sendall(data[:pause_after])
            time.sleep(0.2)
            data = data[pause_after:]
        sock.sendall(data)
        return _half_close_and_read(sock)


def _half_close_and_read(sock: socket.socket) -> bytes | None:
    """Say the request is over (SHUT_WR) and read what the node answers, if anything."""
    sock.shutdown(socket.SHUT_WR)
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except ConnectionResetError:
        pass
    return received or None


@pytest.mark.parametrize("garbage", [
    bulk.MAGIC + struct.pack(">I", bulk.HEAD_MAX + 1) + b"{}",
    bulk.MAGIC + struct.pack(">I", 5) + b"nope!",
    bulk.MAGIC + struct.pack(">I", 2) + b"[]",
    _head("GET", "no-slash", {}),
    bulk.MAGIC + struct.pack(">I", 50) + b'{"method": "GET", "target": "/v1/status", "head',
    _head("GET", "/v1/status", {"content-length": "-5"}),
])
def test_malformed_bulk_connections_are_closed(node: NodeProc, garbage: bytes) -> None:
    assert _raw_exchange(node, garbage) is None
    assert httpx.get(f"http://{node.address}/metrics").status_code == 200  # still serving


def test_a_magic_split_across_packets_is_still_bulk(node: NodeProc) -> None:
    answer = _raw_exchange(node, _head("GET", "/v1/status", {}), pause_after=2)
    assert answer is not None
    length = struct.unpack(">I", answer[:4])[0]
    head = json.loads(answer[4:4 + length])
    assert head["status"] == 401  # unsigned: refused by the same check as HTTP
    assert json.loads(answer[4 + length:])["error"].startswith("request not authenticated")


def _metric(node: NodeProc, name: str) -> float:
    text = httpx.get(f"http://{node.address}/metrics").text
    values = [float(line.split()[-1]) for line in text.splitlines()
              if line.startswith(name + " ") or line.startswith(name + "{")]
    return sum(values)


def _stored_chunks(node: NodeProc) -> float:
    return _metric(node, "kelips_stored_chunks")


def _big_file(tmp_path: Path, size: int) -> tuple[Path, bytes]:
    data = os.urandom(size)
    source = tmp_path / "big.bin"
    source.write_bytes(data)
    return source, data


def _joined(c: Cluster, count: int) -> list[NodeProc]:
    """``count`` nodes of one cluster, each knowing all the others."""
    nodes = [c.new_node()]
    nodes += [c.new_node(join=[nodes[0]]) for _ in range(count - 1)]
    c.wait_for(lambda: all(len(c.status(n)["members"]) == count for n in nodes), 30, "joins")
    return nodes


def test_a_large_get_is_fetched_from_the_holders(tmp_path: Path) -> None:
    """The node a client asks answers a large read of a file stored whole (the largest one
    not chunked) with the holders (303); the client fetches from the nearest, and from the
    next ones when a holder is dead."""
    source, data = _big_file(tmp_path, CHUNK_SIZE)
    with Cluster(tmp_path / "c", settings=["k=1", "replication=2"]) as c:
        nodes = _joined(c, 4)
        c.cli(nodes[0], "put", str(source), "big")
        ids = {c.status(n)["node_id"]: n for n in nodes}
        holders = json.loads(c.cli(nodes[0], "stat", "big").stdout)["tuple"]["holders"]
        asker = next(n for node_id, n in ids.items() if node_id not in holders)
        out = tmp_path / "out.bin"
        c.cli(asker, "get", "big", str(out))
        assert out.read_bytes() == data
        assert _metric(asker, "kelips_reads_sent_to_holders_total") == 1
        c.kill(ids[holders[0]])  # not yet detected: the 303 still names it
        out.unlink()
        c.cli(asker, "get", "big", str(out))
        assert out.read_bytes() == data


def test_a_large_put_is_sent_to_a_holder(tmp_path: Path) -> None:
    """A node that is not a holder of a large upload's name (the largest file stored whole)
    answers the client with the holders (307) without reading the body; the client sends it
    to the first, which stores it and relays it to the others. A node that is a holder
    stores and relays it itself."""
    source, data = _big_file(tmp_path, CHUNK_SIZE)
    with Cluster(tmp_path / "c", settings=["k=1", "replication=2"]) as c:
        nodes = _joined(c, 4)
        ids = {c.status(n)["node_id"]: n for n in nodes}
        asker_id = c.status(nodes[0])["node_id"]
        redirected = []
        for i in range(16):  # each name is held by the asked node with probability 1/2
            name = f"direct/put-{i}"
            c.cli(nodes[0], "put", str(source), name)
            holders = json.loads(c.cli(nodes[0], "stat", name).stdout)["tuple"]["holders"]
            assert len(holders) == 2
            for holder in holders:
                assert _held(ids[holder], "replica", _content_record(c, nodes[0], name)) == data
            if asker_id not in holders:
                redirected.append(name)
            # sent to a holder, not relayed by the asked node after all: it stored (and
            # counted) only the names it holds
            assert _metric(nodes[0], "kelips_puts_sent_to_holders_total") == len(redirected)
            assert _metric(nodes[0], 'kelips_puts_total{result="ok"}') == i + 1 - len(redirected)
            if 2 <= len(redirected) <= i:
                break  # two redirected and at least one stored by the asked node itself
        assert redirected, "the asked node held every name: nothing was redirected"
        assert _temp_files(nodes[0]) == []  # the bytes sent before the 307 were dropped
        out = tmp_path / "out.bin"
        c.cli(nodes[3], "get", redirected[0], str(out))
        assert out.read_bytes() == data


def test_a_put_goes_to_the_node_when_the_holder_named_fails() -> None:
    """After a 307: a holder that cannot be reached, breaks off, refuses for a reason of its
    own (5xx, 401) or a 307 without usable holders: the client sends the upload to the node
    it asked, without ``direct``, and that node's answer is the put's. A holder's refusal of
    the content itself (422: not matching its digest) is the answer."""
    node_address = ("127.0.0.9", 4000)
    client = Client(Target(node_address, KEY))

    def attempt(answer: bytes, holder: int | Exception) -> list[tuple[tuple[str, int], bool]]:
        calls: list[tuple[tuple[str, int], bool]] = []

        async def upload(address: tuple[str, int], direct: bool,
                         extra: dict[str, object] | None = None) -> tuple[int, bytes]:
            calls.append((address, direct))
            if address == node_address:
                return 200, b"{}"
            if isinstance(holder, Exception):
                raise holder
            return holder, b"{}"

        async def main() -> tuple[int, bytes]:
            try:
                return await client._upload_to_holders(answer, upload)
            finally:
                await client.aclose()

        expected = holder if holder in (200, 422) else 200
        assert run(main) == (expected, b"{}")
        return calls

    named = json.dumps({"holders": ["127.0.0.7:4001", "127.0.0.8:4001"]}).encode()
    holder = (("127.0.0.7", 4001), False)
    node = (node_address, False)
    assert attempt(named, 200) == [holder]
    assert attempt(named, 422) == [holder]
    for failure in (PeerError("unreachable"), bulk.BulkError("cut"), 503, 500, 401):
        assert attempt(named, failure) == [holder, node], failure
    for useless in (b"not json", b"{}", b'{"holders": []}', b'{"holders": ["nonsense"]}',
                    b"[1]"):
        assert attempt(useless, 200) == [node], useless


def _client_put(node: NodeProc, source: Path, name: str) -> object:
    async def main() -> object:
        client = Client(Target(address(node), KEY))
        try:
            return await client.put(source, name, False)
        finally:
            await client.aclose()

    return run(main)


def test_a_file_that_grows_while_it_is_put_stores_nothing(
        node: NodeProc, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Bytes appended while the file is sent (here: just before it is hashed) would be left
    out of a copy cut at the first size; the client sees the change and fails the put."""
    source = tmp_path / "growing.bin"
    source.write_bytes(os.urandom(2 * MiB))
    real = client_module.fd_digest

    def grow_then_hash(fd: int, size: int, **kwargs: Any) -> bytes:
        with open(source, "ab") as fh:
            fh.write(b"appended while it was sent")
        return real(fd, size, **kwargs)

    monkeypatch.setattr(client_module, "fd_digest", grow_then_hash)
    with pytest.raises(ClientError, match="changed while it was sent"):
        _client_put(node, source, "client/growing")
    _assert_nothing_stored([node], "client/growing")


def test_a_file_with_content_but_size_0_is_refused(node: NodeProc) -> None:
    """A /proc file says 0 bytes and has content: refused, not stored as an empty object."""
    with pytest.raises(ClientError, match="reports a size of 0 but has content"):
        _client_put(node, Path("/proc/self/status"), "client/proc")
    _assert_nothing_stored([node], "client/proc", settle=0)


def test_a_failed_put_does_not_wait_for_the_whole_file_to_be_hashed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The node cannot be reached: the hashing thread is told to stop at once."""
    source = tmp_path / "sparse.bin"
    with open(source, "wb") as fh:
        fh.truncate(256 * MiB)
    real = client_module.fd_digest
    outcome: list[str] = []

    def recorded(fd: int, size: int, **kwargs: Any) -> bytes:
        try:
            return real(fd, size, block=4096, **kwargs)
        except Stopped:
            outcome.append("stopped")
            raise

    monkeypatch.setattr(client_module, "fd_digest", recorded)
    with socket.socket() as closed:  # a port nobody listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]

    async def main() -> None:
        client = Client(Target(("127.0.0.1", port), KEY))
        try:
            await client.put(source, "client/unreachable", False)
        finally:
            await client.aclose()

    with pytest.raises(ClientError, match="cannot connect"):
        run(main)
    assert outcome == ["stopped"]


def test_a_file_body_shorter_than_announced_stores_nothing(node: NodeProc,
                                                           tmp_path: Path) -> None:
    """A file that shrank after its size was announced: sendfile finds its end early, the
    request fails on the sender's side and the node keeps nothing."""
    data = os.urandom(MiB + 10)
    source = tmp_path / "shrunk.bin"
    source.write_bytes(data)
    name = "direct/shrunk"

    async def upload() -> None:
        client = peers()
        try:
            with open(source, "rb") as fh:
                async with client.stream("PUT", address(node), "/v1/files/" + name,
                                         {"size": len(data) + 5, "mode": 0o600, "mtime_ns": 1},
                                         body=bulk.FileBody(fh.fileno()),
                                         content_digest=digest_of(data),
                                         bulk_size=len(data) + 5) as answer:
                    await answer.aread()
        finally:
            await client.aclose()

    with pytest.raises(PeerError, match="ended 5 bytes short"):
        run(upload)
    _assert_nothing_stored([node], name)


# --- a body's digest in a signed trailer (hashed while sent) ---------------------------------

KEY = open_cluster_key("kelipsfs")
WRITER = "ab" * 20
#: (the head's MAC header, the body) -> the trailer bytes a test sends
MakeTrailer = Callable[[str, bytes], bytes]


def _sha(data: bytes) -> bytes:
    return digest_of(data)


def _good(head_mac: str, data: bytes) -> bytes:
    return Authenticator(KEY).sign_trailer(head_mac, _sha(data))


def _flipped_mac(head_mac: str, data: bytes) -> bytes:
    trailer = bytearray(_good(head_mac, data))
    trailer[-1] ^= 0x01
    return bytes(trailer)


def _flipped_digest(head_mac: str, data: bytes) -> bytes:
    trailer = bytearray(_good(head_mac, data))
    trailer[0] ^= 0x80
    return bytes(trailer)


def _foreign_key(head_mac: str, data: bytes) -> bytes:
    return Authenticator(b"k" * 32).sign_trailer(head_mac, _sha(data))


def _other_request(head_mac: str, data: bytes) -> bytes:
    """A genuine trailer, for another (signed) request of the same target: not for this one."""
    other = Authenticator(KEY).sign_request("PUT", "/v1/files/elsewhere", DIGEST_IN_TRAILER,
                                            time.time())[MAC_HEADER]
    return Authenticator(KEY).sign_trailer(other, _sha(data))


def _other_digest(head_mac: str, data: bytes) -> bytes:
    return Authenticator(KEY).sign_trailer(head_mac, _sha(data + b"!"))


def _raising(head_mac: str, data: bytes) -> bytes:
    raise RuntimeError("the source changed while it was sent")


def _trailer_headers(target: str) -> dict[str, str]:
    """A head signed for a digest that follows the body (what PeerClient.stream sends)."""
    headers = Authenticator(KEY).sign_request("PUT", target, DIGEST_IN_TRAILER, time.time())
    headers[CONTENT_DIGEST_HEADER] = TRAILER_MARK
    return headers


def _upload_target(kind: str, name: str, size: int) -> tuple[str, dict[str, object]]:
    if kind == "objects":
        return "/v1/objects/" + name, {"size": size, "mode": 0o640, "mtime_ns": 11}
    return "/v1/replica/" + name, {"clock": time.time_ns() // 1000, "writer": WRITER,
                                   "size": size, "mode": 0o640, "mtime_ns": 11}


def _put_with_trailer(node: NodeProc, kind: str, name: str, data: bytes,
                      make: MakeTrailer | None, size: int = BODY_TRAILER) -> tuple[int, bytes]:
    """A bulk upload whose digest is in a trailer made by ``make`` (none announced if None)."""
    path, query = _upload_target(kind, name, len(data))
    target = target_for(path, query)
    headers = _trailer_headers(target)
    async def made() -> bytes:
        assert make is not None
        return make(headers[MAC_HEADER], data)

    trailer = None if make is None else (size, made)

    async def upload() -> tuple[int, bytes]:
        async with bulk.request(address(node), "PUT", target, headers, chunks(data), len(data),
                                TIMEOUT, trailer) as answer:
            return answer.status_code, await answer.aread()

    result: tuple[int, bytes] = run(upload)  # type: ignore[assignment]
    return result


def _put_late(node: NodeProc, kind: str, name: str, data: bytes) -> tuple[int, bytes]:
    """The real sender's way: PeerClient.stream with a LateDigest hashed as the body goes."""
    path, query = _upload_target(kind, name, len(data))
    hasher = new_hasher()

    async def hashed() -> AsyncIterator[bytes]:
        async for chunk in chunks(data):
            hasher.update(chunk)
            yield chunk

    async def upload() -> tuple[int, bytes]:
        client = peers()
        try:
            async with client.stream("PUT", address(node), path, query, body=hashed(),
                                     content_digest=LateDigest(hasher.digest),
                                     bulk_size=len(data)) as answer:
                return answer.status_code, await answer.aread()
        finally:
            await client.aclose()

    result: tuple[int, bytes] = run(upload)  # type: ignore[assignment]
    return result


def _fetch(node: NodeProc, path: str) -> tuple[int, bytes, dict[str, str]]:
    """A signed bulk GET: status, body, headers."""
    async def get() -> tuple[int, bytes, dict[str, str]]:
        client = peers()
        try:
            async with client.stream("GET", address(node), path, bulk_size=0) as answer:
                return answer.status_code, await answer.aread(), dict(answer.headers)
        finally:
            await client.aclose()

    result: tuple[int, bytes, dict[str, str]] = run(get)  # type: ignore[assignment]
    return result


def _stored_as(kind: str, name: str) -> str:
    """The record an upload of ``kind`` named ``name`` is stored as."""
    return "o/" + name if kind == "objects" else name


def _content_record(c: Cluster, node: NodeProc, path: str) -> str:
    """The record holding the content of the file at ``path`` (what ``stat`` names)."""
    return str(json.loads(c.cli(node, "stat", path).stdout)["tuple"]["name"])


def _held(node: NodeProc, kind: str, name: str) -> bytes | None:
    """The bytes ``node`` serves for ``name`` (its replica, or the object); None if
    absent."""
    status, body, _ = _fetch(node, ("/v1/replica/" if kind == "replica" else "/v1/objects/")
                             + name)
    assert status in (200, 404), (status, body[:200])
    return body if status == 200 else None


def _temp_files(node: NodeProc) -> list[str]:
    return sorted(os.listdir(node.data_dir / "store" / "tmp"))


def _assert_nothing_stored(nodes: list[NodeProc], name: str, settle: float = 1.0) -> None:
    """No node holds ``name`` and no temp file is left, checked until ``settle`` has passed
    (a relayed upload ends on its holder a little after the client's answer)."""
    deadline = time.monotonic() + settle
    while True:
        for node in nodes:
            for record in (name, "o/" + name):
                assert _held(node, "replica", record) is None, f"{name} stored on {node.address}"
        assert _held(nodes[0], "objects", name) is None
        leftovers = {node.address: _temp_files(node) for node in nodes}
        if time.monotonic() >= deadline and not any(leftovers.values()):
            return
        if time.monotonic() >= deadline + 10:
            raise AssertionError(f"temp files left: {leftovers}")
        time.sleep(0.1)


def _auth_rejections(node: NodeProc) -> float:
    text = httpx.get(f"http://{node.address}/metrics", timeout=TIMEOUT).text
    prefix = 'kelips_rejected_packets_total{reason="http_auth"} '
    return sum(float(line[len(prefix):]) for line in text.splitlines()
               if line.startswith(prefix))


def _error(body: bytes) -> str:
    message: str = json.loads(body)["error"]
    return message


@pytest.mark.parametrize("kind", ["objects", "replica"])
@pytest.mark.parametrize("size", [0, 1, 100 * 1024, 2 * MiB + 3])
def test_an_upload_with_its_digest_in_a_trailer_is_stored(node: NodeProc, kind: str,
                                                          size: int) -> None:
    data = os.urandom(size)
    name = f"trailer/ok-{kind}-{size}"
    status, body = _put_late(node, kind, name, data)
    assert status == 200, body
    if kind == "objects":
        entry = json.loads(body)["tuple"]
        assert entry["checksum"] == digest_of(data).hex() and entry["size"] == size
        got_status, got, headers = _fetch(node, "/v1/objects/" + name)
        assert got_status == 200 and got == data
        assert headers["x-kelips-checksum"] == digest_of(data).hex()
        assert headers["x-kelips-mode"] == str(0o640)
    else:
        assert json.loads(body) == {"stored": size}
    assert _held(node, "replica", _stored_as(kind, name)) == data
    assert _temp_files(node) == []


@pytest.mark.parametrize("kind", ["objects", "replica"])
def test_a_hand_made_trailer_is_accepted_like_the_clients(node: NodeProc, kind: str) -> None:
    """The wire form on its own (bulk.request + sign_trailer), not only PeerClient's."""
    data = os.urandom(300 * 1024)
    status, body = _put_with_trailer(node, kind, f"trailer/hand-{kind}", data, _good)
    assert status == 200, body
    assert _held(node, "replica", _stored_as(kind, f"trailer/hand-{kind}")) == data


@pytest.mark.parametrize("kind", ["objects", "replica"])
@pytest.mark.parametrize(("make", "size", "words"), [
    (_flipped_mac, BODY_TRAILER, "bad mac"),
    (_flipped_digest, BODY_TRAILER, "bad mac"),
    (_foreign_key, BODY_TRAILER, "bad mac"),
    (_other_request, BODY_TRAILER, "bad mac"),
    (lambda head_mac, data: b"\0" * 10, 10, "malformed"),
], ids=["flipped-mac", "flipped-digest", "foreign-key", "other-request", "short"])
def test_a_trailer_that_is_not_authentic_is_refused(node: NodeProc, kind: str,
                                                    make: MakeTrailer, size: int,
                                                    words: str) -> None:
    data = os.urandom(MiB + 17)
    name = f"trailer/forged-{kind}-{make.__name__.strip('_<>')}-{size}"
    rejected = _auth_rejections(node)
    status, body = _put_with_trailer(node, kind, name, data, make, size)
    assert status == 401, body
    assert _error(body).startswith("body not authenticated") and words in _error(body)
    assert _auth_rejections(node) == rejected + 1
    _assert_nothing_stored([node], name, settle=0)


@pytest.mark.parametrize(("kind", "expected"), [("objects", 422), ("replica", 422)])
def test_a_body_not_matching_its_trailer_is_refused(node: NodeProc, kind: str,
                                                    expected: int) -> None:
    """An authentic trailer for other bytes: the holder's store refuses it (ChecksumMismatch:
    422), and a relaying node whose every holder refused so says 422 too."""
    data = os.urandom(MiB + 5)
    name = f"trailer/mismatch-{kind}"
    rejected = _auth_rejections(node)
    status, body = _put_with_trailer(node, kind, name, data, _other_digest)
    assert status == expected, body
    assert "digest" in _error(body)
    assert _auth_rejections(node) == rejected  # authentic: not an authentication failure
    _assert_nothing_stored([node], name, settle=0)


@pytest.mark.parametrize("kind", ["objects", "replica"])
def test_a_head_announcing_no_trailer_is_a_bad_request(node: NodeProc, kind: str) -> None:
    data = os.urandom(64 * 1024)
    name = f"trailer/none-{kind}"
    status, body = _put_with_trailer(node, kind, name, data, None)
    assert status == 400, body
    assert "trailer is missing" in _error(body)
    _assert_nothing_stored([node], name, settle=0)


def _raw_trailer_upload(node: NodeProc, kind: str, name: str, data: bytes, trailer: bytes,
                        how: str) -> bytes | None:
    """Head, body and ``trailer`` (a part of one) on a raw socket; then, per ``how``, half
    close and read what comes back ("shutdown") or close at once ("close")."""
    path, query = _upload_target(kind, name, len(data))
    target = target_for(path, query)
    headers = {**_trailer_headers(target), "content-length": str(len(data))}
    doc = {"method": "PUT", "target": target, "headers": headers, "trailer": BODY_TRAILER}
    payload = json.dumps(doc).encode()
    with socket.create_connection(address(node), timeout=TIMEOUT) as sock:
        sock.sendall(bulk.MAGIC + struct.pack(">I", len(payload)) + payload + data + trailer)
        if how == "close":
            return None
        return _half_close_and_read(sock)


@pytest.mark.parametrize("kind", ["objects", "replica"])
@pytest.mark.parametrize("sent", [0, 10, BODY_TRAILER - 1])
@pytest.mark.parametrize("how", ["shutdown", "close"])
def test_a_connection_closed_before_the_whole_trailer_stores_nothing(
        node: NodeProc, kind: str, sent: int, how: str) -> None:
    data = os.urandom(MiB + 3)
    name = f"trailer/cut-{kind}-{sent}-{how}"
    trailer = _good("00" * 32, data)[:sent]  # never complete, so its MAC does not matter
    answer = _raw_trailer_upload(node, kind, name, data, trailer, how)
    if answer is not None:  # the node may still say why before it closes
        length = struct.unpack(">I", answer[:4])[0]
        assert json.loads(answer[4:4 + length])["status"] != 200
    _assert_nothing_stored([node], name)


@pytest.mark.parametrize("sent", [0, 10])
def test_a_file_upload_cut_before_its_trailer_is_a_client_abort(node: NodeProc,
                                                                sent: int) -> None:
    """A client going away mid-upload is answered 499 (as a replica upload is), not a 500
    with a traceback in the log."""
    name = f"trailer/abort-{sent}"
    answer = _raw_trailer_upload(node, "objects", name, os.urandom(MiB + 3), b"\0" * sent,
                                 "shutdown")
    assert answer is not None
    length = struct.unpack(">I", answer[:4])[0]
    assert json.loads(answer[4:4 + length])["status"] == 499, answer[4 + length:]


@pytest.mark.parametrize("kind", ["objects", "replica"])
def test_a_trailer_that_cannot_be_made_closes_the_upload(node: NodeProc, kind: str) -> None:
    """``make()`` raises once the body is sent: its error propagates, no trailer is sent and
    the node keeps nothing."""
    name = f"trailer/unmade-{kind}"
    with pytest.raises(RuntimeError, match="changed while it was sent"):
        _put_with_trailer(node, kind, name, os.urandom(MiB + 9), _raising)
    _assert_nothing_stored([node], name)


@pytest.mark.parametrize("kind", ["objects", "replica"])
def test_a_late_digest_that_fails_closes_the_upload(node: NodeProc, kind: str) -> None:
    """The same through PeerClient.stream: a LateDigest raising (the client's file changed
    size) propagates unchanged and nothing is stored."""
    data = os.urandom(MiB + 1)
    name = f"trailer/late-fails-{kind}"
    path, query = _upload_target(kind, name, len(data))

    def digest() -> bytes:
        raise OSError("the file changed size while it was sent")

    async def upload() -> None:
        client = peers()
        try:
            async with client.stream("PUT", address(node), path, query, body=chunks(data),
                                     content_digest=LateDigest(digest), bulk_size=len(data)):
                pass
        finally:
            await client.aclose()

    with pytest.raises(OSError, match="changed size"):
        run(upload)
    _assert_nothing_stored([node], name)


@pytest.mark.parametrize("kind", ["objects", "replica"])
def test_a_trailer_is_refused_over_plain_http(node: NodeProc, kind: str) -> None:
    data = os.urandom(4096)
    name = f"trailer/http-{kind}"
    path, query = _upload_target(kind, name, len(data))
    target = target_for(path, query)
    headers = _trailer_headers(target)  # correctly signed: refused for the framing alone
    answer = httpx.put(f"http://{node.address}{target}", content=data, headers=headers,
                       timeout=TIMEOUT)
    assert answer.status_code == 400, answer.text
    assert "needs a bulk connection" in answer.json()["error"]
    _assert_nothing_stored([node], name, settle=0)


def test_a_late_digest_needs_a_bulk_connection() -> None:
    async def upload() -> None:
        client = peers()
        try:
            async with client.stream("PUT", ("127.0.0.1", 9), "/v1/files/x", {"size": 1},
                                     body=chunks(b"x"), content_digest=LateDigest(lambda: b""),
                                     bulk_size=None):
                pass
        finally:
            await client.aclose()

    with pytest.raises(ValueError, match="needs a bulk connection"):
        run(upload)


@pytest.mark.parametrize("trailer", [bulk.TRAILER_MAX + 1, -1, "64", 64.0, True, None])
def test_a_bad_trailer_size_closes_the_connection(node: NodeProc, trailer: object) -> None:
    doc = {"method": "GET", "target": "/v1/status", "headers": {}, "trailer": trailer}
    payload = json.dumps(doc).encode()
    assert _raw_exchange(node, bulk.MAGIC + struct.pack(">I", len(payload)) + payload) is None
    assert httpx.get(f"http://{node.address}/metrics").status_code == 200  # still serving


def test_a_trailer_of_the_largest_size_is_read(node: NodeProc) -> None:
    """An announced trailer is read (and handed on) even by a request that ignores it."""
    target = "/v1/status"
    headers = Authenticator(KEY).sign_request("GET", target, _sha(b""), time.time())

    async def trailer() -> bytes:
        return b"t" * bulk.TRAILER_MAX

    async def status() -> tuple[int, bytes]:
        async with bulk.request(address(node), "GET", target, headers, None, 0, TIMEOUT,
                                (bulk.TRAILER_MAX, trailer)) as answer:
            return answer.status_code, await answer.aread()

    result: tuple[int, bytes] = run(status)  # type: ignore[assignment]
    code, body = result
    assert code == 200 and "node_id" in json.loads(body)


# --- relayed: a node stores a client's trailer upload on every holder ------------------------


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, list[NodeProc]]]:
    with Cluster(tmp_path_factory.mktemp("trailer-pair"),
                 settings=["k=1", "replication=2"]) as c:
        nodes = [c.new_node()]
        nodes.append(c.new_node(join=[nodes[0]]))
        c.wait_for(lambda: all(len(c.status(n)["members"]) == 2 for n in nodes), 30, "joins")
        yield c, nodes


@pytest.mark.parametrize("size", [0, 100 * 1024, 2 * MiB + 3])
def test_a_trailer_upload_is_relayed_to_every_holder(
        pair: tuple[Cluster, list[NodeProc]], size: int) -> None:
    c, nodes = pair
    data = os.urandom(size)
    name = f"relay/ok-{size}"
    status, body = _put_late(nodes[0], "objects", name, data)
    assert status == 200, body
    entry = json.loads(body)["tuple"]
    assert entry["checksum"] == digest_of(data).hex()
    ids = {c.status(n)["node_id"] for n in nodes}
    assert set(entry["holders"]) == ids  # the asked node and the other one
    for holder in nodes:  # the other holder got the body with the asking node's trailer
        assert _held(holder, "replica", "o/" + name) == data
    assert _fetch(nodes[1], "/v1/objects/" + name)[:2] == (200, data)


def test_the_cli_put_sends_its_digest_in_a_trailer(pair: tuple[Cluster, list[NodeProc]],
                                                   tmp_path: Path) -> None:
    c, nodes = pair
    for size in (0, 5, CHUNK_SIZE):
        data = os.urandom(size)
        source = tmp_path / f"src-{size}"
        source.write_bytes(data)
        c.cli(nodes[1], "put", str(source), f"relay/cli-{size}")
        record = _content_record(c, nodes[0], f"relay/cli-{size}")
        for holder in nodes:
            assert _held(holder, "replica", record) == data
        out = tmp_path / f"out-{size}"
        c.cli(nodes[0], "get", f"relay/cli-{size}", str(out))
        assert out.read_bytes() == data


def test_a_cli_put_of_a_file_larger_than_a_chunk_is_stored_in_chunks(
        pair: tuple[Cluster, list[NodeProc]], tmp_path: Path) -> None:
    """The node asked stores a large upload as runs of chunks while it arrives and then the
    manifest; the file reads back whole through either node. An upload whose bytes do not
    match its digest is refused and leaves no chunk behind once the grace is over."""
    c, nodes = pair
    size = 2 * RUN_CHUNKS * CHUNK_SIZE + 5  # (two full runs and a short one)
    data = bytearray(os.urandom(size))
    data[CHUNK_SIZE:2 * CHUNK_SIZE] = bytes(CHUNK_SIZE)  # a hole: stored nowhere
    source = tmp_path / "chunked.bin"
    source.write_bytes(data)
    before = [_stored_chunks(n) for n in nodes]
    c.cli(nodes[1], "put", str(source), "relay/chunked.bin")
    record = _content_record(c, nodes[0], "relay/chunked.bin")
    manifest = Manifest.decode(_held(nodes[0], "replica", record) or b"")
    assert manifest.size == size and 1 not in manifest.chunks
    assert len(manifest.names(int(record[2:], 16))) == 4  # chunk 0, 2-15, 16-31, 32
    assert [_stored_chunks(n) - b for n, b in zip(nodes, before, strict=True)] == [4, 4]
    for node in nodes:
        out = tmp_path / "out.bin"
        c.cli(node, "get", "relay/chunked.bin", str(out))
        assert out.read_bytes() == data
    status, body = _put_with_trailer(nodes[0], "files", "relay/refused.bin", bytes(data),
                                     _other_digest, BODY_TRAILER)
    assert status == 422, body
    assert _fetch(nodes[0], "/v1/files/relay/refused.bin")[0] == 404


@pytest.mark.parametrize(("make", "size", "expected"), [
    (_flipped_mac, BODY_TRAILER, 401),
    (_foreign_key, BODY_TRAILER, 401),
    (_other_digest, BODY_TRAILER, 422),
    (None, 0, 400),
], ids=["flipped-mac", "foreign-key", "other-digest", "none"])
@pytest.mark.parametrize("size_of_body", [64 * 1024, 2 * MiB + 1])
def test_a_refused_trailer_is_stored_on_no_holder(
        pair: tuple[Cluster, list[NodeProc]], make: MakeTrailer | None, size: int,
        expected: int, size_of_body: int) -> None:
    _, nodes = pair
    name = f"relay/refused-{expected}-{getattr(make, '__name__', 'none')}-{size_of_body}"
    rejected = _auth_rejections(nodes[0])
    status, body = _put_with_trailer(nodes[0], "objects", name, os.urandom(size_of_body), make,
                                     size)
    assert status == expected, body
    assert _auth_rejections(nodes[0]) == rejected + (expected == 401)
    _assert_nothing_stored(nodes, name)


@pytest.mark.parametrize("how", ["shutdown", "close"])
def test_a_relayed_upload_cut_before_its_trailer_is_stored_on_no_holder(
        pair: tuple[Cluster, list[NodeProc]], how: str) -> None:
    _, nodes = pair
    name = f"relay/cut-{how}"
    data = os.urandom(2 * MiB + 7)
    answer = _raw_trailer_upload(nodes[0], "objects", name, data, b"", how)
    if answer is not None:
        length = struct.unpack(">I", answer[:4])[0]
        assert json.loads(answer[4:4 + length])["status"] != 200
    _assert_nothing_stored(nodes, name)


def test_a_connect_that_gets_no_answer_gives_up_after_its_own_timeout() -> None:
    """A holder's address that swallows the connection attempt (here: a listener whose
    backlog is full, so the kernel drops the SYN) fails the request after ``connect_timeout``,
    not after the whole transfer's timeout."""
    with contextlib.ExitStack() as stack:
        listener = stack.enter_context(socket.socket())
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        for _ in range(3):  # fill the accept queue (never accepted)
            waiting = stack.enter_context(socket.socket())
            waiting.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                waiting.connect(listener.getsockname())
        time.sleep(0.2)

        async def attempt() -> None:
            async with bulk.request(listener.getsockname(), "GET", "/v1/status", {}, None, 0,
                                    60.0, connect_timeout=0.5):
                pass

        started = time.monotonic()
        with pytest.raises(bulk.BulkError, match="cannot connect: TooSlowError"):
            run(attempt)
        assert 0.5 <= time.monotonic() - started < 5
