"""Bring the disk to the same state before every timed operation of a benchmark."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def settle() -> None:
    """Write everything pending, then drop the page cache.

    Why both: a timed operation must neither pay for the previous one's leftovers nor profit
    from its cache. The root filesystem here is ext4 mounted with ``discard``: deleting a large
    file queues discards that the next journal commit issues, so without ``sync`` the first
    fsync after a 256 MiB delete (a put's, or ``cp``'s ``sync``) waited for them, which made
    a put measured right after a delete slower than one that followed none. Dropping the
    cache makes every read start from the disk, for the baseline and for kelipsfs alike.
    Best effort: without root the cache stays.
    """
    os.sync()
    with contextlib.suppress(OSError):
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
