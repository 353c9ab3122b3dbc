"""The content digest: one definition, the same value however it is computed."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from blake3 import blake3

from daemon.digest import (
    DIGEST_SIZE,
    EMPTY_DIGEST,
    Stopped,
    digest_of,
    fd_digest,
    file_digest,
    new_hasher,
)


def test_every_way_of_hashing_gives_the_same_blake3_digest(tmp_path: Path) -> None:
    data = random.Random(1).randbytes(3 * (1 << 20) + 17)
    path = tmp_path / "content"
    path.write_bytes(data)
    hasher = new_hasher()
    for offset in range(0, len(data), 65_536):
        hasher.update(data[offset:offset + 65_536])
    expected = blake3(data).digest()
    assert digest_of(data) == hasher.digest() == file_digest(path) == expected
    assert len(expected) == DIGEST_SIZE
    assert digest_of(memoryview(data)) == digest_of(bytearray(data)) == expected


def test_no_bytes(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert EMPTY_DIGEST == digest_of(b"") == file_digest(empty) == new_hasher().digest()
    assert EMPTY_DIGEST.hex() == (  # BLAKE3's published digest of the empty input
        "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262")


def test_fd_digest_hashes_the_first_bytes_of_an_open_file(tmp_path: Path) -> None:
    data = random.Random(2).randbytes(2 * (1 << 20) + 5)
    path = tmp_path / "content"
    path.write_bytes(data + b"more after the announced size")
    with open(path, "rb") as fh:
        assert fd_digest(fh.fileno(), len(data)) == digest_of(data)
        assert fd_digest(fh.fileno(), len(data), block=4096) == digest_of(data)
        assert fd_digest(fh.fileno(), 0) == EMPTY_DIGEST


def test_fd_digest_of_a_file_shorter_than_announced_fails(tmp_path: Path) -> None:
    """A file truncated while it is uploaded: an error, never a digest of fewer bytes."""
    path = tmp_path / "short"
    path.write_bytes(b"x" * 1000)
    with open(path, "rb") as fh, pytest.raises(EOFError, match="1000 of 1001"):
        fd_digest(fh.fileno(), 1001)


def test_fd_digest_stops_when_told(tmp_path: Path) -> None:
    path = tmp_path / "content"
    path.write_bytes(b"y" * 10_000)
    calls = []

    def stop() -> bool:
        calls.append(1)
        return len(calls) > 2  # two blocks read, then stop

    with open(path, "rb") as fh, pytest.raises(Stopped, match="after 2000 of 10000"):
        fd_digest(fh.fileno(), 10_000, block=1000, stop=stop)
