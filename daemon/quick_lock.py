"""A trio lock taken at once when it is free: no schedule point on the uncontended path.

``trio.Lock`` yields to the scheduler on every acquire, even a free one. The per-name and
per-inode locks of the store, the namespace and the open files are almost always free, and
one small file's create, write and close take a dozen of them: each yield is a turn of the
event loop (an ``epoll_wait`` and the scheduler's bookkeeping) that a FUSE request waits for.
A waiter parks and is handed the lock by ``release`` in arrival order, as with ``trio.Lock``;
acquiring still raises Cancelled in a cancelled scope. ``QuickLocks`` keeps one per key (a
name, an inode) for as long as some task holds or waits for it.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Hashable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Generic, TypeVar

import trio

_K = TypeVar("_K", bound=Hashable)


class QuickLock:
    """A non-reentrant trio lock with ``trio.Lock``'s handoff and no yield when free."""

    __slots__ = ("_lot", "_owner")

    def __init__(self) -> None:
        self._owner: trio.lowlevel.Task | None = None
        self._lot = trio.lowlevel.ParkingLot()

    def locked(self) -> bool:
        return self._owner is not None

    def waiting(self) -> int:
        """How many tasks wait for the lock."""
        return len(self._lot)

    def held_here(self) -> bool:
        """Whether the current task holds the lock."""
        return self._owner is trio.lowlevel.current_task()

    async def acquire(self) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        task = trio.lowlevel.current_task()
        if self._owner is None and not self._lot:
            self._owner = task
            return
        if self._owner is task:
            raise RuntimeError("QuickLock is already held by this task")
        await self._lot.park()  # ``release`` made this task the owner before waking it

    def release(self) -> None:
        if self._owner is not trio.lowlevel.current_task():
            raise RuntimeError("QuickLock released by a task that does not hold it")
        woken = self._lot.unpark()
        self._owner = woken[0] if woken else None

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        self.release()


@dataclass
class _Shared:
    """A key's lock plus how many tasks use it, so an idle one can be forgotten."""

    lock: QuickLock = field(default_factory=QuickLock)
    users: int = 0


class QuickLocks(Generic[_K]):
    """One QuickLock per key, made at first use and forgotten when no task holds or awaits it."""

    def __init__(self) -> None:
        self._locks: dict[_K, _Shared] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key: _K) -> AsyncIterator[None]:
        entry = self._locks.get(key)
        if entry is None:
            entry = self._locks[key] = _Shared()
        entry.users += 1
        try:
            async with entry.lock:
                yield
        finally:
            entry.users -= 1
            if entry.users == 0:
                del self._locks[key]
