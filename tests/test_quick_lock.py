"""QuickLock: mutual exclusion and arrival-order handoff like trio.Lock, no yield when free."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
import trio
import trio.testing

from daemon.quick_lock import QuickLock, QuickLocks


def run(test: Callable[[], Awaitable[None]]) -> None:
    trio.run(test, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_free_lock_is_taken_without_a_schedule_point() -> None:
    async def main() -> None:
        lock = QuickLock()
        ran: list[str] = []

        async def other() -> None:
            ran.append("other")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(other)
            async with lock:  # the other task cannot run here: no yield on the way in
                assert lock.locked() and ran == []
            assert not lock.locked()
            await trio.testing.wait_all_tasks_blocked()
            assert ran == ["other"]
    run(main)


def test_waiters_get_the_lock_in_arrival_order_and_one_at_a_time() -> None:
    async def main() -> None:
        lock = QuickLock()
        order: list[int] = []
        inside = 0

        async def worker(i: int) -> None:
            nonlocal inside
            async with lock:
                inside += 1
                assert inside == 1
                order.append(i)
                await trio.sleep(0.01)
                inside -= 1

        async with trio.open_nursery() as nursery:
            for i in range(5):
                nursery.start_soon(worker, i)
                await trio.testing.wait_all_tasks_blocked()
            assert lock.waiting() == 4
        assert order == [0, 1, 2, 3, 4] and not lock.locked() and lock.waiting() == 0
    run(main)


def test_a_cancelled_waiter_leaves_the_queue_and_the_lock_goes_on() -> None:
    async def main() -> None:
        lock = QuickLock()
        got: list[str] = []
        release = trio.Event()

        async def holder() -> None:
            async with lock:
                await release.wait()
            got.append("holder")

        async def waiter(name: str, scope: trio.CancelScope) -> None:
            with scope:
                async with lock:
                    got.append(name)

        gave_up, later = trio.CancelScope(), trio.CancelScope()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(holder)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(waiter, "gave up", gave_up)
            nursery.start_soon(waiter, "later", later)
            await trio.testing.wait_all_tasks_blocked()
            assert lock.waiting() == 2
            gave_up.cancel()
            await trio.testing.wait_all_tasks_blocked()
            assert lock.waiting() == 1
            release.set()
        assert got == ["holder", "later"] and not lock.locked()
        with trio.CancelScope() as scope:
            scope.cancel()
            await lock.acquire()  # a cancelled scope: Cancelled even though it is free
        assert not lock.locked()
    run(main)


def test_misuse_is_an_error() -> None:
    async def main() -> None:
        lock = QuickLock()
        with pytest.raises(RuntimeError):
            lock.release()
        await lock.acquire()
        with pytest.raises(RuntimeError):
            await lock.acquire()
        lock.release()
    run(main)


def test_keyed_locks_serialize_one_key_and_forget_an_idle_one() -> None:
    async def main() -> None:
        locks: QuickLocks[str] = QuickLocks()
        inside = most = 0

        async def worker() -> None:
            nonlocal inside, most
            async with locks.hold("a"):
                inside += 1
                most = max(most, inside)
                await trio.sleep(0.01)
                inside -= 1

        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(worker)
            await trio.testing.wait_all_tasks_blocked()
            async with locks.hold("b"):  # another key is free while "a" is held
                assert inside == 1
        assert most == 1 and locks._locks == {}
    run(main)


def test_several_keys_are_taken_in_one_order_and_released_on_cancel() -> None:
    """Two tasks taking the same pair of keys in opposite orders never deadlock (hold_all
    sorts them); a task cancelled while it waits for its second key lets the first go."""
    async def main() -> None:
        locks: QuickLocks[int] = QuickLocks()
        done: list[str] = []

        async def pair(name: str, keys: list[int]) -> None:
            for _ in range(20):
                async with locks.hold_all(keys):
                    await trio.sleep(0.001)
            done.append(name)

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pair, "up", [1, 2])
                nursery.start_soon(pair, "down", [2, 1, 2])
        assert sorted(done) == ["down", "up"] and locks._locks == {}

        async def holder(release: trio.Event) -> None:
            async with locks.hold(2):
                await release.wait()

        release = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(holder, release)
            await trio.testing.wait_all_tasks_blocked()
            with trio.move_on_after(1):
                async with locks.hold_all([1, 2]):
                    raise AssertionError("key 2 is held elsewhere")
            async with locks.hold(1):  # released when the wait for key 2 was cancelled
                pass
            release.set()
        assert locks._locks == {}
    run(main)
