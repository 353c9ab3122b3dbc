"""A file stored in chunks: the manifest its content record holds, and the chunks' names.

A regular file up to ``CHUNK_SIZE`` bytes is its content record ``d/<ino>`` whole (one
record, on the inode's holders, logged with the namespace when small). A larger one is
stored as **chunks** of ``CHUNK_SIZE`` bytes: each chunk is an object of its own, named
``c/<ino>/<index>.<gen>`` and placed by that name (its own group and holders, as any object),
and the content record holds the **manifest**: the file's size and, for each chunk that is not
a hole, its generation, length and digest. A chunk is written once under a fresh generation and
never changed, so a write replaces only the chunks it touched, a reader holding an older
manifest still finds the chunks it names, and a chunk's name says which inode it belongs to:
whoever holds it can ask that inode's manifest whether it is still used
(``daemon.chunks``). Chunks are fixed-size and named by their owner rather than by content:
a database's or a VM image's page write lands in one known chunk, and reclaiming one needs
no cluster-wide reference count.

One stored object may hold a **run** of up to ``RUN_CHUNKS`` consecutive chunks (named by the
first): a file written front to back is stored as a few large objects instead of one per
chunk, each costing one request, one commit and one digest on each holder. Each chunk of a
run keeps its own digest in the manifest and is read by its range of the object, so a later
write still replaces one chunk: the object stays while any chunk of the manifest is in it.

A small change to a chunk is a **patch** in the manifest instead: the bytes written and where,
kept with the chunk's entry and laid over its stored bytes when it is read (a chunk with no
object yet -- a hole, or a file grown by appends -- may be patches alone). A 1-byte write and
an fsync then send the manifest alone rather than a whole chunk to every holder: one commit
per holder instead of two. Patches are bounded (``PATCH_CHUNK_MAX`` bytes per chunk,
``PATCH_TOTAL_MAX`` per manifest); past that the writer uploads the chunk whole again and its
patches go (``kelipsfs.chunked_copy``). Their bytes are checked as the manifest's are.

The manifest record says it is one in its tuple's ``attrs`` (``MANIFEST_MARK``, the file's
size and the bytes its chunks store), so a ``stat`` needs no fetch of the manifest itself.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from .keys import CHUNK, ino_text

#: Bytes per chunk: a small write uploads at most this much per chunk it touches.
CHUNK_SIZE = 1 << 20
#: Most chunks one stored object holds (a run written front to back).
RUN_CHUNKS = 16
#: First byte of a content record's tuple attrs when its content is a manifest.
MANIFEST_MARK = b"M"

#: Most patch bytes one chunk's entry carries (more: the chunk is uploaded whole).
PATCH_CHUNK_MAX = 32 << 10
#: Most patch bytes one manifest carries (more: the most patched chunks are uploaded whole).
PATCH_TOTAL_MAX = 128 << 10
#: Most patches one chunk's entry carries.
PATCH_COUNT_MAX = 64

_MAGIC_SINGLE = b"KFM1"  # every chunk an object of its own
_MAGIC_RUNS = b"KFM2"  # chunks in runs
_MAGIC = b"KFM3"  # ... and patches
_HEAD = struct.Struct(">4sIQI")  # magic, chunk size, file size, chunk count
_REF_SINGLE = struct.Struct(">IQI32s")  # index, generation, length, digest
_REF_RUNS = struct.Struct(">IQI32sB")  # ... and how many chunks before it its object starts
_REF = struct.Struct(">IQI32sBH")  # ... and how many patches follow it
_PATCH = struct.Struct(">II")  # offset in the chunk, length; the bytes follow
_NO_OBJECT = bytes(32)
_ATTRS = struct.Struct(">1sQQ")  # mark, file size, stored bytes


@dataclass(frozen=True, slots=True)
class ChunkRef:
    """One stored chunk of a file: where it sits (``index``), which write made it (``gen``),
    how many bytes it holds (the rest of the chunk reads as zeros) and their digest, and the
    patches laid over them. ``length`` 0: no object, the chunk is its patches over zeros."""

    index: int
    gen: int
    length: int
    checksum: bytes
    #: Chunks between the first of the run its object holds and this one (0: its object
    #: starts with it).
    lead: int = 0
    #: (offset in the chunk, bytes) written over the object's bytes: sorted, disjoint.
    patches: tuple[tuple[int, bytes], ...] = ()

    @classmethod
    def patches_only(cls, index: int, patches: tuple[tuple[int, bytes], ...]) -> ChunkRef:
        """A chunk with no object: zeros and ``patches``."""
        return cls(index, 0, 0, _NO_OBJECT, 0, patches)

    @property
    def has_object(self) -> bool:
        return self.length > 0

    @property
    def patch_bytes(self) -> int:
        return sum(len(data) for _, data in self.patches)

    @property
    def extent(self) -> int:
        """Bytes of the chunk up to the last one stored or patched (the rest reads zeros)."""
        if not self.patches:
            return self.length
        offset, data = self.patches[-1]
        return max(self.length, offset + len(data))

    def patched(self, changes: list[tuple[int, bytes]]) -> ChunkRef:
        """This chunk with ``changes`` (offset in the chunk, bytes; later ones win) laid
        over its patches."""
        return replace(self, patches=merge_patches(self.patches, changes))

    def apply(self, data: bytes) -> bytes:
        """The chunk's bytes: its object's ``data`` with the patches laid over it."""
        if not self.patches:
            return data
        out = bytearray(data)
        if len(out) < self.extent:
            out.extend(bytes(self.extent - len(out)))
        for offset, patch in self.patches:
            out[offset:offset + len(patch)] = patch
        return bytes(out)

    @property
    def first(self) -> int:
        """Index of the first chunk of its object (the one the object is named by)."""
        return self.index - self.lead

    def object_name(self, ino: int) -> str:
        return chunk_name(ino, self.first, self.gen)

    def offset(self, chunk_size: int = CHUNK_SIZE) -> int:
        """Where its bytes start in its object."""
        return self.lead * chunk_size


def merge_patches(old: tuple[tuple[int, bytes], ...], changes: list[tuple[int, bytes]]
                  ) -> tuple[tuple[int, bytes], ...]:
    """``old`` patches with ``changes`` laid over them in order: sorted, disjoint, touching
    ones joined."""
    merged = list(old)
    for offset, data in changes:
        if not data:
            continue
        end = offset + len(data)
        kept: list[tuple[int, bytes]] = []
        start, body = offset, bytearray(data)
        for o, d in merged:
            e = o + len(d)
            if e < offset or o > end:  # neither overlaps nor touches
                kept.append((o, d))
                continue
            if o < start:  # keep what the earlier patch has before the change
                body[0:0] = d[:start - o]
                start = o
            if e > start + len(body):  # ... and after it
                body.extend(d[start + len(body) - o:])
        kept.append((start, bytes(body)))
        merged = sorted(kept)
    return tuple(merged)


def chunk_name(ino: int, index: int, gen: int) -> str:
    return f"{CHUNK}{ino_text(ino)}/{index:08x}.{gen:016x}"


def parse_chunk_name(name: str) -> tuple[int, int, int] | None:
    """(inode, index, generation) of a chunk's record name, else None."""
    if len(name) != 44 or not name.startswith(CHUNK) or name[18] != "/" or name[27] != ".":
        return None
    try:
        ino, index, gen = int(name[2:18], 16), int(name[19:27], 16), int(name[28:], 16)
    except ValueError:
        return None
    return (ino, index, gen) if chunk_name(ino, index, gen) == name else None


