"""A new node's id by group sizes (power of d choices): the core rule, the census through a
seed, the daemon's first start (with a fake status fetcher) and the simulator's groups."""

from __future__ import annotations

import math
import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import trio

from daemon.core.balance import JOIN_CHOICES, candidate_ids, census, least_loaded
from daemon.core.config import CoreConfig
from daemon.core.ids import NODE_ID_BYTES, NodeId, group_of_node
from daemon.core.messages import Address, Envelope, Snapshot
from daemon.core.node import KelipsNode
from daemon.identity import balanced_node_id, has_identity, load_identity
from daemon.sim.engine import SimConfig, Simulation, run


def id_in(group: int, k: int, salt: int = 0) -> NodeId:
    rng = random.Random(1000 * group + salt)
    while True:
        nid = rng.randbytes(NODE_ID_BYTES)
        if group_of_node(nid, k) == group:
            return nid


# --- the rule -------------------------------------------------------------------------------


def test_candidate_ids_are_distinct_random_ids_from_the_injected_source() -> None:
    a = candidate_ids(random.Random(3))
    assert len(a) == JOIN_CHOICES and len(set(a)) == JOIN_CHOICES
    assert all(len(nid) == NODE_ID_BYTES for nid in a)
    assert candidate_ids(random.Random(3)) == a
    assert candidate_ids(random.Random(3), 1) == a[:1]  # d = 1: a plain random id
    with pytest.raises(ValueError):
        candidate_ids(random.Random(3), 0)


def test_least_loaded_keeps_the_candidate_of_the_smallest_group() -> None:
    k = 8
    cands = [id_in(1, k), id_in(2, k), id_in(3, k)]
    assert least_loaded(cands, k, {1: 5, 2: 3, 3: 4}) == cands[1]
    assert least_loaded(cands, k, {1: 3, 2: 3, 3: 3}) == cands[0]  # tie: the earlier one
    assert least_loaded(cands, k, {1: 5, 3: 4}) == cands[2]  # unknown size: passed over
    assert least_loaded(cands, k, {1: 5, 2: 0}) == cands[1]  # an empty group wins
    assert least_loaded(cands, k, {}) == cands[0]  # nothing known: the first, a random id
    with pytest.raises(ValueError):
        least_loaded([], k, {})


def test_census_through_a_seed() -> None:
    k = 8
    cands = [id_in(1, k), id_in(2, k), id_in(3, k), id_in(2, k, salt=1)]
    contacts = {2: ["b1", "b2"], 3: []}
    sizes, ask = census(cands, k, seed_group=1, seed_group_size=7, contacts=contacts)
    assert sizes == {1: 7, 3: 0}  # the seed's own group exactly; no live contact: empty
    assert ask == {2: "b1"}  # one question per group, to the seed's first live contact


def test_d_choices_keep_groups_within_a_member_or_two_of_the_mean() -> None:
    """Sequential joins, each seeing exact sizes: the fullest group with d = 4 against d = 1."""
    def fullest(d: int, n: int, k: int) -> int:
        rng = random.Random(5)
        sizes: Counter[int] = Counter()
        for _ in range(n):
            cands = candidate_ids(rng, d)
            chosen = least_loaded(cands, k, {group_of_node(c, k): sizes[group_of_node(c, k)]
                                             for c in cands})
            sizes[group_of_node(chosen, k)] += 1
        return max(sizes.values())

    n, k = 2000, 45
    assert fullest(JOIN_CHOICES, n, k) <= math.ceil(n / k) + 2
    assert fullest(1, n, k) >= math.ceil(n / k) + 5  # what hashing alone gives (binomial)


def test_node_group_size_counts_live_own_members_and_itself() -> None:
    cfg = CoreConfig(k=4)
    me = KelipsNode(cfg, id_in(0, 4), ("10.0.0.1", 1), 1, random.Random(1), 0.0)
    assert me.group_size() == 1
    others = [KelipsNode(cfg, id_in(g, 4, salt=salt), ("10.0.0.2", 2 + salt), 1,
                         random.Random(2), 0.0) for g, salt in ((0, 1), (0, 2), (1, 3))]
    snap = Snapshot(others[0].entry(), tuple(o.entry() for o in others), ())
    me.receive(0.0, Envelope(me.tag, 4, snap))
    assert me.group_size() == 3  # two of group 0 and itself; the group-1 node is a contact
    assert me.estimated_size() == 3 * 4


