"""PyFilesystem2's own conformance cases (``fs.test.FSTestCases``) run through its OSFS on a
directory inside a real kelipsfs mount: every case the suite has, against our POSIX behaviour.

Two adjustments, stated here rather than skipped: the suite's unicode case runs even though
PyFilesystem2 would skip it on Linux (see test_unicode_path); and the mount does not store
access times (like a filesystem mounted ``noatime``), so ``test_setinfo`` is replaced by a
version that checks the modification times it does store.
"""

from __future__ import annotations

import time
import unittest
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from fs.osfs import OSFS
from fs.test import FSTestCases

from tests.test_mount import Mount, Mounts

_mount: Mount | None = None


@pytest.fixture(scope="module", autouse=True)
def posix_mount(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    global _mount
    with Mounts(tmp_path_factory.mktemp("posix"), base=80) as ms:
        _mount = ms.new()
        yield _mount
        _mount = None


class TestPyFilesystem2OnTheMount(FSTestCases, unittest.TestCase):  # type: ignore[misc]
    def make_fs(self) -> OSFS:
        assert _mount is not None
        path = _mount.mountpoint / ("case-" + uuid.uuid4().hex[:10])
        path.mkdir()
        return OSFS(str(path))

    def test_setinfo(self) -> None:
        """The suite's test_setinfo, minus access times (not stored: noatime semantics)."""
        self.fs.create("birthday.txt")
        now = time.time()
        self.fs.setinfo("birthday.txt", {"details": {"modified": now + 3600}})
        info = self.fs.getinfo("birthday.txt", namespaces=["details"])
        self.assertAlmostEqual(info.get("details", "modified"), now + 3600, places=4)
        self.fs.setinfo("birthday.txt", {"details": {"accessed": now + 60,
                                                      "modified": now + 7200}})
        info = self.fs.getinfo("birthday.txt", namespaces=["details"])
        self.assertAlmostEqual(info.get("details", "modified"), now + 7200, places=4)


    def test_unicode_path(self) -> None:
        """The suite skips this on Linux (os.path.supports_unicode_filenames is False there,
        whatever the filesystem); the mount stores UTF-8 names, so run it unconditionally."""
        original = self.fs.getmeta
        self.fs.getmeta = lambda namespace="standard": {**original(namespace),  # type: ignore
                                                        "unicode_paths": True}
        try:
            super().test_unicode_path()
        finally:
            self.fs.getmeta = original  # type: ignore[method-assign]


def test_the_suite_ran(posix_mount: Mount) -> None:
    """The cases above really ran inside the mount (the case directories are there)."""
    assert any(p.name.startswith("case-") for p in Path(posix_mount.mountpoint).iterdir())
