"""Node ids, the SHA-1 group mapping, validate_k and CoreConfig validation / derived defaults."""

from __future__ import annotations

import hashlib
import math
import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.core.config import CoreConfig, groups_for
from daemon.core.ids import (
    MAX_GROUPS,
    NODE_ID_BYTES,
    ConfigError,
    check_node_id,
    cluster_tag,
    group_of_bytes,
    group_of_name,
    group_of_node,
    new_node_id,
    node_id_from_name,
    validate_k,
)

PROPS = settings(max_examples=200, deadline=None)

node_ids = st.binary(min_size=NODE_ID_BYTES, max_size=NODE_ID_BYTES)
ks = st.integers(min_value=1, max_value=MAX_GROUPS)
names = st.text(min_size=0, max_size=200)


def _sha1_mod(key: bytes, k: int) -> int:
    return int.from_bytes(hashlib.sha1(key).digest(), "big") % k


# --- group mapping ---------------------------------------------------------------------------


@PROPS
@given(name=names, k=ks)
def test_group_of_name_is_sha1_mod_k_and_in_range(name: str, k: int) -> None:
    g = group_of_name(name, k)
    assert 0 <= g < k
    assert g == _sha1_mod(name.encode("utf-8"), k)
    assert group_of_name(name, k) == g  # deterministic


@PROPS
@given(node_id=node_ids, k=ks)
def test_group_of_node_is_sha1_mod_k_and_in_range(node_id: bytes, k: int) -> None:
    g = group_of_node(node_id, k)
    assert 0 <= g < k
    assert g == _sha1_mod(node_id, k)
    assert group_of_node(node_id, k) == g  # deterministic (and the cache returns the same)
    assert group_of_bytes(node_id, k) == g


def test_group_of_name_known_value() -> None:
    digest = hashlib.sha1(b"/photos/cat.jpg").digest()
    assert group_of_name("/photos/cat.jpg", 7) == int.from_bytes(digest, "big") % 7
    assert group_of_name("/photos/cat.jpg", 1) == 0


def test_group_of_name_uses_utf8() -> None:
    name = "/données/été.txt"
    assert group_of_name(name, 1000) == _sha1_mod(name.encode("utf-8"), 1000)


def test_groups_are_roughly_balanced() -> None:
    k = 4
    counts = Counter(group_of_name(f"/file-{i}", k) for i in range(4000))
    assert set(counts) == set(range(k))
    assert all(800 <= c <= 1200 for c in counts.values()), counts


def test_new_node_id_uses_injected_rng() -> None:
    a = new_node_id(random.Random(5))
    b = new_node_id(random.Random(5))
    c = new_node_id(random.Random(6))
    assert a == b != c
    assert len(a) == NODE_ID_BYTES
    assert check_node_id(a) == a


def test_node_id_from_name_and_check() -> None:
    nid = node_id_from_name("node-1")
    assert nid == hashlib.sha1(b"node-1").digest()
    with pytest.raises(ValueError):
        check_node_id(b"short")
    with pytest.raises(ValueError):
        check_node_id("x" * NODE_ID_BYTES)


def test_cluster_tag_is_four_bytes_and_distinguishes_clusters() -> None:
    assert len(cluster_tag("kelipsfs")) == 4
    assert cluster_tag("kelipsfs") == cluster_tag("kelipsfs")
    assert cluster_tag("kelipsfs") != cluster_tag("other")


# --- validate_k ------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 100, MAX_GROUPS])
def test_validate_k_accepts(k: int) -> None:
    assert validate_k(k) == k


@pytest.mark.parametrize("bad", [0, -1, 65536, True, False, 1.0, 2.5, "3", None, [1]])
def test_validate_k_rejects(bad: object) -> None:
    with pytest.raises(ConfigError) as exc:
        validate_k(bad)
    assert "k" in str(exc.value)


def test_config_error_is_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


# --- CoreConfig: derived defaults ------------------------------------------------------------


def test_defaults_derive_t_cleanup_and_graveyard_ttl() -> None:
    cfg = CoreConfig()
    assert cfg.t_cleanup == 2 * cfg.t_fail
    assert cfg.graveyard_ttl == cfg.t_cleanup


def test_t_cleanup_follows_t_fail() -> None:
    cfg = CoreConfig(t_fail=6.0)
    assert cfg.t_cleanup == 12.0
    assert cfg.graveyard_ttl == 12.0


def test_graveyard_ttl_follows_explicit_t_cleanup() -> None:
    cfg = CoreConfig(t_cleanup=20.0)
    assert cfg.t_cleanup == 20.0
    assert cfg.graveyard_ttl == 20.0


def test_explicit_values_are_kept() -> None:
    cfg = CoreConfig(t_fail=5.0, t_cleanup=7.0, graveyard_ttl=30.0)
    assert (cfg.t_fail, cfg.t_cleanup, cfg.graveyard_ttl) == (5.0, 7.0, 30.0)


def test_with_changes_recomputes_derived_defaults_for_t_fail() -> None:
    cfg = CoreConfig()
    changed = cfg.with_changes(t_fail=10.0)
    assert changed.t_fail == 10.0
    assert changed.t_cleanup == 20.0
    assert changed.graveyard_ttl == 20.0
    assert cfg.t_cleanup == 8.0  # the original is untouched


