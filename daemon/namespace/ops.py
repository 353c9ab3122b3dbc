"""Namespace operations as plain data: what a mount asks the primary of an inode to do.

An ``Op`` names one rule of ``daemon.core.inodes`` and its arguments; ``run`` applies it to a
view of the records. Ops travel between nodes as JSON (``to_json`` / ``from_json``), and
anything malformed is a ``ValueError`` before a rule sees it. The answer (``Result``) is the
inode the operation left and the entry it replaced or removed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any

from daemon.core import inodes
from daemon.core.inodes import AttrChange, Entry, Inode, Outcome, View
from daemon.core.keys import MAX_INO
from daemon.core.messages import TupleEntry, Version

_MAX_NAME = 1024  # characters of a name in an op (the rules check the real limits)


@dataclass(frozen=True)
class Op:
    """Rule ``kind`` of ``daemon.core.inodes``, run at the primary of inode ``key``, with
    the rule's keyword arguments (bytes, ``AttrChange``: ``to_json`` makes them JSON)."""

    kind: str
    key: int
    args: dict[str, Any]


@dataclass(frozen=True)
class Result:
    """What an operation left: the inode it changed (None when it removed it) and the entry
    it replaced or removed."""

    inode: Inode | None
    entry: Entry | None
    #: The tuples the operation wrote (their versions: a binding's, for a put).
    tuples: tuple[TupleEntry, ...] = ()


