"""One Kademlia node (PyPI ``kademlia``, asyncio) as its own OS process, for bench.lookup_bench.

    python -m bench.kademlia_node --listen 127.0.0.10:31000 --ksize 3 [--join 127.0.0.10:31000]

Why a process per node: the comparison with kelipsfs is only fair if both systems pay for
real datagrams between processes and for one interpreter per node, as kelipsfs does.

The node listens for Kademlia RPCs on UDP HOST:PORT and takes commands from the benchmark
driver on TCP HOST:PORT (same number, other protocol), one JSON object per line:

- ``{"op": "set", "key": K, "value": HEX}`` stores a value through the DHT (``Server.set``);
- ``{"op": "get", "key": K}`` times ``await server.get(K)`` *inside this process*, so the
  control channel is never charged to Kademlia; answers ``{"held": true}`` without a lookup
  when this node already stores K (the benchmark only counts gets from non-holders);
- ``{"op": "keys"}`` lists the SHA-1 digests this node stores;
- ``{"op": "stats"}`` returns the datagram counters;
- ``{"op": "refresh"}`` looks up this node's own id again (Kademlia's join step), so nodes that
  joined a small network learn about the later ones.

Every datagram the node sends goes through a counting transport: requests and responses are
counted apart, by RPC name, with their UDP payload bytes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import time
from collections import defaultdict
from typing import Any

import umsgpack  # type: ignore[import-untyped]
from kademlia.network import Server  # type: ignore[import-untyped]
from kademlia.protocol import KademliaProtocol  # type: ignore[import-untyped]
from kademlia.utils import digest  # type: ignore[import-untyped]

from daemon.digest import digest_of

GET_TIMEOUT = 30.0


class Counters:
    """Datagrams and UDP payload bytes sent by this node, by kind (``req:find_value`` ...)."""

    def __init__(self) -> None:
        self.datagrams: dict[str, int] = defaultdict(int)
        self.bytes: dict[str, int] = defaultdict(int)
        self.pending: dict[bytes, str] = {}  # request msg id -> RPC name, to label our answer

    def sent(self, data: bytes) -> None:
        if data[:1] == b"\x00":
            try:
                name = str(umsgpack.unpackb(data[21:])[0])
            except Exception:
                name = "?"
            kind = "req:" + name
        else:
            kind = "resp:" + self.pending.pop(data[1:21], "?")
        self.datagrams[kind] += 1
        self.bytes[kind] += len(data)

    def received(self, data: bytes) -> None:
        if data[:1] == b"\x00" and len(data) > 21:
            with contextlib.suppress(Exception):
                self.pending[data[1:21]] = str(umsgpack.unpackb(data[21:])[0])

    def snapshot(self) -> dict[str, Any]:
        return {"datagrams": dict(self.datagrams), "bytes": dict(self.bytes)}


COUNTERS = Counters()


class _CountingTransport:
    """Wraps the datagram transport; only ``sendto`` is intercepted."""

    def __init__(self, inner: asyncio.DatagramTransport) -> None:
        self._inner = inner

    def sendto(self, data: bytes, addr: Any = None) -> None:
        COUNTERS.sent(data)
        self._inner.sendto(data, addr)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class CountingProtocol(KademliaProtocol):  # type: ignore[misc]
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(_CountingTransport(transport))  # type: ignore[arg-type]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        COUNTERS.received(data)
        super().datagram_received(data, addr)


class CountingServer(Server):  # type: ignore[misc]
    protocol_class = CountingProtocol


async def handle(server: Any, doc: dict[str, Any]) -> dict[str, Any]:
    op = doc.get("op")
    if op == "get":
        key = str(doc["key"])
        if server.storage.get(digest(key)) is not None:
            return {"held": True}
        started = time.perf_counter()
        try:
            value = await asyncio.wait_for(server.get(key), GET_TIMEOUT)
        except TimeoutError:
            value = None
        seconds = time.perf_counter() - started
        found = digest_of(value).hex() if isinstance(value, bytes) else None
        return {"held": False, "seconds": seconds, "digest": found}
    if op == "set":
        ok = await server.set(str(doc["key"]), bytes.fromhex(doc["value"]))
        return {"ok": bool(ok)}
    if op == "keys":
        return {"keys": [k.hex() for k, _ in server.storage]}
    if op == "stats":
        return COUNTERS.snapshot()
    if op == "refresh":
        await server.bootstrap(server.bootstrappable_neighbors())
        return {"ok": True, "neighbors": len(server.bootstrappable_neighbors())}
    return {"error": f"unknown op {op!r}"}


async def serve(host: str, port: int, ksize: int, join: str | None) -> None:
    server = CountingServer(ksize=ksize)
    await server.listen(port, interface=host)
    if join:
        jhost, jport = join.rsplit(":", 1)
        await server.bootstrap([(jhost, int(jport))])

    async def control(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                try:
                    reply = await handle(server, json.loads(line))
                except Exception as exc:  # e.g. set() with no live neighbour: max() of []
                    reply = {"error": repr(exc), "ok": False}
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    ctl = await asyncio.start_server(control, host, port)
    print("ready", flush=True)
    async with ctl:
        await ctl.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", required=True, help="HOST:PORT (UDP for RPCs, TCP control)")
    parser.add_argument("--ksize", type=int, default=20)
    parser.add_argument("--join", help="HOST:PORT of a node to bootstrap through")
    args = parser.parse_args()
    logging.basicConfig(level=logging.CRITICAL)  # rpcudp logs every timeout at ERROR
    host, port = args.listen.rsplit(":", 1)
    asyncio.run(serve(host, int(port), args.ksize, args.join))


if __name__ == "__main__":
    main()
