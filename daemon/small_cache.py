"""The verified bytes of small objects, kept in memory for the store's ``read_small``.

A one-datagram lookup answers from the event loop, and opening, reading, closing and hashing
a small file there for every answer is a large share of a holder's work per answer. Versions
are immutable, so a kept copy is exactly the bytes of its version; it is served only while
that version is the one held and its file is unchanged (same inode, size and mtime: one stat
instead of open, read, close and digest), so a copy damaged on disk by a write is still found
out by the next read, as when every read went to the file.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from daemon.store_files import file_signature
from daemon.store_layout import StoredObject

#: Bytes of verified small-object content kept in memory for ``read_small`` (least recently
#: used dropped first): what a put of at most ``SMALL_KEEP`` bytes stored, and what
#: ``read_small`` read and verified.
SMALL_CACHE_BYTES = 16 << 20


@dataclass(frozen=True, slots=True)
class _KeptSmall:
    """A small object's verified bytes and the signature of its file when they were taken."""

    obj: StoredObject
    data: bytes
    signature: tuple[int, ...]


class SmallCache:
    """name -> the verified bytes of one version of it, at most ``cap`` bytes in all.

    The store keeps only the index's object for a name here and forgets it when the index
    entry is replaced or removed.
    """

    def __init__(self, cap: int) -> None:
        self._kept: OrderedDict[str, _KeptSmall] = OrderedDict()
        self._bytes = 0
        self._cap = cap

    def get(self, obj: StoredObject) -> bytes | None:
        """The kept bytes of exactly ``obj`` if its file is unchanged since they were taken;
        None otherwise (a copy whose file was written to since is forgotten)."""
        kept = self._kept.get(obj.name)
        if kept is None or kept.obj is not obj:
            return None
        if obj.path is not None and file_signature(obj.path) == kept.signature:
            self._kept.move_to_end(obj.name)
            return kept.data
        self.forget(obj.name)  # written to since: read and check it again
        return None

    def remember(self, obj: StoredObject, data: bytes,
                 signature: tuple[int, ...] | None) -> None:
        """Keep ``data``, the verified content of ``obj`` whose file had ``signature``."""
        self.forget(obj.name)
        if signature is None or len(data) > self._cap:
            return
        self._kept[obj.name] = _KeptSmall(obj, data, signature)
        self._bytes += len(data)
        while self._bytes > self._cap:
            _, dropped = self._kept.popitem(last=False)
            self._bytes -= len(dropped.data)

    def forget(self, name: str) -> None:
        kept = self._kept.pop(name, None)
        if kept is not None:
            self._bytes -= len(kept.data)