@pytest.mark.parametrize(
    "changes",
    [
        {"t_fail": 10.0},
        {"t_cleanup": 20.0},
        {"t_fail": 10.0, "t_cleanup": 30.0},
        {"graveyard_ttl": 50.0},
        {"k": 9, "fanout": 3},
    ],
)
def test_with_changes_from_defaults_equals_direct_construction(changes: dict[str, object]) -> None:
    assert CoreConfig().with_changes(**changes) == CoreConfig(**changes)  # type: ignore[arg-type]


def test_with_changes_keeps_other_fields_and_validates() -> None:
    cfg = CoreConfig(k=5, cluster_id="c1", fanout=3)
    changed = cfg.with_changes(replication=2)
    assert (changed.k, changed.cluster_id, changed.fanout, changed.replication) == (5, "c1", 3, 2)
    with pytest.raises(ConfigError, match="fanout"):
        cfg.with_changes(fanout=0)
    with pytest.raises(ConfigError, match="k"):
        cfg.with_changes(k=0)


# --- CoreConfig: validation ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"k": 0}, "k"),
        ({"k": 65536}, "k"),
        ({"cluster_id": ""}, "cluster_id"),
        ({"cluster_id": "x" * 256}, "cluster_id"),
        ({"heartbeat_interval": 0}, "heartbeat_interval"),
        ({"gossip_interval": -0.5}, "gossip_interval"),
        ({"gossip_interval": math.inf}, "gossip_interval"),
        ({"probe_timeout": 0.0}, "probe_timeout"),
        ({"anti_entropy_interval": 0}, "anti_entropy_interval"),
        ({"tombstone_ttl": -1}, "tombstone_ttl"),
        ({"rtt_floor": 0}, "rtt_floor"),
        ({"fanout": 0}, "fanout"),
        ({"fanout": 17}, "fanout"),
        ({"fanout": 2.0}, "fanout"),
        ({"fanout": True}, "fanout"),
        ({"contacts_per_group": 0}, "contacts_per_group"),
        ({"replication": 0}, "replication"),
        ({"probe_misses": 0}, "probe_misses"),
        ({"max_datagram": 100}, "max_datagram"),
        ({"max_datagram": 65508}, "max_datagram"),
        ({"tuple_share": 2}, "tuple_share"),
        ({"tuple_share": -0.1}, "tuple_share"),
        ({"foreign_share": 1.5}, "foreign_share"),
        ({"uniform_share": -1}, "uniform_share"),
        ({"explore_probability": 1.01}, "explore_probability"),
        ({"rtt_refresh_probability": -0.01}, "rtt_refresh_probability"),
        ({"tuple_share": 0.6, "foreign_share": 0.4}, "tuple_share"),
        ({"rtt_exponent": 5}, "rtt_exponent"),
        ({"rtt_exponent": -1}, "rtt_exponent"),
        ({"t_fail": 1.0}, "t_fail"),  # t_fail <= heartbeat_interval
        ({"t_fail": 0.5}, "t_fail"),
        ({"heartbeat_interval": 5.0}, "t_fail"),  # default t_fail 4 is now too short
        ({"t_cleanup": 3.0}, "t_cleanup"),  # below t_fail
        ({"graveyard_ttl": -1.0}, "graveyard_ttl"),
    ],
)
def test_bad_values_raise_config_error_naming_the_field(
        changes: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError) as exc:
        CoreConfig(**changes)  # type: ignore[arg-type]
    assert field in str(exc.value)


NUMERIC_FIELDS = [
    "heartbeat_interval", "gossip_interval", "fanout", "t_fail", "t_cleanup",
    "contacts_per_group", "replication", "max_datagram", "tuple_share", "foreign_share",
    "rtt_exponent", "rtt_floor", "uniform_share", "probe_timeout", "probe_misses",
    "explore_probability", "rtt_refresh_probability", "anti_entropy_interval", "tombstone_ttl",
    "graveyard_ttl",
]


@pytest.mark.parametrize("field", NUMERIC_FIELDS)
@pytest.mark.parametrize("bad", ["4", math.nan], ids=["str", "nan"])
def test_non_numeric_values_raise_config_error_naming_the_field(field: str, bad: object) -> None:
    # A YAML typo ("4s", .nan) must surface as a ConfigError that names the key, not as a
    # TypeError or as an error about some other, derived field.
    with pytest.raises(ConfigError) as exc:
        CoreConfig(**{field: bad})  # type: ignore[arg-type]
    assert field in str(exc.value)


def test_config_is_frozen() -> None:
    cfg = CoreConfig()
    with pytest.raises(AttributeError):
        cfg.k = 3  # type: ignore[misc]


@pytest.mark.parametrize(("n", "k"), [(1, 1), (2, 1), (4, 2), (100, 10), (1000, 32)])
def test_groups_for(n: int, k: int) -> None:
    assert groups_for(n) == k


def test_groups_for_rejects_zero() -> None:
    with pytest.raises(ConfigError):
        groups_for(0)
