"""The manifest of a chunked file and the names of its chunks (``daemon.core.manifest``)."""

from __future__ import annotations

import os
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


def test_manifests_of_runs_without_patches_still_read() -> None:
    refs = [_ref(4, CHUNK_SIZE, lead=2), _ref(9, 10)]
    old = struct.pack(">4sIQI", b"KFM2", CHUNK_SIZE, 9 * CHUNK_SIZE + 10, len(refs)) + b"".join(
        struct.pack(">IQI32sB", r.index, r.gen, r.length, r.checksum, r.lead) for r in refs)
    assert Manifest.decode(old) == Manifest(9 * CHUNK_SIZE + 10, {r.index: r for r in refs})


@given(st.lists(st.tuples(st.integers(0, 300), st.binary(min_size=0, max_size=60)),
                max_size=12))
def test_patches_lay_changes_over_each_other_in_order(changes: list[tuple[int, bytes]]) -> None:
    """Merged patches read as the changes written one after the other over the object's
    bytes, and stay sorted and apart."""
    base = os.urandom(200)
    expected = bytearray(base)
    ref = ChunkRef(0, 5, len(base), bytes(32))
    for offset, data in changes:
        if data and len(expected) < offset + len(data):
            expected.extend(bytes(offset + len(data) - len(expected)))
        expected[offset:offset + len(data)] = data
        ref = ref.patched([(offset, data)])
    assert ref.apply(base) == bytes(expected)
    assert ref.extent == len(expected)
    ends = [-1]
    for offset, data in ref.patches:
        assert data and offset > ends[-1]
        ends.append(offset + len(data))
    manifest = Manifest(CHUNK_SIZE, {0: ref})
    assert Manifest.decode(manifest.encode()) == manifest
    assert manifest.stored == ref.extent


def test_a_chunk_of_patches_alone_has_no_object() -> None:
    ref = ChunkRef.patches_only(2, ((10, b"abc"),))
    assert not ref.has_object and ref.apply(b"") == bytes(10) + b"abc"
    manifest = Manifest(2 * CHUNK_SIZE + 13, {0: _ref(0, CHUNK_SIZE), 2: ref})
    assert Manifest.decode(manifest.encode()) == manifest
    assert manifest.names(5) == {chunk_name(5, 0, 1)}
    assert manifest.stored == CHUNK_SIZE + 13


def test_unnamed_objects_are_those_no_chunk_of_the_newer_manifest_is_in() -> None:
    """A patched chunk keeps its object; a chunk replaced by an upload frees its object
    only once no other chunk of its run is in it; uploads the newer one does not name
    are unnamed too."""
    run = {i: ChunkRef(i, 7, CHUNK_SIZE, bytes(32), i) for i in range(4)}
    old = Manifest(5 * CHUNK_SIZE, {**run, 4: ChunkRef(4, 9, 10, bytes(32))})
    fresh = ChunkRef(1, 11, CHUNK_SIZE, bytes(32))
    newer = Manifest(5 * CHUNK_SIZE, {**old.chunks, 1: fresh,
                                      2: run[2].patched([(0, b"x")]), 4: ChunkRef(4, 12, 5,
                                                                                  bytes(32))})
    stray = chunk_name(3, 1, 99)
    assert old.unnamed(3, newer, [fresh.object_name(3), stray]) == {chunk_name(3, 4, 9), stray}
    whole = Manifest(5 * CHUNK_SIZE, {i: ChunkRef(i, 13, CHUNK_SIZE, bytes(32), i)
                                      for i in range(5)})
    assert newer.unnamed(3, whole) == newer.names(3)
    assert Manifest(0).unnamed(3, old, [stray, run[0].object_name(3)]) == {stray}


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
    Manifest(10, {0: ChunkRef(0, 0, 0, bytes(32))}).encode(),  # neither object nor patches
    Manifest(10, {0: ChunkRef.patches_only(0, ((8, b"abc"),))}).encode(),  # past the file
    Manifest(2 * CHUNK_SIZE, {0: ChunkRef.patches_only(  # past the chunk
        0, ((CHUNK_SIZE - 1, b"ab"),))}).encode(),
    Manifest(99, {0: ChunkRef.patches_only(0, ((5, b"ab"), (6, b"c")))}).encode(),  # overlap
    Manifest(99, {0: ChunkRef.patches_only(0, ((5, b"ab"), (7, b"c")))}).encode(),  # touch
    Manifest(99, {0: ChunkRef.patches_only(0, ((5, b""),))}).encode(),  # empty
    Manifest(99, {0: ChunkRef.patches_only(0, ((5, b"ab"),))}).encode()[:-1],  # cut short
])
def test_malformed_manifests_are_refused(bad: bytes) -> None:
    with pytest.raises(ValueError):
        Manifest.decode(bad)


def test_whole_content_attrs_are_not_a_manifest() -> None:
    assert manifest_sizes(b"") is None
    assert manifest_sizes(b"M") is None
    assert not is_manifest(b"\x01" * 17)
