"""The manifest of a chunked file and the names of its chunks (``daemon.core.manifest``)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from daemon.core.keys import is_legacy, is_metadata, placement_key
from daemon.core.manifest import (
    CHUNK_SIZE,
    RUN_CHUNKS,
    ChunkRef,
    Manifest,
    chunk_name,
    is_manifest,
    manifest_sizes,
    parse_chunk_name,
)


def _ref(index: int, length: int = 100, lead: int = 0) -> ChunkRef:
    return ChunkRef(index, abs(index - lead) * 7 + 1, length, bytes([index % 256]) * 32, lead)


@given(st.integers(1, (1 << 63) - 1), st.integers(0, (1 << 32) - 1), st.integers(0, (1 << 64) - 1))
def test_chunk_names_parse_back(ino: int, index: int, gen: int) -> None:
    name = chunk_name(ino, index, gen)
    assert parse_chunk_name(name) == (ino, index, gen)
    assert placement_key(name) == name  # placed by its own name, not with its inode
    assert not is_metadata(name) and not is_legacy(name)


@pytest.mark.parametrize("name", ["c/", "c/0000000000000001/00000000.000000000000000",
                                  "c/000000000000000g/00000000.0000000000000000",
                                  "c/0000000000000001/00000000-0000000000000000",
                                  "d/0000000000000001",
                                  "c/0000000000000001/0000000A.0000000000000000"])
def test_other_names_are_not_chunks(name: str) -> None:
    assert parse_chunk_name(name) is None


@given(st.integers(0, 1 << 40), st.data())
def test_manifest_round_trip(size: int, data: st.DataObject) -> None:
    count = -(-size // CHUNK_SIZE)
    indexes = data.draw(st.sets(st.integers(0, max(0, min(count, 50) - 1)), max_size=20)
                        if count else st.just(set()))
    manifest = Manifest(size, {i: _ref(i) for i in indexes})
    decoded = Manifest.decode(manifest.encode())
    assert decoded == manifest
    assert manifest_sizes(manifest.attrs()) == (size, 100 * len(indexes))
    assert is_manifest(manifest.attrs())


def test_a_run_is_one_object_read_by_ranges() -> None:
    refs = {i: _ref(i, CHUNK_SIZE, lead=i - 4) for i in range(4, 8)}
    refs[9] = _ref(9, 10)
    manifest = Manifest(9 * CHUNK_SIZE + 10, refs)
    assert Manifest.decode(manifest.encode()) == manifest
    assert manifest.names(3) == {chunk_name(3, 4, 29), chunk_name(3, 9, 64)}
    assert [refs[i].offset() for i in range(4, 8)] == [0, CHUNK_SIZE, 2 * CHUNK_SIZE,
                                                        3 * CHUNK_SIZE]
    assert refs[6].object_name(3) == chunk_name(3, 4, 29)


def test_manifests_of_single_chunk_objects_still_read() -> None:
    """A manifest written before runs (every chunk its own object) decodes the same."""
    refs = [_ref(0, CHUNK_SIZE), _ref(2, 10)]
    old = struct.pack(">4sIQI", b"KFM1", CHUNK_SIZE, 2 * CHUNK_SIZE + 10, len(refs)) + b"".join(
        struct.pack(">IQI32s", r.index, r.gen, r.length, r.checksum) for r in refs)
    assert Manifest.decode(old) == Manifest(2 * CHUNK_SIZE + 10, {r.index: r for r in refs})


def test_spans_and_holes() -> None:
    manifest = Manifest(2 * CHUNK_SIZE + 10, {0: _ref(0, CHUNK_SIZE), 2: _ref(2, 10)})
    assert manifest.count == 3
    assert [manifest.span(i) for i in range(4)] == [CHUNK_SIZE, CHUNK_SIZE, 10, 0]
    assert manifest.stored == CHUNK_SIZE + 10
    assert sorted(manifest.names(5)) == [chunk_name(5, 0, 1), chunk_name(5, 2, 15)]


@pytest.mark.parametrize("bad", [
    b"", b"KFM1", b"XXXX" + bytes(16),
    Manifest(10, {0: _ref(0, 10)}).encode()[:-1],  # cut short
    Manifest(10, {0: _ref(0, 10)}).encode() + b"x",  # trailing bytes
    Manifest(10, {0: _ref(0, 10), 3: _ref(3, 10)}).encode(),  # a chunk past the end
    Manifest(10, {0: _ref(0, CHUNK_SIZE + 1)}).encode(),  # longer than a chunk
    Manifest(10, {0: _ref(0, 0)}).encode(),  # an empty chunk (a hole is no entry)
    Manifest(10 * CHUNK_SIZE, {2: _ref(2, lead=3)}).encode(),  # a run starting before 0
    Manifest(99 * CHUNK_SIZE, {40: _ref(40, lead=RUN_CHUNKS)}).encode(),  # a run too long
])
def test_malformed_manifests_are_refused(bad: bytes) -> None:
    with pytest.raises(ValueError):
        Manifest.decode(bad)


def test_whole_content_attrs_are_not_a_manifest() -> None:
    assert manifest_sizes(b"") is None
    assert manifest_sizes(b"M") is None
    assert not is_manifest(b"\x01" * 17)
