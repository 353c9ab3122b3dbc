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
    fsync after a 256 MiB delete (a put's, or ``cp``'s ``sync``) waited for them (session 5
    probes: puts right after a delete 0.85-1.0 s, puts with no delete before them 0.71-0.76 s,
    puts after four deletes and a ``settle`` 0.73 s median). Dropping the cache makes every
    read start from the disk, for the baseline and for kelipsfs alike. Best effort: without
    root the cache stays.
    """
    os.sync()
    with contextlib.suppress(OSError):
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
