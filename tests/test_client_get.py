"""What ``kelipsfs get`` makes of a node's answer whose digest follows the bytes (a chunked
file sent as its chunks come): the bytes written are the object's alone, and a digest that
does not match them fails the get."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator, Mapping

import pytest
import trio

from daemon.digest import digest_of
from daemon.peers import DIGEST_AFTER_HEADER
from kelipsfs.client import GET_BLOCK, _copy_answer, _writer


class _Answer:
    """A node's 200 answer, its body handed out in blocks of ``step`` bytes."""

    def __init__(self, body: bytes, headers: Mapping[str, str], step: int) -> None:
        self.body = body
        self.headers = {**headers, "content-length": str(len(body))}
        self.step = step
        self.status_code = 200

    async def aread(self) -> bytes:
        return self.body

    async def aiter_bytes(self, chunk_size: int | None = None) -> AsyncIterator[bytes]:
        for start in range(0, len(self.body), self.step):
            yield self.body[start:start + self.step]


def _get(body: bytes, size: int, step: int) -> tuple[bytes, bytes, bytes]:
    """(what was written, the digest the answer gave, the digest of what was written)."""
    out = io.BytesIO()
    headers = {"x-kelips-size": str(size), DIGEST_AFTER_HEADER: "1", "x-kelips-clock": "7"}

    async def run() -> tuple[bytes, bytes]:
        async with _writer(out) as sink:
            meta = await _copy_answer(_Answer(body, headers, step), sink, False)  # type: ignore[arg-type]
        assert meta.size == size and meta.clock == 7
        return meta.checksum, sink.sha.digest()

    given, written = trio.run(run)
    return out.getvalue(), given, written


@pytest.mark.parametrize("size", [0, 10, GET_BLOCK - 5, GET_BLOCK, 3 * GET_BLOCK + 17])
@pytest.mark.parametrize("step", [1 << 16, 31, GET_BLOCK])
def test_the_digest_after_the_bytes_is_not_written(size: int, step: int) -> None:
    data = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    written, given, digest = _get(data + digest_of(data), size, step)
    assert written == data
    assert given == digest == digest_of(data)


def test_a_digest_that_does_not_match_the_bytes_is_seen() -> None:
    data = b"y" * (GET_BLOCK + 3)
    written, given, digest = _get(data + digest_of(b"other"), len(data), 1 << 16)
    assert written == data and given != digest  # (Client.get refuses the output then)
