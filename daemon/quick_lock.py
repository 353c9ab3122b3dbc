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

from collections.abc import Iterable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Generic, TypeVar

import trio

_K = TypeVar("_K", int, str)  # keys: inode numbers, object names


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
        if self._lot:
            woken = self._lot.unpark()
            self._owner = woken[0] if woken else None
        else:
            self._owner = None

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

    def hold(self, key: _K) -> _Held[_K]:
        """``async with locks.hold(key):`` the key's lock, held for the block."""
        return _Held(self._locks, key)

    def hold_all(self, keys: Iterable[_K]) -> _HeldAll[_K]:
        """``async with locks.hold_all(keys):`` every key's lock, taken in sorted order (two
        tasks holding some of the same keys cannot wait for each other)."""
        return _HeldAll([_Held(self._locks, key) for key in sorted(set(keys))])


class _Held(Generic[_K]):
    """The async context of ``QuickLocks.hold`` (a class: cheaper to enter than a generator)."""

    __slots__ = ("_entry", "_key", "_locks")

    def __init__(self, locks: dict[_K, _Shared], key: _K) -> None:
        self._locks: dict[_K, _Shared] = locks
        self._key: _K = key

    async def __aenter__(self) -> None:
        entry = self._locks.get(self._key)
        if entry is None:
            entry = self._locks[self._key] = _Shared()
        entry.users += 1
        self._entry = entry
        try:
            await entry.lock.acquire()
        except BaseException:
            self._leave()
            raise

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        self._entry.lock.release()
        self._leave()

    def _leave(self) -> None:
        self._entry.users -= 1
        if self._entry.users == 0:
            del self._locks[self._key]


class _HeldAll(Generic[_K]):
    """The async context of ``QuickLocks.hold_all``."""

    __slots__ = ("_held", "_taken")

    def __init__(self, held: list[_Held[_K]]) -> None:
        self._held: list[_Held[_K]] = held
        self._taken = 0

    async def __aenter__(self) -> None:
        try:
            for held in self._held:
                await held.__aenter__()
                self._taken += 1
        except BaseException:
            await self._release()
            raise

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self._release()

    async def _release(self) -> None:
        while self._taken:
            self._taken -= 1
            await self._held[self._taken].__aexit__(None, None, None)
