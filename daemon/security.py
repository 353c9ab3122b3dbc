"""HMAC-SHA256 authentication of gossip datagrams and node-to-node HTTP calls.

Every datagram carries a trailer (time, nonce, MAC) and every HTTP call three headers with the
same fields, all under one cluster key. The MAC keeps foreign and forged traffic out; the time
bounds how long a captured message stays usable, and the nonces seen within that window stop it
from being replayed inside it. Time is always passed in (``now``, wall-clock seconds): nothing
here reads a clock, so the window logic is testable and the daemon decides which clock counts.

Without a key file a cluster still MACs everything, with a key derived from its cluster_id
(``open_cluster_key``). That key is NOT secret: it only catches corruption and keeps clusters
that share a network apart. Real protection needs a key file on every node.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import math
import os
import re
import secrets
from collections.abc import Callable, Mapping
from pathlib import Path

from daemon.core.config import AUTH_TRAILER
from daemon.digest import DIGEST_SIZE, digest_of

TIME_BYTES = 8  # milliseconds since the epoch, big-endian
NONCE_BYTES = 8
MAC_BYTES = 32  # HMAC-SHA256
TRAILER = TIME_BYTES + NONCE_BYTES + MAC_BYTES
assert TRAILER == AUTH_TRAILER, "the core's datagram budget must match the real trailer"

#: Signed in place of the body's digest (``daemon.digest``) by a request whose body is hashed
#: while it is sent (bulk uploads): the head is authenticated before any byte is read, and the
#: digest follows the body in a trailer (``sign_trailer``) bound to the head's MAC.
DIGEST_IN_TRAILER = digest_of(b"kelipsfs-v1 body digest in trailer")
#: The trailer: the body's digest, then an HMAC of it bound to the request's head.
BODY_TRAILER = DIGEST_SIZE + MAC_BYTES

MIN_KEY_BYTES = 16
MIN_KEY_HEX = 2 * MIN_KEY_BYTES
KEY_FILE_BYTES = 32

TIME_HEADER = "x-kelips-time"
NONCE_HEADER = "x-kelips-nonce"
MAC_HEADER = "x-kelips-mac"
_HEADERS = (TIME_HEADER, NONCE_HEADER, MAC_HEADER)

# Strict forms, so that no two header texts carry the same value (a changed header never passes).
_TIME_RE = re.compile(r"0|[1-9][0-9]{0,19}")
_NONCE_RE = re.compile(rf"[0-9a-f]{{{2 * NONCE_BYTES}}}")
_MAC_RE = re.compile(rf"[0-9a-f]{{{2 * MAC_BYTES}}}")
_HEX_KEY_RE = re.compile(rb"[0-9a-fA-F]+")


class AuthError(Exception):
    """A datagram or request failed authentication; ``reason`` is a short fixed word for metrics.

    Reasons: "short", "bad mac", "stale", "replay", "missing header", "malformed".
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        super().__init__(f"{reason}: {detail}" if detail else reason)


class KeyFileError(ValueError):
    """The cluster key file is missing, unreadable, too short or (for keygen) already there."""


# --- keys --------------------------------------------------------------------------------------


def load_key(path: Path) -> bytes:
    """The secret in ``path``: hex (at least 32 digits) or at least 16 raw bytes.

    Surrounding whitespace is stripped (editors add newlines). Content made only of hex digits is
    always read as hex, so a short hex key is refused instead of silently used as raw text.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"key file {path}: cannot read: {exc.strerror or exc}") from None
    data = data.strip()
    if not data:
        raise KeyFileError(f"key file {path}: is empty")
    if _HEX_KEY_RE.fullmatch(data):
        if len(data) % 2:
            raise KeyFileError(f"key file {path}: odd number of hex digits ({len(data)})")
        if len(data) < MIN_KEY_HEX:
            raise KeyFileError(
                f"key file {path}: too short: {len(data)} hex digits, need at least {MIN_KEY_HEX}")
        return bytes.fromhex(data.decode("ascii"))
    if len(data) < MIN_KEY_BYTES:
        raise KeyFileError(
            f"key file {path}: too short: {len(data)} bytes, need at least {MIN_KEY_BYTES} "
            f"(or {MIN_KEY_HEX} hex digits)")
    return data


def open_cluster_key(cluster_id: str) -> bytes:
    """The key of a cluster without a key file. Anyone knowing cluster_id has it: NOT secret."""
    return hashlib.sha256(b"kelipsfs-open-cluster:" + cluster_id.encode("utf-8")).digest()


def generate_key_file(path: Path) -> None:
    """Write 32 random bytes as hex to a new file readable by its owner only (``keygen``).

    Refuses to overwrite: replacing a cluster's key by accident cuts the node off its cluster.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise KeyFileError(f"key file {path}: already exists; not overwriting a key") from None
    except OSError as exc:
        raise KeyFileError(f"key file {path}: cannot create: {exc.strerror or exc}") from None
    with os.fdopen(fd, "w", encoding="ascii") as out:
        os.fchmod(fd, 0o600)  # the umask can only narrow the mode; make it exact anyway
        out.write(secrets.token_hex(KEY_FILE_BYTES) + "\n")


