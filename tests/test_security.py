"""HMAC authentication: datagram trailers, request headers, replay memory, key files."""

from __future__ import annotations

import hashlib
import itertools
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.core.config import AUTH_TRAILER
from daemon.digest import digest_of
from daemon.security import (
    BODY_TRAILER,
    DIGEST_IN_TRAILER,
    MAC_HEADER,
    NONCE_HEADER,
    TIME_HEADER,
    TRAILER,
    Authenticator,
    AuthError,
    KeyFileError,
    generate_key_file,
    load_key,
    open_cluster_key,
)

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
NOW = 1_700_000_000.0
BODY = digest_of(b"body")
PROPS = settings(max_examples=300, deadline=None)


def counter_nonces() -> Callable[[], bytes]:
    """Deterministic distinct nonces, so tests control exactly what gets repeated."""
    counter = itertools.count(1)
    return lambda: next(counter).to_bytes(8, "big")


def auth(**kwargs: object) -> Authenticator:
    return Authenticator(KEY, **kwargs)  # type: ignore[arg-type]


def reason(call: Callable[..., object], *args: object) -> str:
    """The AuthError reason of ``call(*args)``; fails the test if it does not raise one."""
    with pytest.raises(AuthError) as info:
        call(*args)
    return info.value.reason


# --- datagrams ---------------------------------------------------------------------------------


def test_trailer_matches_the_core_budget() -> None:
    assert TRAILER == AUTH_TRAILER == 48


@pytest.mark.parametrize("payload", [b"", b"x", b"gossip" * 200])
def test_roundtrip(payload: bytes) -> None:
    sender, receiver = auth(), auth()
    sealed = sender.seal(payload, NOW)
    assert len(sealed) == len(payload) + TRAILER
    assert sealed.startswith(payload)
    assert receiver.open(sealed, NOW + 0.5) == payload


def test_trailer_layout() -> None:
    sealed = Authenticator(KEY, nonce_source=lambda: b"NONCE123").seal(b"p", NOW + 0.0129)
    assert int.from_bytes(sealed[1:9], "big") == int(NOW * 1000) + 12
    assert sealed[9:17] == b"NONCE123"
    assert len(sealed[17:]) == 32


