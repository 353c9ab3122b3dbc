"""Record names: what the DHT stores for the namespace, and where each record is placed.

The filesystem is stored as small records, each a name with versions like any object::

    i/<ino>            an inode: type and mode, owner, link count, times (its tuple's attrs);
                       a symbolic link's target is its content
    e/<dir>/<entry>    a directory entry: the child's inode number and type (attrs)
    d/<ino>            a regular file's content
    x/<ino>            an inode's user extended attributes (content)
    o/<name>           a raw object of the DHT, outside the namespace (``/v1/objects``)
    c/<ino>/<i>.<gen>  a chunk of a large file whose content record is a manifest
                       (``daemon.core.manifest``), placed by its own name

``<ino>`` is the inode number as 16 lowercase hex digits. Every record about one inode --
its attributes, its content, its extended attributes and, for a directory, its entries -- is
*placed* by ``i/<ino>``: it falls into that name's group and onto the same r holders. So the
first live holder of an inode (its *primary*) holds everything an operation on it reads and
writes, and can apply the operation alone, atomically (``daemon.namespace.primary``); and a
directory is listed by asking any one member of one group.
"""

from __future__ import annotations

import functools

INODE = "i/"
ENTRY = "e/"
DATA = "d/"
XATTRS = "x/"
#: Raw objects of the DHT (``/v1/objects/NAME``), apart from the namespace.
OBJECT = "o/"
#: Chunks of files stored in chunks (``daemon.core.manifest``), placed by their own name.
CHUNK = "c/"
_INO_DIGITS = 16
_HEX = frozenset("0123456789abcdef")
ROOT_INO = 1
MAX_INO = (1 << 63) - 1


def ino_text(ino: int) -> str:
    return f"{ino:016x}"


def inode_name(ino: int) -> str:
    return INODE + ino_text(ino)


def data_name(ino: int) -> str:
    return DATA + ino_text(ino)


def xattrs_name(ino: int) -> str:
    return XATTRS + ino_text(ino)


def entry_prefix(directory: int) -> str:
    return f"{ENTRY}{ino_text(directory)}/"


def entry_name(directory: int, name: str) -> str:
    return entry_prefix(directory) + name


def parse_ino(text: str) -> int | None:
    """The inode number of 16 lowercase hex digits, else None."""
    if len(text) != _INO_DIGITS or not _HEX.issuperset(text):
        return None
    return int(text, 16)


def parse_entry(name: str) -> tuple[int, str] | None:
    """(directory inode, entry name) of an ``e/`` record name, else None."""
    if not name.startswith(ENTRY) or len(name) < 20 or name[18] != "/":
        return None
    directory = parse_ino(name[2:18])
    return None if directory is None else (directory, name[19:])


def record_ino(name: str) -> int | None:
    """The inode an ``i/``, ``d/`` or ``x/`` record is about, else None."""
    if len(name) != 18 or name[:2] not in (INODE, DATA, XATTRS):
        return None
    return parse_ino(name[2:])


def placement_key(name: str) -> str:
    """The name a record is placed by: ``i/<ino>`` for every record about inode ``ino``
    (and a directory's entries), the name itself for anything else."""
    if len(name) >= 18 and name[1] == "/" and name[0] in "dex" and (
            len(name) == 18 or name[18] == "/") and _HEX.issuperset(name[2:18]):
        if name[0] == "e" and len(name) == 18:
            return name  # "e/<ino>" with no entry: not a record of the namespace
        return INODE + name[2:18]
    return name


@functools.lru_cache(maxsize=4096)
def is_metadata(name: str) -> bool:
    """An inode, entry or extended-attributes record: no file's bytes (``objects`` counts
    the rest: file contents and raw objects)."""
    if name[:2] == ENTRY:
        return parse_entry(name) is not None
    return name[:2] in (INODE, XATTRS) and record_ino(name) is not None


def is_legacy(name: str) -> bool:
    """A name of neither the namespace nor the raw objects: an object stored by a version
    that named files by their path (``daemon.namespace.migrate`` converts them)."""
    if name.startswith((OBJECT, CHUNK)) or is_metadata(name):
        return False
    return not (name[:2] == DATA and record_ino(name) is not None)
