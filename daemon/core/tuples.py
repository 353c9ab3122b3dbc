"""File tuples of the own affinity group, their merge rule, and the hybrid logical clock.

Merge keeps, per name, the tuple with the highest (version, holder_seq, holders, tombstone):
a total order, so merging is commutative, associative and idempotent, and every node that has
seen the same tuples holds the same state whatever the order they arrived in.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator

from .ids import NodeId
from .keys import parse_entry
from .messages import TupleEntry, Version


class HybridClock:
    """Hybrid logical clock: 48 bits of wall milliseconds, 16 bits of logical counter.

    Versions must rise across nodes even when clocks disagree a little: a write stamps
    max(wall, last seen + 1), so a node that saw version v always writes something above v.
    """

    __slots__ = ("last",)

    def __init__(self) -> None:
        self.last = 0

    def stamp(self, wall_ms: int) -> int:
        physical = max(0, int(wall_ms)) << 16
        self.last = max(self.last + 1, physical)
        return self.last

    def observe(self, clock: int) -> None:
        if clock > self.last:
            self.last = clock


class TupleStore:
    """The own group's tuples, with rumor counters so every change is forwarded enough.

    A tuple that changed here is "hot" for ``rumor_sends`` gossip messages: hot tuples are
    served round-robin (oldest first), so a burst of writes drains at the budget's rate and no
    change is dropped before it was forwarded; cold tuples rotate slowly behind them.
    """

    __slots__ = ("_cursor", "_cursor_names", "_entries", "_hot", "_tomb_since", "_tuples",
                 "rumor_sends")

    def __init__(self, rumor_sends: int = 6) -> None:
        self._tuples: dict[str, TupleEntry] = {}
        self._hot: OrderedDict[str, int] = OrderedDict()  # name -> sends left
        self._cursor_names: list[str] | None = None
        self._cursor = 0
        self._tomb_since: dict[str, float] = {}  # tombstone -> when recorded, oldest first
        # directory inode -> names of its entry records (``keys``): a listing reads these
        # instead of every tuple of the group
        self._entries: dict[int, set[str]] = {}
        self.rumor_sends = rumor_sends

    def __len__(self) -> int:
        return len(self._tuples)

    def __iter__(self) -> Iterator[TupleEntry]:
        return iter(list(self._tuples.values()))

    def get(self, name: str) -> TupleEntry | None:
        return self._tuples.get(name)

    def names(self) -> list[str]:
        return list(self._tuples)

    def entries(self, directory: int) -> list[TupleEntry]:
        """The tuples of every entry record of ``directory`` (tombstones included)."""
        names = self._entries.get(directory, ())
        return [self._tuples[name] for name in names]

    @property
    def hot_count(self) -> int:
        return len(self._hot)

    def hot_bytes(self, limit: int, size_of: Callable[[TupleEntry], int]) -> int:
        """Encoded size of the hot tuples served next, counted up to ``limit``, and never less
        than the first one's (so a long name still gets its room)."""
        total = 0
        for name in self._hot:
            entry = self._tuples.get(name)
            if entry is None:
                continue
            size = size_of(entry)
            if total and total + size > limit:
                break
            total += size
            if total >= limit:
                break
        return total

    def merge(self, entry: TupleEntry, now: float) -> bool:
        """Keep ``entry`` if it orders above what is held; True when the state changed."""
        old = self._tuples.get(entry.name)
        if old is not None and entry.order_key <= old.order_key:
            return False
        if old is None:
            self._cursor_names = None
            parsed = parse_entry(entry.name)
            if parsed is not None:
                self._entries.setdefault(parsed[0], set()).add(entry.name)
        self._tuples[entry.name] = entry
        self._hot[entry.name] = self.rumor_sends
        self._tomb_since.pop(entry.name, None)
        if entry.tombstone:  # (at the end: the oldest come first)
            self._tomb_since[entry.name] = now
        return True

    def expire_tombstones(self, now: float, ttl: float) -> list[str]:
        """Forget the tombstones held for ``ttl``: the oldest first, up to the first younger
        one (a rare one recorded out of order only waits for those before it), so a check
        costs what it removes, not what the group holds."""
        gone = []
        for name, since in self._tomb_since.items():
            if now - since < ttl:
                break
            gone.append(name)
        for name in gone:
            del self._tomb_since[name]
            del self._tuples[name]
            self._hot.pop(name, None)
            parsed = parse_entry(name)
            if parsed is not None:
                names = self._entries.get(parsed[0])
                if names is not None:
                    names.discard(name)
                    if not names:
                        del self._entries[parsed[0]]
        if gone:
            self._cursor_names = None
        return gone

    def select_hot(self, budget: int, size_of: Callable[[TupleEntry], int]) -> list[TupleEntry]:
        """Hot tuples for one gossip message, round-robin (oldest first), within budget bytes."""
        chosen: list[TupleEntry] = []
        used = 0
        hot = self._hot
        for _ in range(len(hot)):
            name, left = next(iter(hot.items()))
            entry = self._tuples.get(name)
            if entry is None:
                del hot[name]
                continue
            size = size_of(entry)
            if size > budget:
                hot.move_to_end(name)  # can never fit this message: do not block the others
                continue
            if used + size > budget:
                break
            chosen.append(entry)
            used += size
            if left <= 1:
                del hot[name]
            else:
                hot[name] = left - 1
                hot.move_to_end(name)
        return chosen

    def select_cold(self, budget: int, skip: set[str],
                    size_of: Callable[[TupleEntry], int]) -> list[TupleEntry]:
        """A rotation over all tuples within budget bytes: slowly heals what gossip missed."""
        if self._cursor_names is None:
            self._cursor_names = list(self._tuples)
        names = self._cursor_names
        chosen: list[TupleEntry] = []
        used = 0
        for _ in range(len(names)):
            if self._cursor >= len(names):
                self._cursor = 0
            name = names[self._cursor]
            entry = self._tuples.get(name)
            if entry is None or name in skip:
                self._cursor += 1
                continue
            size = size_of(entry)
            if size > budget:
                self._cursor += 1  # can never fit this budget: do not stall the rotation
                continue
            if used + size > budget:
                break  # full: the rotation resumes here next time
            self._cursor += 1
            chosen.append(entry)
            used += size
        return chosen


def newest(a: TupleEntry | None, b: TupleEntry | None) -> TupleEntry | None:
    """The merge of two optional tuples for the same name."""
    if a is None:
        return b
    if b is None:
        return a
    return a if a.order_key >= b.order_key else b


def with_holders(entry: TupleEntry, holders: tuple[NodeId, ...]) -> TupleEntry:
    """The same version held by another set of nodes (after a repair): a higher holder epoch."""
    return entry._replace(holders=tuple(sorted(holders)), holder_seq=entry.holder_seq + 1)


def make_version(clock: HybridClock, wall_ms: int, writer: NodeId) -> Version:
    return Version(clock.stamp(wall_ms), writer)