def test_every_single_bit_flip_is_rejected() -> None:
    receiver = auth()
    sealed = auth().seal(b"a gossip message of some length", NOW)
    for bit in range(len(sealed) * 8):
        forged = bytearray(sealed)
        forged[bit // 8] ^= 1 << (bit % 8)
        assert reason(receiver.open, bytes(forged), NOW) == "bad mac"
    assert receiver.seen_count == 0  # failed MACs leave no trace
    assert receiver.open(sealed, NOW) == b"a gossip message of some length"


def test_truncated_and_extended_are_rejected() -> None:
    receiver = auth()
    sealed = auth().seal(b"payload", NOW)
    for length in range(len(sealed)):
        expected = "short" if length < TRAILER else "bad mac"
        assert reason(receiver.open, sealed[:length], NOW) == expected
    assert reason(lambda: receiver.open(sealed + b"\x00", NOW)) == "bad mac"
    assert reason(lambda: receiver.open(sealed[1:], NOW)) == "bad mac"


def test_wrong_key_is_rejected() -> None:
    sealed = Authenticator(OTHER_KEY).seal(b"hello", NOW)
    assert reason(lambda: auth().open(sealed, NOW)) == "bad mac"
    other_cluster = Authenticator(open_cluster_key("other")).seal(b"hello", NOW)
    mine = Authenticator(open_cluster_key("kelipsfs"))
    assert reason(lambda: mine.open(other_cluster, NOW)) == "bad mac"


@pytest.mark.parametrize("skew", [-30.001, 30.001, -1e6, 1e6])
def test_stale_in_both_directions(skew: float) -> None:
    receiver = auth(window=30.0)
    sealed = auth().seal(b"x", NOW)
    assert reason(lambda: receiver.open(sealed, NOW - skew)) == "stale"
    assert receiver.seen_count == 0


@pytest.mark.parametrize("skew", [-30.0, -29.9, 0.0, 29.9, 30.0])
def test_within_the_window_is_accepted(skew: float) -> None:
    assert auth(window=30.0).open(auth().seal(b"x", NOW), NOW - skew) == b"x"


def test_replay_rejected_fresh_nonce_accepted() -> None:
    sender, receiver = auth(), auth()
    first = sender.seal(b"same payload", NOW)
    assert receiver.open(first, NOW) == b"same payload"
    assert reason(lambda: receiver.open(first, NOW + 1)) == "replay"
    assert reason(lambda: receiver.open(first, NOW + 29)) == "replay"
    second = sender.seal(b"same payload", NOW)  # same time, new nonce
    assert second != first
    assert receiver.open(second, NOW) == b"same payload"
    assert receiver.seen_count == 2
    assert reason(lambda: receiver.open(first, NOW + 31)) == "stale"  # forgotten, still refused


def test_repeated_nonce_is_a_replay_even_with_another_payload() -> None:
    sender = Authenticator(KEY, nonce_source=lambda: b"\x00" * 8)
    receiver = auth()
    receiver.open(sender.seal(b"one", NOW), NOW)
    assert reason(lambda: receiver.open(sender.seal(b"two", NOW), NOW)) == "replay"
    assert receiver.open(sender.seal(b"two", NOW + 0.001), NOW) == b"two"  # other ms


def test_failed_checks_do_not_change_state() -> None:
    receiver = auth()
    sealed = auth().seal(b"x", NOW)
    for now in (NOW - 100, NOW + 100):
        assert reason(receiver.open, sealed, now) == "stale"
    assert receiver.seen_count == 0
    receiver.open(sealed, NOW)
    assert reason(lambda: receiver.open(sealed, NOW)) == "replay"
    assert receiver.seen_count == 1


def test_seen_set_bounded_by_time_over_200k_datagrams() -> None:
    sender, receiver = Authenticator(KEY, nonce_source=counter_nonces()), auth(window=30.0)
    peak = 0
    for i in range(200_000):  # 1,000 per second for 200 s: 30,000 within any window
        now = NOW + i / 1000
        receiver.open(sender.seal(b"g", now), now)
        peak = max(peak, receiver.seen_count)
    assert peak <= 30_002
    assert receiver.evicted_early == 0


def test_seen_set_bounded_by_cap_and_still_refuses_replays() -> None:
    sender = Authenticator(KEY, nonce_source=counter_nonces())
    receiver = auth(window=30.0, max_seen=1000)
    sealed = [sender.seal(b"g", NOW + i / 10_000) for i in range(200_000)]
    for i, datagram in enumerate(sealed):  # 10,000 per second: the cap, not time, binds
        receiver.open(datagram, NOW + i / 10_000)
        assert receiver.seen_count <= 1000
    assert receiver.evicted_early > 0
    end = NOW + 20.0
    # Replays of evicted and of remembered datagrams are both refused, never re-admitted.
    assert reason(lambda: receiver.open(sealed[0], end)) == "stale"
    assert reason(lambda: receiver.open(sealed[150_000], end)) == "stale"
    assert reason(lambda: receiver.open(sealed[-1], end)) == "replay"
    assert receiver.open(sender.seal(b"new", end), end) == b"new"


def test_clock_stepping_back_does_not_reopen_forgotten_times() -> None:
    sender, receiver = auth(), auth(window=30.0)
    old = sender.seal(b"x", NOW)
    receiver.open(old, NOW)
    receiver.open(sender.seal(b"y", NOW + 100), NOW + 100)  # forgets NOW's nonce
    assert receiver.seen_count == 1
    assert reason(lambda: receiver.open(old, NOW + 10)) == "stale"  # clock went back 90 s


def test_invalid_construction_and_times() -> None:
    with pytest.raises(ValueError, match="key"):
        Authenticator(b"short")
    with pytest.raises(ValueError, match="window"):
        Authenticator(KEY, window=0)
    with pytest.raises(ValueError, match="max_seen"):
        Authenticator(KEY, max_seen=0)
    with pytest.raises(ValueError, match="nonce"):
        Authenticator(KEY, nonce_source=lambda: b"1234").seal(b"x", NOW)
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="now"):
            auth().seal(b"x", bad)


