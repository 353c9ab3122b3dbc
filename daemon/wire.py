"""JSON forms of member entries and tuples for the HTTP API (lookups, listings, status)."""

from __future__ import annotations

from typing import Any

from daemon.core.messages import MemberEntry, TupleEntry, Version


def entry_to_json(entry: MemberEntry) -> list[Any]:
    return [entry.node_id.hex(), entry.host, entry.port, entry.incarnation, entry.heartbeat]


def entry_from_json(doc: Any) -> MemberEntry:
    node_id, host, port, incarnation, heartbeat = doc
    return MemberEntry(bytes.fromhex(node_id), str(host), int(port), int(incarnation),
                       int(heartbeat))


def tuple_to_json(t: TupleEntry) -> dict[str, Any]:
    return {"name": t.name, "clock": t.version.clock, "writer": t.version.writer.hex(),
            "holder_seq": t.holder_seq, "size": t.size, "mode": t.mode, "mtime_ns": t.mtime_ns,
            "checksum": t.checksum.hex(), "holders": [h.hex() for h in t.holders],
            "tombstone": t.tombstone, "attrs": t.attrs.hex()}


def tuple_from_json(doc: Any) -> TupleEntry:
    return TupleEntry(str(doc["name"]), Version(int(doc["clock"]), bytes.fromhex(doc["writer"])),
                      int(doc["holder_seq"]), int(doc["size"]), int(doc["mode"]),
                      int(doc["mtime_ns"]), bytes.fromhex(doc["checksum"]),
                      tuple(bytes.fromhex(h) for h in doc["holders"]), bool(doc["tombstone"]),
                      bytes.fromhex(doc.get("attrs", "")))


def record_to_json(t: TupleEntry, content: bytes | None) -> dict[str, Any]:
    return {"tuple": tuple_to_json(t), "content": None if content is None else content.hex()}


def record_from_json(doc: Any, limit: int) -> tuple[TupleEntry, bytes | None]:
    """A record sent by a primary (ValueError if malformed or over ``limit`` bytes)."""
    if not isinstance(doc, dict):
        raise ValueError("a record is an object")
    try:
        t = tuple_from_json(doc["tuple"])
    except (KeyError, TypeError) as exc:
        raise ValueError(f"malformed tuple: {exc}") from exc
    raw = doc.get("content")
    if raw is None:
        if not t.tombstone:
            raise ValueError(f"{t.name}: content missing")
        return t, None
    if not isinstance(raw, str) or len(raw) > 2 * limit:
        raise ValueError(f"{t.name}: content must be hex of at most {limit} bytes")
    return t, bytes.fromhex(raw)


def version_query(version: Version, mode: int, mtime_ns: int, size: int, attrs: bytes = b""
                   ) -> dict[str, object]:
    """The query naming a replica's version and metadata (a PUT to a holder)."""
    query: dict[str, object] = {"clock": version.clock, "writer": version.writer.hex(),
                                "mode": mode, "mtime_ns": mtime_ns, "size": size}
    if attrs:
        query["attrs"] = attrs.hex()
    return query
