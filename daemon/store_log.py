"""Which of the store's objects live in the record log (``daemon.record_log``) instead of as
files of their own, and how such an object becomes a frame of the log and back.

Kept apart from ``daemon.store`` so that the rule for what is logged, and the one mapping
between a stored object and a frame, each stand in one place.
"""

from __future__ import annotations

from collections.abc import AsyncIterable

from daemon.core.keys import DATA, is_metadata, record_ino
from daemon.core.messages import Version
from daemon.record_log import Frame, LogRef
from daemon.store_layout import ChecksumMismatch, StoredObject, show

#: The namespace's records up to this size are kept in the record log (``daemon.record_log``)
#: rather than as files of their own: an inode or an entry costs an append, not three fsyncs.
LOG_MAX = 2 << 20
#: Files' contents up to this size are logged too (a small file's close costs one shared
#: fdatasync, not a file, a link and three fsyncs); unlike the namespace's records, a logged
#: content is made durable before its put returns.
LOG_CONTENT_MAX = 64 << 10


def is_logged(name: str, size: int) -> bool:
    """Whether ``name`` is kept in the record log: the namespace's small records and the
    small contents of files."""
    if is_metadata(name):
        return size <= LOG_MAX
    return size <= LOG_CONTENT_MAX and name[:2] == DATA and record_ino(name) is not None


async def gather(name: str, chunks: AsyncIterable[bytes], size: int) -> bytes:
    """The content streamed from ``chunks``, in memory (it is at most ``size`` bytes, which
    is small: ChecksumMismatch as soon as the sender sends more)."""
    parts: list[bytes] = []
    got = 0
    async for item in chunks:
        raw: object = item
        if not isinstance(raw, bytes | bytearray | memoryview):
            raise TypeError(f"content chunks must be bytes, got {type(raw).__name__}")
        got += len(raw)
        if got > size:
            raise ChecksumMismatch(f"{show(name)}: the sender sent more than the {size} "
                                   "bytes announced; the data was discarded")
        parts.append(bytes(raw))
    return b"".join(parts)


def frame_of(obj: StoredObject) -> Frame:
    """The fields of ``obj`` as the log keeps them."""
    return Frame(obj.name, obj.version.clock, obj.version.writer, obj.size, obj.mode,
                 obj.mtime_ns, obj.tombstone, obj.checksum, obj.attrs)


def logged_object(frame: Frame, ref: LogRef) -> StoredObject:
    """The object a frame of the log records, its content at ``ref``."""
    return StoredObject(frame.name, Version(frame.clock, frame.writer), frame.size,
                        frame.checksum, frame.mode, frame.mtime_ns, frame.tombstone,
                        None, attrs=frame.attrs, log=ref)
