"""``kelipsfs mount`` and ``kelipsfs umount``.

``mount`` without ``--foreground`` daemonizes by re-executing itself with ``--foreground`` in a
new session (libfuse's own daemonizing forks inside the library, and the node's trio loop must
not be forked), with its output in ``<data_dir>/mount.log``; it returns 0 once the mount point
is mounted, or prints why the child failed (from that log) and returns non-zero, leaving no
mount and no process behind. Every start failure (mount point missing, not a directory or
busy; port taken; bad configuration; no /dev/fuse; join refused) is reported this way.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import trio

#: Seconds ``kelipsfs mount`` waits for the background child to mount. Joining is included,
#: and a node that cannot reach any seed retries for about 40 s before it gives up: waiting
#: that long reports the node's own reason instead of a bare timeout.
MOUNT_TIMEOUT = 60.0
#: Seconds ``kelipsfs umount`` waits for the node process to leave its group and exit.
UMOUNT_WAIT = 30.0


def _mount_parser() -> argparse.ArgumentParser:
    from kelipsfs.cli import _cluster_args
    p = argparse.ArgumentParser(
        prog="kelipsfs mount",
        description="Run a kelipsfs node and mount the cluster at MOUNTPOINT. Returns once "
                    "it is mounted; the node runs in the background until `kelipsfs umount "
                    "MOUNTPOINT` (or SIGTERM), logging to <data_dir>/mount.log.")
    p.add_argument("mountpoint")
    _cluster_args(p)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any configuration key (see `kelipsfs config`)")
    p.add_argument("--foreground", action="store_true",
                   help="stay in the foreground (log to stderr) until unmounted or signalled")
    p.add_argument("-o", dest="options", action="append", default=[], metavar="OPT[,OPT...]",
                   help="mount options: allow_other (implies default_permissions), ro, "
                        "relatime (record access times; noatime by default), or any libfuse "
                        "option")
    return p


def cmd_mount(argv: list[str]) -> int:
    from kelipsfs.cli import settings_or_report
    from kelipsfs.mount import MountError, check_mountpoint, fusermount

    ns = _mount_parser().parse_args(argv)
    settings = settings_or_report(ns, "mount")
    if settings is None:
        return 2
    mountpoint = Path(ns.mountpoint).absolute()
    try:
        check_mountpoint(mountpoint)
        fusermount()
    except MountError as exc:
        print(f"kelipsfs mount: {exc}", file=sys.stderr)
        return 1
    if ns.foreground:
        return _run_foreground(settings, mountpoint, list(ns.options))
    return _spawn(argv, settings.data_dir.absolute(), mountpoint)


def _run_foreground(settings: Any, mountpoint: Path, options: list[str]) -> int:
    from daemon.logs import configure_logging
    from kelipsfs.mount import run_mount
    configure_logging(settings.log_level, settings.log_format)
    try:
        trio.run(functools.partial(run_mount, settings, mountpoint, foreground=True,
                                   options=options))
    except BaseException as exc:
        reason = _reason(exc)
        if reason is None:
            raise
        print(f"kelipsfs mount: {reason}", file=sys.stderr, flush=True)
        return 1
    return 0


def _reason(exc: BaseException) -> str | None:
    """The message for an expected start failure; None for a bug (re-raised, with traceback)."""
    from daemon.runtime import JoinFailed, JoinRefused
    from daemon.security import KeyFileError
    from daemon.store_layout import StoreError
    from kelipsfs.mount import MountError
    leaf = exc
    while isinstance(leaf, BaseExceptionGroup) and len(leaf.exceptions) == 1:
        leaf = leaf.exceptions[0]
    if isinstance(leaf, (MountError, JoinRefused, JoinFailed, KeyFileError, StoreError,
                         OSError, ValueError)):
        return str(leaf)
    if isinstance(leaf, KeyboardInterrupt):
        return "interrupted"
    return None


def _spawn(argv: list[str], data_dir: Path, mountpoint: Path) -> int:
    """Start ``mount --foreground`` detached and wait until it has mounted or failed."""
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = data_dir / "mount.log"
    with open(log_path, "ab") as log:
        start = log.tell()
        log.write(f"--- kelipsfs mount {mountpoint} at {time.strftime('%F %T')}\n".encode())
        log.flush()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        child = subprocess.Popen(
            [sys.executable, "-m", "kelipsfs.cli", "mount", *argv, "--foreground"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True, env=env)
    try:
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while time.monotonic() < deadline:
            if child.poll() is not None:
                print(f"kelipsfs mount: {_log_reason(log_path, start)}", file=sys.stderr)
                return 1
            if os.path.ismount(mountpoint) and _endpoint_pid(data_dir) == child.pid:
                print(f"kelipsfs: mounted {mountpoint} (pid {child.pid}, log {log_path})")
                return 0
            time.sleep(0.05)
        reason = f"not mounted within {MOUNT_TIMEOUT:.0f} s"
    except KeyboardInterrupt:
        reason = "interrupted"
    _stop_child(child, mountpoint)
    print(f"kelipsfs mount: {reason}; {_log_reason(log_path, start)}", file=sys.stderr)
    return 1


def _endpoint_pid(data_dir: Path) -> int | None:
    """The pid in the node's endpoint.json: written by the child right after it mounted, so
    once it is the child's, local commands (``kelipsfs ls``...) find this node."""
    try:
        pid = json.loads((data_dir / "endpoint.json").read_text())["pid"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return pid if isinstance(pid, int) else None


def _log_reason(log_path: Path, start: int) -> str:
    """What the child said about its failure: its own error lines, else the log's tail."""
    try:
        with open(log_path, "rb") as fh:
            fh.seek(start)
            lines = fh.read().decode(errors="replace").splitlines()[1:]
    except OSError as exc:
        return f"(cannot read {log_path}: {exc})"
    picked = [line.removeprefix("kelipsfs mount: ") for line in lines
              if line.startswith(("kelipsfs mount:", "fuse:", "fusermount"))]
    text = "\n".join(picked or lines[-10:]).strip()
    return text or f"the mount process exited without a message (see {log_path})"


def _stop_child(child: subprocess.Popen[bytes], mountpoint: Path) -> None:
    """Make sure a failed start leaves neither a process nor a mount behind."""
    for sig, wait in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 10.0)):
        if child.poll() is not None:
            break
        try:
            os.killpg(child.pid, sig)
        except ProcessLookupError:
            break
        try:
            child.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
    if os.path.ismount(mountpoint):
        subprocess.run(["fusermount3", "-uz", str(mountpoint)], check=False,
                       capture_output=True)


