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

The manifest record says it is one in its tuple's ``attrs`` (``MANIFEST_MARK``, the file's
size and the bytes its chunks store), so a ``stat`` needs no fetch of the manifest itself.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field

from .keys import CHUNK, ino_text

#: Bytes per chunk: a small write uploads at most this much per chunk it touches.
CHUNK_SIZE = 1 << 20
#: Most chunks one stored object holds (a run written front to back).
RUN_CHUNKS = 16
#: First byte of a content record's tuple attrs when its content is a manifest.
MANIFEST_MARK = b"M"

_MAGIC_SINGLE = b"KFM1"  # every chunk an object of its own
_MAGIC = b"KFM2"
_HEAD = struct.Struct(">4sIQI")  # magic, chunk size, file size, chunk count
_REF_SINGLE = struct.Struct(">IQI32s")  # index, generation, length, digest
_REF = struct.Struct(">IQI32sB")  # ... and how many chunks before it its object starts
_ATTRS = struct.Struct(">1sQQ")  # mark, file size, stored bytes


@dataclass(frozen=True, slots=True)
class ChunkRef:
    """One stored chunk of a file: where it sits (``index``), which write made it (``gen``),
    how many bytes it holds (the rest of the chunk reads as zeros) and their digest."""

    index: int
    gen: int
    length: int
    checksum: bytes
    #: Chunks between the first of the run its object holds and this one (0: its object
    #: starts with it).
    lead: int = 0

    @property
    def first(self) -> int:
        """Index of the first chunk of its object (the one the object is named by)."""
        return self.index - self.lead

    def object_name(self, ino: int) -> str:
        return chunk_name(ino, self.first, self.gen)

    def offset(self, chunk_size: int = CHUNK_SIZE) -> int:
        """Where its bytes start in its object."""
        return self.lead * chunk_size


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
        return sum(ref.length for ref in self.chunks.values())

    def names(self, ino: int) -> set[str]:
        """The stored objects its chunks are in."""
        return {r.object_name(ino) for r in self.chunks.values()}

    def span(self, index: int) -> int:
        """Bytes of the file that chunk ``index`` covers (the last one may be shorter)."""
        return max(0, min(self.chunk_size, self.size - index * self.chunk_size))

    def encode(self) -> bytes:
        refs = sorted(self.chunks.values(), key=lambda r: r.index)
        head = _HEAD.pack(_MAGIC, self.chunk_size, self.size, len(refs))
        return head + b"".join(_REF.pack(r.index, r.gen, r.length, r.checksum, r.lead)
                               for r in refs)

    @classmethod
    def decode(cls, data: bytes) -> Manifest:
        """The manifest in ``data`` (ValueError if it is not a well-formed one)."""
        if len(data) < _HEAD.size:
            raise ValueError("manifest too short")
        magic, chunk_size, size, count = _HEAD.unpack_from(data)
        ref = _REF if magic == _MAGIC else _REF_SINGLE
        if (magic not in (_MAGIC, _MAGIC_SINGLE) or chunk_size <= 0
                or len(data) != _HEAD.size + count * ref.size):
            raise ValueError("not a manifest")
        chunks: dict[int, ChunkRef] = {}
        for n in range(count):
            index, gen, length, digest, *rest = ref.unpack_from(data, _HEAD.size + n * ref.size)
            lead = rest[0] if rest else 0
            if (index in chunks or not 0 < length <= chunk_size or index * chunk_size >= size
                    or not 0 <= lead < RUN_CHUNKS or lead > index):
                raise ValueError(f"manifest chunk {index} is malformed")
            chunks[index] = ChunkRef(index, gen, length, digest, lead)
        return cls(size, chunks, chunk_size)

    def attrs(self) -> bytes:
        """The tuple attrs of the content record holding this manifest."""
        return _ATTRS.pack(MANIFEST_MARK, self.size, self.stored)


def manifest_sizes(attrs: bytes) -> tuple[int, int] | None:
    """(file size, stored bytes) from a content record's tuple attrs, or None if the record
    holds the file whole."""
    if len(attrs) != _ATTRS.size or attrs[:1] != MANIFEST_MARK:
        return None
    _, size, stored = _ATTRS.unpack(attrs)
    return size, stored


def is_manifest(attrs: bytes) -> bool:
    return manifest_sizes(attrs) is not None

