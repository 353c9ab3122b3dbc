"""The mount runtime: one process runs a kelipsfs node and serves it as a FUSE filesystem.

Shape (every rule here was paid for; see /work/shared/platform-notes.md):

* The node (``NodeRuntime``) runs in a trio nursery; the FUSE loop runs in a worker thread of
  that same nursery (``trio.to_thread.run_sync``), always in libfuse's foreground mode, since
  libfuse's own daemonizing forks and the Python code after it never runs in the parent.
  ``kelipsfs mount`` without ``--foreground`` daemonizes by re-executing itself instead.
* The SIGINT/SIGTERM/SIGHUP receiver is opened *before* mounting: libfuse installs its own
  handlers only where it finds the default one, and with Python's in place ``kill`` keeps
  working.
* Shutdown unmounts (``fusermount3 -u``, then ``-uz`` if busy) inside the nursery that owns the
  FUSE thread, shielded from cancellation, then waits a bounded time for the loop to return
  (abandoning the thread if a process keeps a lazily-detached mount busy), and only then stops
  the node, so callbacks still in flight find the node alive.
* The FUSE loop returning on its own (``kelipsfs umount``, ``fusermount3 -u``) shuts the node
  down cleanly too, and the process exits 0.
* ``auto_unmount`` makes libfuse's helper remove the mount if this process dies (kill -9):
  no "Transport endpoint is not connected" mount is left behind.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import shutil
import signal
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from daemon.logs import fields
from daemon.runtime import NodeRuntime
from daemon.settings import NodeSettings

if TYPE_CHECKING:
    from kelipsfs.fuse_ops import KelipsOperations
    from kelipsfs.invalidation import KernelInodes

log = logging.getLogger("kelipsfs.mount")

#: Seconds allowed for the kernel to show the mount once the FUSE loop started.
MOUNT_READY_TIMEOUT = 20.0
#: Seconds the FUSE loop gets to return after an unmount before its thread is abandoned.
UNMOUNT_WAIT = 10.0
#: Seconds a new mount waits for the cluster to answer for its root directory.
ROOT_WAIT = 30.0
#: Seconds the node gets to tell its group it leaves.
LEAVE_WAIT = 10.0
FUSE_DEVICE = Path("/dev/fuse")


class MountError(Exception):
    """The mount could not be set up (or was interrupted before it was); says why."""


def fusermount() -> str:
    """The fusermount3 helper: needed for auto_unmount and to unmount as a user."""
    found = shutil.which("fusermount3")
    if found is None:
        raise MountError("fusermount3 not found: install FUSE 3 (apt-get install -y fuse3)")
    return found


def check_mountpoint(mountpoint: Path) -> None:
    """Refuse a mount point that cannot work, before anything is started."""
    if not mountpoint.exists():
        raise MountError(f"mount point {mountpoint} does not exist")
    if not mountpoint.is_dir():
        raise MountError(f"mount point {mountpoint} is not a directory")
    if os.path.ismount(mountpoint):
        raise MountError(f"mount point {mountpoint} is busy: something is already mounted there")
    if not FUSE_DEVICE.exists():
        raise MountError(f"{FUSE_DEVICE} does not exist: this kernel has no FUSE support "
                         "(modprobe fuse; containers need --device /dev/fuse)")
    if not os.access(FUSE_DEVICE, os.R_OK | os.W_OK):
        raise MountError(f"no permission to open {FUSE_DEVICE}")


@dataclasses.dataclass(frozen=True)
class MountOptions:
    """What the ``-o`` words ask of a mount."""

    #: For libfuse.
    fuse: frozenset[str]
    readonly: bool = False
    #: relatime: the first read after a change records the access time (noatime: never).
    record_atime: bool = False


def fuse_options(options: list[str]) -> MountOptions:
    """The mount options of ``-o`` words (MountError for one that cannot be honoured).

    ``default_permissions`` is always on: the kernel checks every access against the mode
    bits, owners and sticky directories, as on a local disk. ``allow_other`` lets other
    users (and tools that switch users) reach the mount. Entry and attribute timeouts are
    given per answer by ``kelipsfs.fuse_ops``, not here. Reads do not record access times
    (``noatime``, as JuiceFS and most network filesystems: a write to the cluster per read
    would cost every reader); ``relatime`` records them.
    """
    opts: set[str] = {"fsname=kelipsfs", "subtype=kelipsfs", "auto_unmount",
                      "default_permissions"}
    readonly = record_atime = False
    for word in options:
        for item in word.split(","):
            item = item.strip()
            if not item:
                continue
            if item == "ro":
                readonly = True
            elif item in ("strictatime", "atime"):
                raise MountError(f"-o {item}: access times are recorded with relatime at "
                                 "most (or noatime, the default)")
            elif item in ("relatime", "noatime"):
                record_atime = item == "relatime"  # (the node's business, not the kernel's)
                continue
            opts.add(item)
    return MountOptions(frozenset(opts), readonly, record_atime)


async def unmount(mountpoint: Path) -> bool:
    """``fusermount3 -u``, then ``-uz`` (lazy) if busy; True if the mount is gone."""
    for flags in ("-u", "-uz"):
        try:
            result = await trio.run_process([fusermount(), flags, str(mountpoint)], check=False,
                                            capture_stdout=True, capture_stderr=True)
        except (OSError, MountError) as exc:
            log.error("cannot run fusermount3: %s", exc)
            return False
        if result.returncode == 0:
            return True
        log.warning("fusermount3 %s %s: %s", flags, mountpoint,
                    result.stderr.decode(errors="replace").strip())
        if not await _is_mount(mountpoint):
            return True
    return False


async def _is_mount(mountpoint: Path) -> bool:
    """os.path.ismount in a thread: stat of the mount point is answered by our own FUSE
    threads, and the trio thread must never touch the mount itself."""
    return await trio.to_thread.run_sync(os.path.ismount, mountpoint, abandon_on_cancel=True)


def registry_file(mountpoint: Path) -> Path:
    """Where a mount records its pid so ``kelipsfs umount`` can wait for the node to stop."""
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    key = hashlib.sha1(str(mountpoint).encode(), usedforsecurity=False).hexdigest()[:16]
    return Path(base) / "kelipsfs-mounts" / f"{key}.json"


def _register(mountpoint: Path, data_dir: Path) -> Path | None:
    path = registry_file(mountpoint)
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"pid": os.getpid(), "mountpoint": str(mountpoint),
                                   "data_dir": str(data_dir)}))
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("cannot record the mount in %s: %s", path, exc)
        return None
    return path


async def run_mount(settings: NodeSettings, mountpoint: Path, *, foreground: bool,
                    options: list[str],
                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Run a node and serve it at ``mountpoint`` until a signal or an unmount; then leave.

    ``task_status.started()`` is called once the mount is visible. Raises MountError (or the
    node's own start errors: OSError for a taken port, JoinFailed, JoinRefused, KeyFileError)
    with nothing left mounted. ``foreground`` only changes what is logged: daemonizing is the
    caller's business (``kelipsfs.mount_cli`` re-executes itself in the background).
    """
    mountpoint = mountpoint.absolute()
    check_mountpoint(mountpoint)
    fusermount()
    chosen = fuse_options(options)
    # libfuse changes the working directory once mounted: every path must be absolute first.
    settings = absolute_paths(settings)
    if settings.data_dir.resolve().is_relative_to(mountpoint.resolve()):
        raise MountError(f"data dir {settings.data_dir} is inside the mount point: the node "
                         "would store its objects in its own filesystem")
    lock_fd = lock_data_dir(settings.data_dir)
    try:
        await _serve(settings, mountpoint, foreground, chosen, task_status)
    finally:
        os.close(lock_fd)