@PROPS
@given(st.binary(max_size=300))
def test_opening_random_bytes_only_raises_auth_error(data: bytes) -> None:
    with pytest.raises(AuthError):
        auth().open(data, NOW)


@PROPS
@given(st.binary(max_size=200), st.floats(min_value=0, max_value=4e9))
def test_random_payloads_roundtrip(payload: bytes, now: float) -> None:
    assert auth().open(auth().seal(payload, now), now) == payload


# --- HTTP requests -----------------------------------------------------------------------------


def test_request_roundtrip_and_replay() -> None:
    client, server = auth(), auth()
    headers = client.sign_request("PUT", "/objects/a%20b?replica=1", BODY, NOW)
    assert set(headers) == {TIME_HEADER, NONCE_HEADER, MAC_HEADER}
    assert headers[TIME_HEADER] == str(int(NOW * 1000))
    server.verify_request("PUT", "/objects/a%20b?replica=1", headers, BODY, NOW + 1)
    assert reason(lambda: server.verify_request(
        "PUT", "/objects/a%20b?replica=1", headers, BODY, NOW + 1)) == "replay"


def test_header_names_are_case_insensitive() -> None:
    headers = auth().sign_request("GET", "/x", BODY, NOW)
    shouted = {name.upper(): value for name, value in headers.items()}
    shouted["Content-Type"] = "text/plain"
    auth().verify_request("GET", "/x", shouted, BODY, NOW)


@pytest.mark.parametrize(("method", "target", "body"), [
    ("POST", "/x?a=1", BODY),
    ("get", "/x?a=1", BODY),
    ("GET", "/x?a=2", BODY),
    ("GET", "/x", BODY),
    ("GET", "/X?a=1", BODY),
    ("GET", "/x?a=1", digest_of(b"other")),
    ("GE", "T/x?a=1", BODY),  # the length prefixes keep the split significant
])
def test_any_change_of_the_request_is_rejected(method: str, target: str, body: bytes) -> None:
    headers = auth().sign_request("GET", "/x?a=1", BODY, NOW)
    server = auth()
    assert reason(lambda: server.verify_request(method, target, headers, body, NOW)) == "bad mac"
    assert server.seen_count == 0
    server.verify_request("GET", "/x?a=1", headers, BODY, NOW)


def test_any_change_of_a_header_is_rejected() -> None:
    headers = auth().sign_request("GET", "/x", BODY, NOW)
    for name, value in headers.items():
        for position, char in enumerate(value):
            for replacement in "0123456789abcdefABCDEF x":
                if replacement == char:
                    continue
                changed = dict(headers)
                changed[name] = value[:position] + replacement + value[position + 1:]
                got = reason(auth().verify_request, "GET", "/x", changed, BODY, NOW)
                assert got in ("bad mac", "malformed", "stale"), (name, changed[name])
        for changed_value in ("", value + "0", "0" + value, " " + value, value[:-1]):
            changed = dict(headers, **{name: changed_value})
            got = reason(auth().verify_request, "GET", "/x", changed, BODY, NOW)
            assert got in ("bad mac", "malformed", "stale"), (name, changed_value)


def test_request_timestamp_change_is_bad_mac() -> None:
    headers = auth().sign_request("GET", "/x", BODY, NOW)
    headers[TIME_HEADER] = str(int(headers[TIME_HEADER]) + 1)
    assert reason(lambda: auth().verify_request("GET", "/x", headers, BODY, NOW)) == "bad mac"