def cmd_umount(argv: list[str]) -> int:
    from kelipsfs.mount import registry_file
    p = argparse.ArgumentParser(
        prog="kelipsfs umount",
        description="Unmount a kelipsfs mount; its node then leaves the cluster and exits.")
    p.add_argument("mountpoint")
    p.add_argument("-z", "--lazy", action="store_true",
                   help="detach now even if files are open (the node stops when they close)")
    ns = p.parse_args(argv)
    from daemon.logs import configure_logging
    configure_logging("warning")
    mountpoint = Path(ns.mountpoint).absolute()
    if not os.path.ismount(mountpoint):
        print(f"kelipsfs umount: {mountpoint} is not mounted", file=sys.stderr)
        return 1
    pid = _registered_pid(registry_file(mountpoint))
    result = subprocess.run(["fusermount3", "-uz" if ns.lazy else "-u", str(mountpoint)],
                            check=False, capture_output=True, text=True)
    if result.returncode != 0:
        print(f"kelipsfs umount: {result.stderr.strip() or 'fusermount3 failed'}",
              file=sys.stderr)
        return 1
    if pid is not None and not ns.lazy and not _wait_exit(pid, UMOUNT_WAIT):
        print(f"kelipsfs umount: unmounted, but the node (pid {pid}) is still running",
              file=sys.stderr)
        return 1
    return 0


def _registered_pid(path: Path) -> int | None:
    try:
        pid = json.loads(path.read_text())["pid"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return pid if isinstance(pid, int) and _alive(pid) else None


def _alive(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            state = fh.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != b"Z"


def _wait_exit(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return False