@dataclass(frozen=True)
class Manifest:
    """A chunked file's size and its stored chunks by index (an index not there is a hole)."""

    size: int
    chunks: Mapping[int, ChunkRef] = field(default_factory=dict)
    chunk_size: int = CHUNK_SIZE

    @property
    def count(self) -> int:
        """Chunks the file's size spans (stored or holes)."""
        return -(-self.size // self.chunk_size)

    @functools.cached_property
    def stored(self) -> int:
        """Bytes its chunks hold (what ``du`` shows: holes cost nothing)."""
        return sum(ref.extent for ref in self.chunks.values())

    def names(self, ino: int) -> set[str]:
        """The stored objects its chunks are in."""
        return {r.object_name(ino) for r in self.chunks.values() if r.has_object}

    def names_object(self, first: int, gen: int) -> bool:
        """Whether a chunk of it is in the object of the run starting at ``first`` written
        under ``gen``."""
        for index in range(first, first + RUN_CHUNKS):
            ref = self.chunks.get(index)
            if ref is not None and ref.gen == gen and ref.first == first and ref.has_object:
                return True
        return False

    def unnamed(self, ino: int, newer: Manifest, uploaded: Iterable[str] = ()) -> set[str]:
        """The objects this manifest or ``uploaded`` (chunk names of ``ino``) are in that
        ``newer`` names no more: only the chunks whose entry changed are looked at, so a
        small change to a big file costs little."""
        gone: set[tuple[int, int]] = set()
        for index, ref in self.chunks.items():
            if ref.has_object and newer.chunks.get(index) is not ref:
                gone.add((ref.first, ref.gen))
        for name in uploaded:
            parsed = parse_chunk_name(name)
            if parsed is not None and parsed[0] == ino:
                gone.add(parsed[1:])
        return {chunk_name(ino, first, gen) for first, gen in gone
                if not newer.names_object(first, gen)}

    def span(self, index: int) -> int:
        """Bytes of the file that chunk ``index`` covers (the last one may be shorter)."""
        return max(0, min(self.chunk_size, self.size - index * self.chunk_size))

    def encode(self) -> bytes:
        refs = sorted(self.chunks.values(), key=lambda r: r.index)
        parts = [_HEAD.pack(_MAGIC, self.chunk_size, self.size, len(refs))]
        for r in refs:
            parts.append(_REF.pack(r.index, r.gen, r.length, r.checksum, r.lead,
                                   len(r.patches)))
            for offset, data in r.patches:
                parts += (_PATCH.pack(offset, len(data)), data)
        return b"".join(parts)

    @classmethod
    def decode(cls, data: bytes) -> Manifest:
        """The manifest in ``data`` (ValueError if it is not a well-formed one)."""
        if len(data) < _HEAD.size:
            raise ValueError("manifest too short")
        magic, chunk_size, size, count = _HEAD.unpack_from(data)
        ref = {_MAGIC: _REF, _MAGIC_RUNS: _REF_RUNS, _MAGIC_SINGLE: _REF_SINGLE}.get(magic)
        if ref is None or chunk_size <= 0 or (
                len(data) < _HEAD.size + count * ref.size if ref is _REF
                else len(data) != _HEAD.size + count * ref.size):
            raise ValueError("not a manifest")
        chunks: dict[int, ChunkRef] = {}
        at = _HEAD.size
        for _ in range(count):
            if at + ref.size > len(data):
                raise ValueError("manifest too short")
            index, gen, length, digest, *rest = ref.unpack_from(data, at)
            at += ref.size
            lead = rest[0] if rest else 0
            patches: list[tuple[int, bytes]] = []
            for _ in range(rest[1] if len(rest) > 1 else 0):
                if at + _PATCH.size > len(data):
                    raise ValueError("manifest too short")
                offset, patch_length = _PATCH.unpack_from(data, at)
                at += _PATCH.size
                patches.append((offset, data[at:at + patch_length]))
                at += patch_length
            try:
                chunks[index] = _checked(ChunkRef(index, gen, length, digest, lead,
                                                  tuple(patches)), chunks, size, chunk_size)
            except ValueError as exc:
                raise ValueError(f"manifest chunk {index} is malformed: {exc}") from None
        if at != len(data):
            raise ValueError("not a manifest (bytes after its chunks)")
        return cls(size, chunks, chunk_size)

    def attrs(self) -> bytes:
        """The tuple attrs of the content record holding this manifest."""
        return _ATTRS.pack(MANIFEST_MARK, self.size, self.stored)


def _checked(ref: ChunkRef, chunks: Mapping[int, ChunkRef], size: int, chunk_size: int
             ) -> ChunkRef:
    """``ref`` if it is a well-formed entry of a manifest (ValueError otherwise)."""
    if ref.index in chunks:
        raise ValueError("listed twice")
    if not 0 <= ref.length <= chunk_size or not 0 <= ref.lead < RUN_CHUNKS or (
            ref.lead > ref.index):
        raise ValueError("bad length or run")
    if not ref.has_object and (not ref.patches or ref.lead or ref.gen):
        raise ValueError("neither an object nor patches")
    end = 0
    for offset, data in ref.patches:
        if offset < end or not data or (end and offset == end):
            raise ValueError("patches not sorted and apart")
        end = offset + len(data)
    if end > chunk_size or len(ref.patches) > PATCH_COUNT_MAX or ref.index * chunk_size >= size or (
            ref.index * chunk_size + end > size):
        raise ValueError("past the chunk or the file")
    return ref


def manifest_sizes(attrs: bytes) -> tuple[int, int] | None:
    """(file size, stored bytes) from a content record's tuple attrs, or None if the record
    holds the file whole."""
    if len(attrs) != _ATTRS.size or attrs[:1] != MANIFEST_MARK:
        return None
    _, size, stored = _ATTRS.unpack(attrs)
    return size, stored


def is_manifest(attrs: bytes) -> bool:
    return manifest_sizes(attrs) is not None