@pytest.mark.parametrize("missing", [TIME_HEADER, NONCE_HEADER, MAC_HEADER])
def test_missing_header(missing: str) -> None:
    headers = auth().sign_request("GET", "/x", BODY, NOW)
    del headers[missing]
    with pytest.raises(AuthError, match=missing) as info:
        auth().verify_request("GET", "/x", headers, BODY, NOW)
    assert info.value.reason == "missing header"


@pytest.mark.parametrize(("name", "value"), [
    (TIME_HEADER, "-1"),
    (TIME_HEADER, "1e3"),
    (TIME_HEADER, "99999999999999999999"),
    (NONCE_HEADER, "zz" * 8),
    (NONCE_HEADER, "AB" * 8),
    (MAC_HEADER, "00" * 31),
])
def test_malformed_headers(name: str, value: str) -> None:
    headers = auth().sign_request("GET", "/x", BODY, NOW)
    headers[name] = value
    assert reason(lambda: auth().verify_request("GET", "/x", headers, BODY, NOW)) == "malformed"


def test_conflicting_duplicate_headers_are_malformed() -> None:
    headers = auth().sign_request("GET", "/x", BODY, NOW)
    doubled = dict(headers, **{MAC_HEADER.upper(): "00" * 32})
    assert reason(lambda: auth().verify_request("GET", "/x", doubled, BODY, NOW)) == "malformed"


def test_request_wrong_key_and_stale() -> None:
    headers = Authenticator(OTHER_KEY).sign_request("GET", "/x", BODY, NOW)
    assert reason(lambda: auth().verify_request("GET", "/x", headers, BODY, NOW)) == "bad mac"
    headers = auth().sign_request("GET", "/x", BODY, NOW)
    for now in (NOW - 31, NOW + 31):
        assert reason(auth().verify_request, "GET", "/x", headers, BODY, now) == "stale"


def test_request_and_datagram_macs_are_separate() -> None:
    """A request's signature cannot be replayed as a datagram trailer or the other way round."""
    nonce = b"\x01" * 8
    signer = Authenticator(KEY, nonce_source=lambda: nonce)
    headers = signer.sign_request("GET", "/x", BODY, NOW)
    stamp = int(headers[TIME_HEADER]).to_bytes(8, "big")
    payload = (3).to_bytes(4, "big") + b"GET" + (2).to_bytes(4, "big") + b"/x"
    for forged in (payload + stamp + nonce + BODY + bytes.fromhex(headers[MAC_HEADER]),
                   stamp + nonce + bytes.fromhex(headers[MAC_HEADER])):
        assert reason(auth().open, forged, NOW) == "bad mac"


def test_body_hash_must_be_a_digest() -> None:
    with pytest.raises(ValueError, match="body_digest"):
        auth().sign_request("GET", "/x", b"short", NOW)


@PROPS
@given(st.dictionaries(st.sampled_from([TIME_HEADER, NONCE_HEADER, MAC_HEADER, "other"]),
                       st.text(max_size=80)),
       st.text(max_size=10), st.text(max_size=40))
def test_verifying_random_headers_only_raises_auth_error(headers: dict[str, str], method: str,
                                                         target: str) -> None:
    with pytest.raises(AuthError):
        auth().verify_request(method, target, headers, BODY, NOW)


# --- body trailers (a digest sent after a bulk body) -----------------------------------------


def _head_mac(signer: Authenticator | None = None, target: str = "/v1/replica/f") -> str:
    """The MAC header of an upload whose body digest travels in a trailer."""
    headers = (signer or auth()).sign_request("PUT", target, DIGEST_IN_TRAILER, NOW)
    return headers[MAC_HEADER]


