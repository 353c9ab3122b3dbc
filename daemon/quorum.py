"""Waiting for a write quorum, not for every holder.

With ``write_quorum`` set (1..r, ``NodeSettings``), a write goes to its r holders at once and
is acknowledged when that many stored it, as Dynamo's and Cassandra's writes are: the slowest
holder -- busy, far, or stalled before it is declared failed -- no longer sets the pace of
every write. The holders still storing finish in the background; one that then fails is
dropped from the tuple by a correction, as if it had failed before the acknowledgement. With
the default (0: every reachable holder) a write waits for all of them.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING

import trio

from daemon.core.messages import MemberEntry, TupleEntry
from daemon.core.tuples import with_holders

if TYPE_CHECKING:
    from daemon.runtime import NodeRuntime

log = logging.getLogger("kelipsfs.data")


def background_for(rt: NodeRuntime) -> trio.Nursery | None:
    """Where the holders still storing at an acknowledgement go on: none (wait for every
    holder) unless a write quorum is set."""
    return rt.background if rt.settings.write_quorum else None


def corrections(acknowledged: Iterable[TupleEntry], stored: Iterable[MemberEntry]
                ) -> list[TupleEntry]:
    """The acknowledged tuples that name a holder which did not store them, corrected to name
    the ones that did (a higher holder epoch)."""
    done = {h.node_id for h in stored}
    return [with_holders(t, tuple(h for h in t.holders if h in done))
            for t in acknowledged if any(h not in done for h in t.holders)]


async def until_enough(jobs: Sequence[Callable[[], Awaitable[None]]],
                       enough: Callable[[], bool], background: trio.Nursery | None,
                       after: Callable[[], Awaitable[None]] | None = None) -> None:
    """Run ``jobs`` (none raises) and return once ``enough()`` holds after one of them ended,
    or all have. The rest go on in ``background`` (None: wait for all), and ``after`` runs
    once they are done (only when this returned early)."""
    if len(jobs) == 1:  # (one holder: no task of its own, which costs more than the call)
        await jobs[0]()
        return
    if background is None:
        async with trio.open_nursery() as nursery:
            for job in jobs:
                nursery.start_soon(job)
        return
    left = len(jobs)
    returned = False
    ready = trio.Event()

    async def run(job: Callable[[], Awaitable[None]]) -> None:
        nonlocal left
        try:
            await job()
        finally:
            left -= 1
            if left == 0 or enough():
                ready.set()
        if left == 0 and returned and after is not None:
            try:
                await after()
            except Exception:  # (background work: never take the node down)
                log.exception("the end of a write acknowledged early failed")

    for job in jobs:
        background.start_soon(run, job)
    if jobs:
        await ready.wait()
    returned = True