# --- the daemon's first start ----------------------------------------------------------------


def _status(group: int, size: int, k: int, contacts: dict[int, Address]) -> dict[str, Any]:
    rows = [{"address": f"{h}:{p}", "group": g, "state": "alive", "role": "contact"}
            for g, (h, p) in contacts.items()]
    rows.append({"address": "10.9.9.9:1", "group": group, "state": "failed", "role": "member"})
    return {"k": k, "group": group, "group_size": size, "members": rows}


def _first_id(docs: dict[Address, Any], seeds: list[Address], k: int, seed: int
              ) -> tuple[NodeId, list[Address]]:
    asked: list[Address] = []

    async def status(address: Address) -> Any:
        asked.append(address)
        return docs.get(address)

    return trio.run(balanced_node_id, random.Random(seed), k, seeds, status), asked


def test_first_start_takes_the_candidate_whose_group_is_smallest() -> None:
    k = 4
    seed_addr, big, small = ("10.0.0.1", 1), ("10.0.0.2", 1), ("10.0.0.3", 1)
    docs = {seed_addr: _status(0, 9, k, {1: big, 2: small}), big: _status(1, 12, k, {}),
            small: _status(2, 2, k, {})}
    for rng_seed in range(30):
        cands = candidate_ids(random.Random(rng_seed))
        chosen, asked = _first_id(docs, [("10.0.0.99", 1), seed_addr], k, rng_seed)
        assert asked[0] == ("10.0.0.99", 1)  # no answer: the next seed
        sizes = {0: 9, 1: 12, 2: 2, 3: 0}  # group 3: the seed knows nobody there
        want = min(cands, key=lambda c: sizes[group_of_node(c, k)])  # first of the smallest
        assert chosen == want
        groups = {group_of_node(c, k) for c in cands}
        assert set(asked[2:]) == {a for g, a in ((1, big), (2, small)) if g in groups}


def test_first_start_without_an_answer_or_with_k_1_is_a_plain_random_id() -> None:
    assert _first_id({}, [("10.0.0.1", 1)], 4, 7)[0] == candidate_ids(random.Random(7))[0]
    chosen, asked = _first_id({}, [("10.0.0.1", 1)], 1, 7)
    assert chosen == candidate_ids(random.Random(7))[0] and asked == []
    wrong_k = {("10.0.0.1", 1): _status(0, 1, 8, {})}  # another cluster's k: not used
    assert _first_id(wrong_k, [("10.0.0.1", 1)], 4, 7)[0] == candidate_ids(random.Random(7))[0]


def test_an_identity_on_disk_is_never_changed(tmp_path: Path) -> None:
    assert not has_identity(tmp_path)
    chosen = id_in(2, 4)
    first = load_identity(tmp_path, random.Random(1), chosen)
    assert first.node_id == chosen and has_identity(tmp_path)
    again = load_identity(tmp_path, random.Random(1), id_in(3, 4))
    assert again.node_id == chosen and again.incarnation == first.incarnation + 1


# --- the simulator -----------------------------------------------------------------------------


def test_simulated_newcomer_learns_sizes_from_its_seed_and_the_seeds_contacts() -> None:
    sim = Simulation(SimConfig(nodes=200, duration=1.0, k=10))
    sim._bootstrap()  # a converged cluster: every view knows its group exactly
    truth = Counter(h.node.group for h in sim.live if h.node is not None)
    for i in range(20):
        cands = candidate_ids(random.Random(i))
        chosen = sim._census(sim.live[i], cands)
        assert truth[group_of_node(chosen, 10)] == min(truth[group_of_node(c, 10)]
                                                       for c in cands)


def test_simulated_groups_stay_balanced_under_churn() -> None:
    """Initial placement and new nodes under heavy churn both choose by group size."""
    r = run(SimConfig(nodes=300, duration=60.0, churn_per_min=30.0, loss=0.01, seed=4,
                      warmup=10.0))
    assert r["joins"] > 20
    assert r["group_size_max"] <= math.ceil(300 / r["groups"]) + 2  # hashing alone: 24
    assert r["lookup_success_rate"] >= 0.99 and r["false_positives"] == 0