def test_body_trailer_roundtrip() -> None:
    assert BODY_TRAILER == 64
    assert digest_of(b"kelipsfs-v1 body digest in trailer") == DIGEST_IN_TRAILER
    head_mac = _head_mac()
    trailer = auth().sign_trailer(head_mac, BODY)
    assert len(trailer) == BODY_TRAILER and trailer[:32] == BODY
    server = auth()
    assert server.verify_trailer(head_mac, trailer) == BODY
    # no replay memory: the head's nonce was admitted once; the trailer only binds to it
    assert server.verify_trailer(head_mac, trailer) == BODY and server.seen_count == 0


def test_the_head_signed_with_the_trailer_marker_verifies_like_any_request() -> None:
    headers = auth().sign_request("PUT", "/v1/files/f", DIGEST_IN_TRAILER, NOW)
    server = auth()
    server.verify_request("PUT", "/v1/files/f", headers, DIGEST_IN_TRAILER, NOW)
    assert reason(server.verify_request, "PUT", "/v1/files/f", headers, BODY, NOW) == "bad mac"


def test_a_trailer_of_another_request_is_refused() -> None:
    signer = auth(nonce_source=counter_nonces())
    first, second = _head_mac(signer), _head_mac(signer)
    assert first != second  # same request, another nonce: another head MAC
    trailer = signer.sign_trailer(first, BODY)
    assert reason(auth().verify_trailer, second, trailer) == "bad mac"
    other_target = _head_mac(auth(nonce_source=lambda: b"\x01" * 8), "/v1/replica/g")
    assert reason(auth().verify_trailer, other_target, trailer) == "bad mac"
    assert auth().verify_trailer(first, trailer) == BODY


def test_every_bit_flip_of_a_body_trailer_is_refused() -> None:
    head_mac = _head_mac()
    trailer = auth().sign_trailer(head_mac, BODY)
    server = auth()
    for index in range(len(trailer)):  # the digest (0..31) and the MAC (32..63)
        for bit in range(8):
            flipped = bytearray(trailer)
            flipped[index] ^= 1 << bit
            assert reason(server.verify_trailer, head_mac, bytes(flipped)) == "bad mac", \
                (index, bit)
    assert server.verify_trailer(head_mac, trailer) == BODY


def test_a_digest_swapped_under_a_signed_mac_is_refused() -> None:
    """Another digest under a valid MAC of the same head is refused: only the key holder
    can make a trailer for a given digest."""
    head_mac = _head_mac()
    other = digest_of(b"other body")
    swapped = other + auth().sign_trailer(head_mac, BODY)[32:]
    assert reason(auth().verify_trailer, head_mac, swapped) == "bad mac"
    assert auth().verify_trailer(head_mac, auth().sign_trailer(head_mac, other)) == other


@pytest.mark.parametrize("length", [0, 1, 32, 63, 65, 128])
def test_a_trailer_of_the_wrong_length_is_malformed(length: int) -> None:
    head_mac = _head_mac()
    trailer = auth().sign_trailer(head_mac, BODY)
    candidate = (trailer * 2)[:length]
    with pytest.raises(AuthError, match=f"trailer of {length} bytes") as info:
        auth().verify_trailer(head_mac, candidate)
    assert info.value.reason == "malformed"


@pytest.mark.parametrize("head_mac", ["", "00" * 31, "zz" * 32, "AB" * 32, "00" * 33])
def test_a_malformed_head_mac_is_refused(head_mac: str) -> None:
    trailer = auth().sign_trailer(_head_mac(), BODY)
    assert reason(auth().verify_trailer, head_mac, trailer) == "malformed"


def test_a_trailer_made_with_another_key_is_refused() -> None:
    head_mac = _head_mac()
    forged = Authenticator(OTHER_KEY).sign_trailer(head_mac, BODY)
    assert reason(auth().verify_trailer, head_mac, forged) == "bad mac"
    assert reason(Authenticator(OTHER_KEY).verify_trailer, head_mac,
                  auth().sign_trailer(head_mac, BODY)) == "bad mac"