def absolute_paths(settings: NodeSettings) -> NodeSettings:
    """The settings with data dir and key file made absolute (relative to the cwd now)."""
    key = settings.cluster_key_file
    return dataclasses.replace(settings, data_dir=settings.data_dir.absolute(),
                               cluster_key_file=None if key is None else key.absolute())


def lock_data_dir(data_dir: Path) -> int:
    """Hold an exclusive lock on the data dir for the life of the process: two nodes on one
    store would corrupt it. Returns the fd to keep open."""
    data_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(data_dir / "mount.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise MountError(f"data dir {data_dir} is in use by another kelipsfs mount") from None
    return fd


async def _serve(settings: NodeSettings, mountpoint: Path, foreground: bool,
                 chosen: MountOptions,
                 task_status: trio.TaskStatus[None]) -> None:
    import pyfuse3

    from kelipsfs.client import write_endpoint
    from kelipsfs.invalidation import Invalidator, KernelInodes

    runtime = NodeRuntime(settings)
    kernel = KernelInodes()
    invalidator = Invalidator(kernel)
    stop = trio.Event()
    node_finished = trio.Event()
    fuse_finished = trio.Event()
    fuse_error: list[BaseException] = []
    fuse_started = False
    registered: Path | None = None

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:
            startup = trio.CancelScope()

            async def watch_signals(*, task_status: trio.TaskStatus[trio.CancelScope]) -> None:
                with trio.CancelScope() as scope:
                    task_status.started(scope)
                    async for signum in signals:
                        log.info("signal: unmounting", extra=fields(
                            event="signal", signal=signal.Signals(signum).name,
                            mountpoint=str(mountpoint)))
                        stop.set()
                        startup.cancel()

            async def run_node(*, task_status: trio.TaskStatus[None]) -> None:
                try:
                    await runtime.run(task_status=task_status)
                finally:
                    node_finished.set()

            async def run_fuse() -> None:
                try:
                    await pyfuse3.main()
                except Exception as exc:
                    fuse_error.append(exc)
                    log.error("the FUSE loop failed: %s", exc)
                finally:
                    fuse_finished.set()
                    stop.set()
                log.info("FUSE loop ended")

            signal_scope: trio.CancelScope = await nursery.start(watch_signals)
            try:
                with startup:
                    await nursery.start(run_node)
                    ops = await _operations(runtime, settings, chosen, nursery, kernel)
                    try:
                        pyfuse3.init(ops, str(mountpoint), set(chosen.fuse))
                    except RuntimeError as exc:
                        raise MountError(f"FUSE could not mount {mountpoint}: {exc} (see "
                                         "libfuse's message above)") from exc
                    fuse_started = True
                    invalidator.start()
                    runtime.node.watch_tuples(invalidator.changed)
                    nursery.start_soon(run_fuse)
                    await _wait_mounted(mountpoint, fuse_finished, fuse_error)
                if startup.cancelled_caught:
                    raise MountError("interrupted before the mount was ready")
                write_endpoint(settings.data_dir, settings.listen, settings.core.cluster_id,
                               settings.cluster_key_file)
                registered = _register(mountpoint, settings.data_dir)
                task_status.started()
                host, port = settings.listen
                print(f"kelipsfs mounted {mountpoint} (node {host}:{port}, pid {os.getpid()}"
                      f"{', read-only' if chosen.readonly else ''}"
                      f"{'' if foreground else ', background'})", flush=True)
                log.info("mounted", extra=fields(event="mounted", mountpoint=str(mountpoint),
                                                 readonly=chosen.readonly))
                await stop.wait()
            finally:
                with trio.CancelScope(shield=True):
                    if fuse_started:
                        runtime.node.watch_tuples(None)
                        invalidator.stop()  # (before the session it writes to is gone)
                        if not fuse_finished.is_set():
                            pyfuse3.terminate()
                            with trio.move_on_after(UNMOUNT_WAIT):
                                await fuse_finished.wait()
                        pyfuse3.close(unmount=True)
                    runtime.shutdown()
                    with trio.move_on_after(LEAVE_WAIT):
                        await node_finished.wait()
                    if registered is not None:
                        registered.unlink(missing_ok=True)
                signal_scope.cancel()
                if not node_finished.is_set():
                    nursery.cancel_scope.cancel()
    log.info("stopped")


async def _operations(runtime: NodeRuntime, settings: NodeSettings, chosen: MountOptions,
                      background: trio.Nursery, kernel: KernelInodes) -> KelipsOperations:
    """The FUSE operations over a running node, once the cluster has a root directory."""
    from daemon.core.inodes import FsError
    from daemon.namespace.cluster import ClusterRecords
    from daemon.namespace.vfs import Caller, Namespace
    from kelipsfs.content import Content
    from kelipsfs.fuse_ops import KelipsOperations
    from kelipsfs.open_files import OpenFiles

    spool = await trio.to_thread.run_sync(prepare_spool, settings.data_dir)
    namespace = Namespace(ClusterRecords(runtime))
    with trio.move_on_after(ROOT_WAIT):
        while True:
            try:
                await namespace.ensure_root(Caller(os.getuid(), os.getgid()))
                break
            except FsError as exc:
                log.info("the cluster has no root directory yet: %s", exc.message)
                await trio.sleep(0.5)
    files = OpenFiles(Content(runtime), spool, settings.max_object_bytes)
    return KelipsOperations(namespace, files, runtime, readonly=chosen.readonly,
                            record_atime=chosen.record_atime,
                            background=background, kernel=kernel)


def prepare_spool(data_dir: Path) -> Path:
    """The mount's directory of local copies under ``data_dir``, emptied: leftovers of a
    crashed mount are garbage."""
    spool = data_dir / "spool"
    for stale in (spool, data_dir / "cache"):
        shutil.rmtree(stale, ignore_errors=True)
    spool.mkdir(mode=0o700, parents=True, exist_ok=True)
    return spool


async def _wait_mounted(mountpoint: Path, fuse_finished: trio.Event,
                        fuse_error: list[BaseException]) -> None:
    """Poll until the kernel shows the mount (bounded); MountError if libfuse gave up."""
    with trio.move_on_after(MOUNT_READY_TIMEOUT):
        while True:
            if fuse_finished.is_set():
                detail = f": {fuse_error[0]}" if fuse_error else " (see libfuse's message above)"
                raise MountError(f"FUSE could not mount {mountpoint}{detail}")
            if await _is_mount(mountpoint):
                return
            await trio.sleep(0.05)
    raise MountError(f"{mountpoint} did not appear as a mount within {MOUNT_READY_TIMEOUT:.0f} s")
