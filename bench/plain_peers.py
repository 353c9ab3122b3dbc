"""The least work a verified, replicated put can do on this machine: a plain Python baseline.

One sender process reads a file once, hashes it (with kelipsfs's content digest,
``daemon.digest``, so both do the same hashing) and sends it over loopback TCP to ``copies``
receiver processes; each receives into a reused buffer, hashes, writes, fsyncs and answers
with its digest, which the sender checks. No framing beyond a size, no
authentication, no event loop, no versions, no atomic commit: what is left is the data path
itself (reads, copies, hashes, socket and page-cache work, disk writes), so ``put`` beside it
says how much of its time is the protocol and how much is the machine.

    python -m bench.plain_peers FILE [--copies 3]      # prints seconds
"""

from __future__ import annotations

import argparse
import os
import queue
import socket
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path

from daemon.digest import new_hasher
from daemon.writeback import advance_writeback

BLOCK = 1 << 20
_SIZE = struct.Struct(">Q")


def _receive(listener: socket.socket, directory: Path) -> None:
    """One receiver: accept one upload, store it fsynced, answer with its digest."""
    conn, _ = listener.accept()
    with conn:
        (size,) = _SIZE.unpack(conn.recv(_SIZE.size, socket.MSG_WAITALL))
        hasher = new_hasher()
        buffer = bytearray(BLOCK)
        view = memoryview(buffer)
        fd, path = tempfile.mkstemp(dir=directory)
        try:
            left, written_out = size, 0
            while left:
                got = conn.recv_into(view[:min(BLOCK, left)])
                if not got:
                    raise ConnectionError("sender went away")
                hasher.update(view[:got])
                os.write(fd, view[:got])
                left -= got
                written_out = advance_writeback(fd, written_out, size - left)
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(path)
        conn.sendall(hasher.digest())


def _send_all(conn: socket.socket, blocks: queue.Queue[bytes | None]) -> None:
    while (block := blocks.get()) is not None:
        conn.sendall(block)


def put(source: Path, directory: Path, copies: int = 3) -> float:
    """Seconds to store ``copies`` verified, fsynced copies of ``source`` via receivers."""
    listeners, children = [], []
    for _ in range(copies):
        listener = socket.create_server(("127.0.0.1", 0))
        pid = os.fork()
        if pid == 0:  # the receiver
            code = 0
            try:
                _receive(listener, directory)
            except BaseException:
                code = 1
            os._exit(code)
        listeners.append(listener)
        children.append(pid)
    try:
        started = time.perf_counter()
        conns = [socket.create_connection(listener.getsockname()) for listener in listeners]
        size = source.stat().st_size
        hasher = new_hasher()
        # One thread per receiver (sendall releases the GIL), each fed the same blocks.
        queues: list[queue.Queue[bytes | None]] = [queue.Queue(8) for _ in conns]
        senders = [threading.Thread(target=_send_all, args=(conn, q)) for conn, q in
                   zip(conns, queues, strict=True)]
        for conn in conns:
            conn.sendall(_SIZE.pack(size))
        for thread in senders:
            thread.start()
        with open(source, "rb", buffering=0) as fh:
            while chunk := fh.read(BLOCK):
                hasher.update(chunk)
                for q in queues:
                    q.put(chunk)
        for q in queues:
            q.put(None)
        for thread in senders:
            thread.join()
        digest = hasher.digest()
        for conn in conns:
            if conn.recv(32, socket.MSG_WAITALL) != digest:
                raise RuntimeError("a receiver stored other bytes")
            conn.close()
        elapsed = time.perf_counter() - started
    finally:
        for listener in listeners:
            listener.close()
        for pid in children:
            _, status = os.waitpid(pid, 0)
            if status != 0:
                raise RuntimeError(f"receiver {pid} failed ({status})")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file", type=Path)
    parser.add_argument("--copies", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.file.parent) as directory:
        print(f"{put(args.file, Path(directory), args.copies):.3f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