def test_trailer_request_and_datagram_macs_are_separate() -> None:
    """The trailer MAC uses its own subkey: a request MAC or a datagram MAC over the same
    bytes is no trailer, and a trailer's MAC is no request signature."""
    head_mac = _head_mac()
    trailer = auth().sign_trailer(head_mac, BODY)
    nonce = b"\x02" * 8
    signer = Authenticator(KEY, nonce_source=lambda: nonce)
    request_mac = bytes.fromhex(signer.sign_request("PUT", "/x", BODY, NOW)[MAC_HEADER])
    assert reason(auth().verify_trailer, head_mac, BODY + request_mac) == "bad mac"
    headers = signer.sign_request("PUT", "/x", BODY, NOW)
    headers[MAC_HEADER] = trailer[32:].hex()
    assert reason(auth().verify_request, "PUT", "/x", headers, BODY, NOW) == "bad mac"


def test_signing_a_trailer_needs_a_digest() -> None:
    with pytest.raises(ValueError, match="body_digest"):
        auth().sign_trailer(_head_mac(), b"short")


@PROPS
@given(st.binary(max_size=100))
def test_verifying_random_trailers_only_raises_auth_error(trailer: bytes) -> None:
    head_mac = _head_mac()
    with pytest.raises(AuthError):
        auth().verify_trailer(head_mac, trailer)


# --- keys --------------------------------------------------------------------------------------


def test_open_cluster_key() -> None:
    key = open_cluster_key("kelipsfs")
    assert key == hashlib.sha256(b"kelipsfs-open-cluster:kelipsfs").digest()
    assert len(key) == 32 and open_cluster_key("other") != key


@pytest.mark.parametrize(("content", "expected"), [
    (b"ab" * 32, bytes([0xAB]) * 32),
    (b"  " + b"0123456789ABCDEF" * 2 + b"\n", bytes.fromhex("0123456789abcdef" * 2)),
    (b"a passphrase of some length\n", b"a passphrase of some length"),
    (bytes(range(1, 17)) + b"\xff", bytes(range(1, 17)) + b"\xff"),
])
def test_load_key(tmp_path: Path, content: bytes, expected: bytes) -> None:
    path = tmp_path / "cluster.key"
    path.write_bytes(content)
    assert load_key(path) == expected


@pytest.mark.parametrize(("content", "words"), [
    (b"", "empty"),
    (b" \n\t", "empty"),
    (b"ab" * 15, "30 hex digits"),
    (b"abc" * 11, "odd number"),
    (b"fifteen bytes!!", "15 bytes"),
])
def test_load_key_rejects(tmp_path: Path, content: bytes, words: str) -> None:
    path = tmp_path / "cluster.key"
    path.write_bytes(content)
    with pytest.raises(KeyFileError, match=words) as info:
        load_key(path)
    assert str(path) in str(info.value)


def test_load_key_unreadable(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="cannot read"):
        load_key(tmp_path / "missing.key")
    with pytest.raises(KeyFileError, match="cannot read"):
        load_key(tmp_path)
    assert issubclass(KeyFileError, ValueError)


def test_generate_key_file(tmp_path: Path) -> None:
    first, second = tmp_path / "a.key", tmp_path / "b.key"
    generate_key_file(first)
    generate_key_file(second)
    assert stat.S_IMODE(first.stat().st_mode) == 0o600
    text = first.read_text()
    assert len(text) == 65 and text.endswith("\n")
    key = load_key(first)
    assert len(key) == 32 and key != load_key(second)
    Authenticator(key)
    with pytest.raises(KeyFileError, match="already exists"):
        generate_key_file(first)
    assert load_key(first) == key
    with pytest.raises(KeyFileError, match="cannot create"):
        generate_key_file(tmp_path / "no" / "such" / "dir.key")
