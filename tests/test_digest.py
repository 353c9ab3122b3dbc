"""The content digest: one definition, the same value however it is computed."""

from __future__ import annotations

import random
from pathlib import Path

from blake3 import blake3

from daemon.digest import DIGEST_SIZE, EMPTY_DIGEST, digest_of, file_digest, new_hasher


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

