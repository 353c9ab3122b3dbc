"""Recovery of the object store at start: what a crash left on disk is brought back to the
newest committed version of each name, and nothing else.

A crash in the middle of the commit order (``daemon.store_commit``) leaves debris; recovery
deletes it: everything in ``tmp/``, content without metadata, metadata whose content is missing
or has the wrong size, and all but the newest committed version of each name. Metadata of an
older format that recorded SHA-256 checksums is rewritten in place with the content digest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon.core.messages import Version
from daemon.digest import ALGORITHM, DIGEST_SIZE, EMPTY_DIGEST, new_hasher
from daemon.store_commit import WRITE_BATCH
from daemon.store_files import fsync_dir, unlink_quietly
from daemon.store_layout import (
    FANOUT_RE,
    FILE_RE,
    META_FORMAT,
    PATH_META_FORMAT,
    SHA256_META_FORMAT,
    StoredObject,
    check_version,
    file_stem,
    name_key,
    show,
    write_meta,
)

log = logging.getLogger("kelipsfs.store")

_SHA256_OF_NOTHING = hashlib.sha256().digest()


@dataclass
class _Recovered:
    """What recovery found and removed (logged once at start)."""

    temp: int = 0
    orphan_content: int = 0
    broken_meta: int = 0
    superseded: int = 0
    unknown: int = 0
    converted: int = 0  # format-1 records rewritten with the content digest
    converting: bool = False  # a format-1 record was met (and the start announced)


def recover(root: Path, objects: Path, tmp: Path) -> list[StoredObject]:
    """Bring the directory back to "newest committed version per name, nothing else" and
    return those versions, for the store to install (blocks: a scan and some unlinks)."""
    stats = _Recovered()
    newest_objects: list[StoredObject] = []
    for entry in os.scandir(tmp):
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            unlink_quietly(Path(entry.path))
        stats.temp += 1

    contents: dict[str, Path] = {}
    metas: dict[str, Path] = {}
    for sub in os.scandir(objects):
        if not (sub.is_dir(follow_symlinks=False) and FANOUT_RE.fullmatch(sub.name)):
            stats.unknown += 1
            continue
        for entry in os.scandir(sub.path):
            match = FILE_RE.fullmatch(entry.name)
            if match is None or not match.group(1).startswith(sub.name):
                stats.unknown += 1
                continue
            stem = entry.name.rpartition(".")[0]
            kind = metas if match.group(4) == "meta" else contents
            kind[stem] = Path(entry.path)

    by_name: dict[str, list[tuple[str, StoredObject]]] = {}
    for stem, meta_path in metas.items():
        obj = _load_meta(root, tmp, meta_path, stem, stats)
        if obj is not None and not obj.tombstone:
            content = contents.get(stem)
            try:
                if content is None or content.stat().st_size != obj.size:
                    obj = None
            except OSError:
                obj = None
        if obj is None:
            unlink_quietly(meta_path)
            stats.broken_meta += 1
            continue
        by_name.setdefault(obj.name, []).append((stem, obj))

    keep: set[str] = set()
    for versions in by_name.values():
        versions.sort(key=lambda item: item[1].version)
        stem, newest = versions[-1]
        for old_stem, _old in versions[:-1]:
            unlink_quietly(metas[old_stem])
            stats.superseded += 1
        if not newest.tombstone:
            keep.add(stem)
        newest_objects.append(newest)
    for stem, content in contents.items():
        if stem not in keep:
            unlink_quietly(content)
            stats.orphan_content += 1

    if stats.temp or stats.orphan_content or stats.broken_meta or stats.superseded:
        log.info("store %s recovered: removed %d temp files, %d content files without "
                 "metadata or superseded, %d incomplete metadata, %d superseded versions",
                 root, stats.temp, stats.orphan_content, stats.broken_meta,
                 stats.superseded)
    if stats.converted:
        log.info("store %s: %d records converted to the content digest", root,
                 stats.converted)
    if stats.unknown:
        log.warning("store %s: ignored %d unknown entries under %s", root,
                    stats.unknown, objects)
    return newest_objects


def _load_meta(root: Path, tmp: Path, meta_path: Path, stem: str,
               stats: _Recovered) -> StoredObject | None:
    """Parse and cross-check one metadata file; None if it is not a valid commit record."""
    try:
        doc = json.loads(meta_path.read_bytes())
        if isinstance(doc, dict) and doc.get("format") == SHA256_META_FORMAT:
            doc = _upgrade_meta(root, tmp, meta_path, stem, doc, stats)
        if not isinstance(doc, dict) or doc.get("format") not in (META_FORMAT,
                                                                  PATH_META_FORMAT):
            return None
        name, clock, writer = doc["name"], doc["clock"], bytes.fromhex(doc["writer"])
        size, checksum = doc["size"], bytes.fromhex(doc["checksum"])
        mode, mtime_ns, tombstone = doc["mode"], doc["mtime_ns"], doc["tombstone"]
        attrs = bytes.fromhex(doc.get("attrs", ""))
        if not (isinstance(name, str) and isinstance(size, int) and size >= 0
                and isinstance(mode, int) and isinstance(mtime_ns, int)
                and isinstance(tombstone, bool) and len(checksum) == DIGEST_SIZE):
            return None
        version = check_version(Version(clock, writer))
    except (OSError, ValueError, KeyError, TypeError):  # JSONDecodeError is a ValueError
        return None
    key = name_key(name)
    if file_stem(key, version) != stem:
        return None
    data_path = meta_path.with_name(f"{stem}.data")
    return StoredObject(name, version, size, checksum, mode, mtime_ns, tombstone,
                        None if tombstone else data_path, attrs=attrs)


def _upgrade_meta(root: Path, tmp: Path, meta_path: Path, stem: str, doc: dict[str, Any],
                  stats: _Recovered) -> dict[str, Any] | None:
    """Rewrite a format-1 record (SHA-256 checksum) with the content digest, in place.

    The content is read once and hashed both ways: only content that still matches its
    recorded SHA-256 gets a digest (a damaged copy would otherwise be certified afresh);
    it is dropped instead, and repair copies a good one back. A crash or an error while
    rewriting leaves the format-1 record, which the next start converts again.
    """
    old = bytes.fromhex(doc["checksum"])
    if not stats.converting:  # a long start deserves a word: every object is read once
        log.info("store %s: converting SHA-256 records to the content digest (%s); "
                 "every object is read once", root, ALGORITHM)
        stats.converting = True
    if doc.get("tombstone") is True:
        matches, digest = old == _SHA256_OF_NOTHING, EMPTY_DIGEST
    else:
        old_hash, new_hash = hashlib.sha256(), new_hasher()
        with open(meta_path.with_name(f"{stem}.data"), "rb") as fh:
            while block := fh.read(WRITE_BATCH):
                old_hash.update(block)
                new_hash.update(block)
        matches, digest = old_hash.digest() == old, new_hash.digest()
    if not matches:
        log.warning("store %s: %s no longer matches the SHA-256 recorded when it was "
                    "written; dropped while converting the store (repair restores a copy)",
                    root, show(str(doc.get("name"))))
        return None
    upgraded = {**doc, "format": PATH_META_FORMAT, "checksum": digest.hex()}
    stats.converted += 1
    try:
        write_meta(tmp, meta_path, upgraded)
        fsync_dir(meta_path.parent)
    except OSError as exc:  # e.g. a full disk: serve it converted, rewrite it next start
        log.warning("store %s: could not rewrite the record of %s in the new format (%s); "
                    "kept, converted again at the next start", root,
                    show(str(doc.get("name"))), exc.strerror or exc)
    return upgraded