def _ino(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_INO:
        raise ValueError(f"{what} must be an inode number, got {value!r}")
    return value


def _int(value: Any, what: str, low: int = -(1 << 63), high: int = (1 << 64) - 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{what} must be an integer in [{low}, {high}], got {value!r}")
    return value


def _str(value: Any, what: str) -> str:
    if not isinstance(value, str) or len(value) > _MAX_NAME:
        raise ValueError(f"{what} must be a string of at most {_MAX_NAME} characters")
    return value


def _bytes(value: Any, what: str, limit: int) -> bytes:
    if not isinstance(value, str) or len(value) > 2 * limit:
        raise ValueError(f"{what} must be hex of at most {limit} bytes")
    return bytes.fromhex(value)


def _opt(check: Callable[[Any, str], int], value: Any, what: str) -> int | None:
    return None if value is None else check(value, what)


def _change(doc: Any) -> AttrChange:
    if not isinstance(doc, dict) or not set(doc) <= {f.name for f in fields(AttrChange)}:
        raise ValueError("change must be an object of AttrChange fields")
    return AttrChange(
        mode=_opt(lambda v, w: _int(v, w, 0, 0o7777), doc.get("mode"), "mode"),
        uid=_opt(lambda v, w: _int(v, w, 0, 0xFFFFFFFF), doc.get("uid"), "uid"),
        gid=_opt(lambda v, w: _int(v, w, 0, 0xFFFFFFFF), doc.get("gid"), "gid"),
        atime_ns=_opt(_int, doc.get("atime_ns"), "atime_ns"),
        mtime_ns=_opt(_int, doc.get("mtime_ns"), "mtime_ns"),
        nlink_delta=_int(doc.get("nlink_delta", 0), "nlink_delta", -2, 1),
        parent=_opt(_ino, doc.get("parent"), "parent"),
        touch=bool(doc.get("touch", False)), access=bool(doc.get("access", False)))


def _args(kind: str, a: dict[str, Any]) -> dict[str, Any]:
    """The rule's keyword arguments, checked (ValueError for anything out of shape)."""
    if kind == "make_inode":
        return {"ino": _ino(a.get("ino"), "ino"),
                "mode": _int(a.get("mode"), "mode", 0, 0o177777),
                "uid": _int(a.get("uid"), "uid", 0, 0xFFFFFFFF),
                "gid": _int(a.get("gid"), "gid", 0, 0xFFFFFFFF),
                "rdev": _int(a.get("rdev", 0), "rdev", 0),
                "parent": _ino(a.get("parent"), "parent"),
                "target": _bytes(a.get("target", ""), "target", inodes.MAX_SYMLINK_BYTES + 1),
                "exist_ok": bool(a.get("exist_ok", False))}
    if kind == "create":
        return {"directory": _ino(a.get("directory"), "directory"),
                "name": _str(a.get("name"), "name"), "ino": _ino(a.get("ino"), "ino"),
                "mode": _int(a.get("mode"), "mode", 0, 0o177777),
                "uid": _int(a.get("uid"), "uid", 0, 0xFFFFFFFF),
                "gid": _int(a.get("gid"), "gid", 0, 0xFFFFFFFF),
                "rdev": _int(a.get("rdev", 0), "rdev", 0),
                "target": _bytes(a.get("target", ""), "target", inodes.MAX_SYMLINK_BYTES + 1)}
    if kind == "add_entry":
        return {"directory": _ino(a.get("directory"), "directory"),
                "name": _str(a.get("name"), "name"), "child": _ino(a.get("child"), "child"),
                "kind": _int(a.get("kind"), "kind", 0, 0o170000),
                "replace_ok": bool(a.get("replace_ok", False)),
                "expect": _opt(lambda v, w: _int(v, w, 0, MAX_INO), a.get("expect"), "expect"),
                "exchange": bool(a.get("exchange", False))}
    if kind == "remove_entry":
        want = a.get("want_dir")
        if want is not None and not isinstance(want, bool):
            raise ValueError("want_dir must be true, false or null")
        return {"directory": _ino(a.get("directory"), "directory"),
                "name": _str(a.get("name"), "name"),
                "expect": _opt(_ino, a.get("expect"), "expect"), "want_dir": want}
    if kind in ("unlink", "rmdir"):
        return {"directory": _ino(a.get("directory"), "directory"),
                "name": _str(a.get("name"), "name"), "ino": _ino(a.get("ino"), "ino")}
    if kind == "exchange_entries":
        return {"directory": _ino(a.get("directory"), "directory"),
                "first": _str(a.get("first"), "first"), "second": _str(a.get("second"), "second")}
    if kind == "move_entry":
        return {"directory": _ino(a.get("directory"), "directory"),
                "old": _str(a.get("old"), "old"), "new": _str(a.get("new"), "new"),
                "replace_ok": bool(a.get("replace_ok", False)),
                "expect": _opt(lambda v, w: _int(v, w, 0, MAX_INO), a.get("expect"), "expect")}
    if kind == "set_attrs":
        return {"ino": _ino(a.get("ino"), "ino"), "change": _change(a.get("change"))}
    if kind == "remove_dir":
        return {"ino": _ino(a.get("ino"), "ino")}
    if kind == "set_xattr":
        value = a.get("value")
        return {"ino": _ino(a.get("ino"), "ino"), "name": _str(a.get("name"), "name"),
                "value": None if value is None else _bytes(value, "value",
                                                           inodes.MAX_XATTR_VALUE + 1),
                "flags": _int(a.get("flags", 0), "flags", 0, 3)}
    raise ValueError(f"unknown operation {kind!r}")


_RULES: dict[str, Callable[..., Outcome]] = {
    "make_inode": inodes.make_inode, "create": inodes.create, "add_entry": inodes.add_entry,
    "remove_entry": inodes.remove_entry, "exchange_entries": inodes.exchange_entries,
    "move_entry": inodes.move_entry, "set_attrs": inodes.set_attrs,
    "remove_dir": inodes.remove_dir, "set_xattr": inodes.set_xattr,
    "unlink": inodes.unlink, "rmdir": inodes.rmdir,
}

#: Operations that also change the inode ``args["ino"]``, placed with their ``key``.
_SECOND_INODE = frozenset({"create", "unlink", "rmdir"})


def locked_inodes(op: Op) -> list[int]:
    """The inodes ``op`` changes, in the order their locks are taken (no two primaries'
    operations on a pair of inodes can wait for each other)."""
    if op.kind in _SECOND_INODE:
        return sorted({op.key, int(op.args["ino"])})
    return [op.key]


def run(op: Op, view: View, now_ns: int, clock: int) -> Outcome:
    """Apply ``op`` (its arguments as the rule takes them: ``from_json`` makes them so) to
    ``view``; FsError if the rule refuses."""
    return _RULES[op.kind](view, now_ns, clock, **op.args)


def to_json(op: Op) -> dict[str, Any]:
    args = {}
    for key, value in op.args.items():
        if isinstance(value, bytes):
            value = value.hex()
        elif isinstance(value, AttrChange):
            value = {k: v for k, v in asdict(value).items() if v is not None}
        args[key] = value
    return {"kind": op.kind, "key": op.key, "args": args}


def from_json(doc: Any) -> Op:
    if not isinstance(doc, dict) or not isinstance(doc.get("args"), dict):
        raise ValueError("an operation is an object with kind, key and args")
    kind = doc.get("kind")
    if kind not in _RULES:
        raise ValueError(f"unknown operation {kind!r}")
    # Checked and converted now: a bad op is refused before anything is locked.
    return Op(kind, _ino(doc.get("key"), "key"), _args(kind, doc["args"]))


def inode_to_json(ino: Inode) -> dict[str, Any]:
    doc = asdict(ino)
    for key in ("version", "content"):
        v = doc[key]
        doc[key] = None if v is None else [v[0], v[1].hex()]
    return doc


def inode_from_json(doc: Any) -> Inode:
    if not isinstance(doc, dict):
        raise ValueError("an inode is an object")
    values = dict(doc)
    for key in ("version", "content"):
        v = values.get(key)
        values[key] = None if v is None else Version(int(v[0]), bytes.fromhex(v[1]))
    try:
        return Inode(**values)
    except TypeError as exc:
        raise ValueError(f"malformed inode: {exc}") from exc


def result_to_json(result: Result) -> dict[str, Any]:
    entry = result.entry
    return {"inode": None if result.inode is None else inode_to_json(result.inode),
            "entry": None if entry is None else [entry.name, entry.ino, entry.kind]}


def result_from_json(doc: Any) -> Result:
    if not isinstance(doc, dict):
        raise ValueError("a result is an object")
    inode = doc.get("inode")
    entry = doc.get("entry")
    return Result(None if inode is None else inode_from_json(inode),
                  None if entry is None else Entry(str(entry[0]), int(entry[1]), int(entry[2])))
