"""A new node's id: the least loaded of a few random candidates (power of d choices).

Node ids are hashed onto groups, so with one random id per node the groups are as uneven as
balls thrown into bins: at N = 10,000 and k = 100 the fullest group has ~125 members where
the mean is 100, and every member of it keeps that many own-group entries (the state bound
3*sqrt(N) + F/k leaves no room for that). A node starting for the first time instead draws
``JOIN_CHOICES`` random ids, learns the sizes of their groups from the cluster, and keeps the
id whose group is smallest: with d = 4 the fullest group stays within one or two members of
the mean (balls into bins with d choices), at the cost of d requests once in a node's life.

How sizes are learned (both drivers, see ``census``): the seed the node joins through knows
its own group exactly and names a live contact for each other group; each contact answers
with the size of its own group (``KelipsNode.group_size``). A group of which the seed knows no
member counts as empty, a group whose contact did not answer as unknown (not chosen, unless
no candidate's size is known at all: then the first candidate, a plain random id).

An existing identity is never changed: only a node without one draws candidates.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import TypeVar

from .ids import NodeId, group_of_node, new_node_id

JOIN_CHOICES = 4

T = TypeVar("T")


def candidate_ids(rng: random.Random, choices: int = JOIN_CHOICES) -> list[NodeId]:
    """``choices`` fresh random node ids from the injected random source."""
    if choices < 1:
        raise ValueError(f"choices must be at least 1, got {choices}")
    return [new_node_id(rng) for _ in range(choices)]


def census(candidates: Sequence[NodeId], k: int, seed_group: int, seed_group_size: int,
           contacts: Mapping[int, Sequence[T]]) -> tuple[dict[int, int], dict[int, T]]:
    """What a seed's view says of the candidates' groups, and whom to ask for the rest.

    ``contacts`` maps a group to the seed's live contacts in it. Returns (sizes known now,
    group -> the contact to ask for its size): the seed's own group has its exact size, a
    group without a live contact counts as empty (0)."""
    sizes: dict[int, int] = {}
    ask: dict[int, T] = {}
    for candidate in candidates:
        group = group_of_node(candidate, k)
        if group in sizes or group in ask:
            continue
        if group == seed_group:
            sizes[group] = seed_group_size
        elif contacts.get(group):
            ask[group] = contacts[group][0]
        else:
            sizes[group] = 0
    return sizes, ask


def least_loaded(candidates: Sequence[NodeId], k: int, sizes: Mapping[int, int]) -> NodeId:
    """The candidate whose group has the fewest members in ``sizes`` (group -> members).

    Candidates of groups missing from ``sizes`` are passed over; ties go to the earlier
    candidate; when no candidate's group size is known, the first candidate."""
    if not candidates:
        raise ValueError("no candidate ids")
    best: NodeId | None = None
    best_size = 0
    for candidate in candidates:
        size = sizes.get(group_of_node(candidate, k))
        if size is not None and (best is None or size < best_size):
            best, best_size = candidate, size
    return best if best is not None else candidates[0]