def _random_nonce() -> bytes:
    return os.urandom(NONCE_BYTES)


def _subkey(key: bytes, purpose: bytes) -> bytes:
    """Separate keys per use, so a request MAC can never pass as a datagram MAC."""
    return hmac.new(key, b"kelipsfs-v1 " + purpose, hashlib.sha256).digest()


def _to_ms(now: float) -> int:
    if not math.isfinite(now) or not 0 <= now < (1 << (8 * TIME_BYTES)) / 1000:
        raise ValueError(f"now must be a wall-clock time in seconds >= 0, got {now!r}")
    return int(now * 1000)


# --- the authenticator -------------------------------------------------------------------------


class Authenticator:
    """Seals and opens datagrams, signs and verifies requests, remembering nonces against replay.

    Replay memory: every accepted (time, nonce) is remembered while its time is within the
    window; anything older than ``now - window`` is refused as stale anyway, so it can be
    forgotten. Memory is capped at ``max_seen`` pairs: past the cap the oldest are evicted early
    (counted in ``evicted_early``) and the floor below which everything is refused is raised to
    cover them, so an eviction can cost a late datagram but never re-admit a replay. The floor
    only rises, which also keeps a clock stepping back from re-opening forgotten times.
    """

    def __init__(self, key: bytes, window: float = 30.0,
                 nonce_source: Callable[[], bytes] = _random_nonce,
                 max_seen: int = 65536) -> None:
        if len(key) < MIN_KEY_BYTES:
            raise ValueError(f"key must be at least {MIN_KEY_BYTES} bytes, got {len(key)}")
        if not math.isfinite(window) or window <= 0:
            raise ValueError(f"window must be a positive number of seconds, got {window!r}")
        if max_seen < 1:
            raise ValueError(f"max_seen must be at least 1, got {max_seen}")
        self._datagram_mac = hmac.new(_subkey(key, b"datagram"), digestmod=hashlib.sha256)
        self._request_mac = hmac.new(_subkey(key, b"request"), digestmod=hashlib.sha256)
        self._trailer_mac = hmac.new(_subkey(key, b"trailer"), digestmod=hashlib.sha256)
        self._window_ms = int(window * 1000)
        self._nonce_source = nonce_source
        self._max_seen = max_seen
        self._seen: set[tuple[int, bytes]] = set()
        self._by_time: list[tuple[int, bytes]] = []  # heap of the same pairs, oldest first
        self._floor_ms = 0
        self._evicted_early = 0

    @property
    def seen_count(self) -> int:
        """(time, nonce) pairs currently remembered; never more than max_seen."""
        return len(self._seen)

    @property
    def evicted_early(self) -> int:
        """Pairs forgotten before their window ended because memory was full (a load signal)."""
        return self._evicted_early

    # datagrams

    def seal(self, payload: bytes, now: float) -> bytes:
        """``payload`` + 8-byte time (ms) + 8-byte nonce + HMAC-SHA256 of everything before it."""
        body = payload + _to_ms(now).to_bytes(TIME_BYTES, "big") + self._nonce()
        mac = self._datagram_mac.copy()
        mac.update(body)
        return body + mac.digest()

    def open(self, datagram: bytes, now: float) -> bytes:
        """The payload of an authentic, fresh, first-seen datagram; else AuthError.

        State changes only once the MAC, the time and the nonce have all passed.
        """
        if len(datagram) < TRAILER:
            raise AuthError("short", f"{len(datagram)} bytes, the trailer alone is {TRAILER}")
        body, received = bytes(datagram[:-MAC_BYTES]), bytes(datagram[-MAC_BYTES:])
        mac = self._datagram_mac.copy()
        mac.update(body)
        if not hmac.compare_digest(mac.digest(), received):
            raise AuthError("bad mac")
        stamp = body[-(TIME_BYTES + NONCE_BYTES):]
        self._admit(int.from_bytes(stamp[:TIME_BYTES], "big"), stamp[TIME_BYTES:], now)
        return body[:-(TIME_BYTES + NONCE_BYTES)]

    # HTTP requests

    def sign_request(self, method: str, target: str, body_digest: bytes,
                     now: float) -> dict[str, str]:
        """Headers authenticating one request: its method, target (path + query) and body hash."""
        stamp = _to_ms(now)
        nonce = self._nonce()
        mac = self._request_digest(method, target, stamp, nonce, body_digest)
        return {TIME_HEADER: str(stamp), NONCE_HEADER: nonce.hex(), MAC_HEADER: mac.hex()}

    def verify_request(self, method: str, target: str, headers: Mapping[str, str],
                       body_digest: bytes, now: float) -> None:
        """Raise AuthError unless the headers sign exactly this request, freshly and once.

        ``now`` should be when the request arrived, not when its body finished streaming.
        Header names are matched case-insensitively.
        """
        found: dict[str, str] = {}
        for name, value in headers.items():
            lowered = name.lower()
            if lowered in _HEADERS:
                if found.get(lowered, value) != value:
                    raise AuthError("malformed", f"conflicting {lowered} headers")
                found[lowered] = value
        for name in _HEADERS:
            if name not in found:
                raise AuthError("missing header", name)
        time_text, nonce_text, mac_text = (found[name] for name in _HEADERS)
        if not _TIME_RE.fullmatch(time_text) or int(time_text) >= 1 << (8 * TIME_BYTES):
            raise AuthError("malformed", f"{TIME_HEADER}: {time_text[:40]!r}")
        if not _NONCE_RE.fullmatch(nonce_text):
            raise AuthError("malformed", f"{NONCE_HEADER}: {nonce_text[:40]!r}")
        if not _MAC_RE.fullmatch(mac_text):
            raise AuthError("malformed", f"{MAC_HEADER}: {mac_text[:80]!r}")
        stamp, nonce = int(time_text), bytes.fromhex(nonce_text)
        expected = self._request_digest(method, target, stamp, nonce, body_digest)
        if not hmac.compare_digest(expected, bytes.fromhex(mac_text)):
            raise AuthError("bad mac")
        self._admit(stamp, nonce, now)

    def sign_trailer(self, head_mac: str, body_digest: bytes) -> bytes:
        """The trailer of a request signed with DIGEST_IN_TRAILER whose MAC header is
        ``head_mac``: the body's digest and a MAC binding it to that one request (its nonce
        makes the head MAC unique, so a trailer cannot be moved to another request)."""
        return body_digest + self._trailer_digest(head_mac, body_digest)

    def verify_trailer(self, head_mac: str, trailer: bytes) -> bytes:
        """The body's digest from an authentic trailer of the request whose (verified) MAC
        header is ``head_mac``; AuthError otherwise. No replay memory is needed: the head's
        nonce was admitted once, and the trailer is bound to it."""
        if len(trailer) != BODY_TRAILER:
            raise AuthError("malformed", f"trailer of {len(trailer)} bytes, not {BODY_TRAILER}")
        sha, received = trailer[:DIGEST_SIZE], trailer[DIGEST_SIZE:]
        if not hmac.compare_digest(self._trailer_digest(head_mac, sha), received):
            raise AuthError("bad mac", "body trailer")
        return bytes(sha)

    # internals

    def _trailer_digest(self, head_mac: str, body_digest: bytes) -> bytes:
        if not _MAC_RE.fullmatch(head_mac):
            raise AuthError("malformed", f"{MAC_HEADER}: {head_mac[:80]!r}")
        if len(body_digest) != DIGEST_SIZE:
            raise ValueError(f"body_digest must be a 32-byte digest, got {len(body_digest)} bytes")
        mac = self._trailer_mac.copy()
        mac.update(bytes.fromhex(head_mac) + body_digest)
        return mac.digest()

    def _nonce(self) -> bytes:
        nonce = self._nonce_source()
        if len(nonce) != NONCE_BYTES:
            raise ValueError(f"nonce_source must return {NONCE_BYTES} bytes, got {len(nonce)}")
        return nonce

    def _request_digest(self, method: str, target: str, stamp: int, nonce: bytes,
                        body_digest: bytes) -> bytes:
        if len(body_digest) != DIGEST_SIZE:
            raise ValueError(f"body_digest must be a 32-byte digest, got {len(body_digest)} bytes")
        mac = self._request_mac.copy()
        for text in (method, target):  # length-prefixed: no two (method, target) pairs collide
            part = text.encode("utf-8", "surrogatepass")
            mac.update(len(part).to_bytes(4, "big") + part)
        mac.update(stamp.to_bytes(TIME_BYTES, "big") + nonce + body_digest)
        return mac.digest()

    def _admit(self, stamp: int, nonce: bytes, now: float) -> None:
        """Accept (stamp, nonce) once if fresh: check everything first, then remember it."""
        now_ms = _to_ms(now)
        skew = stamp - now_ms
        if abs(skew) > self._window_ms:
            raise AuthError("stale", f"{skew / 1000:+.3f} s from now")
        if stamp < self._floor_ms:
            raise AuthError("stale", "older than the replay memory")
        pair = (stamp, nonce)
        if pair in self._seen:
            raise AuthError("replay")
        self._forget_before(now_ms - self._window_ms)
        self._seen.add(pair)
        heapq.heappush(self._by_time, pair)
        while len(self._seen) > self._max_seen:
            self._evicted_early += self._forget_before(self._by_time[0][0] + 1)

    def _forget_before(self, floor_ms: int) -> int:
        """Raise the floor to ``floor_ms`` (never lower it) and drop the pairs below it."""
        self._floor_ms = max(self._floor_ms, floor_ms)
        dropped = 0
        while self._by_time and self._by_time[0][0] < self._floor_ms:
            self._seen.discard(heapq.heappop(self._by_time))
            dropped += 1
        return dropped
