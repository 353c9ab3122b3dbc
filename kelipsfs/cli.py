"""The ``kelipsfs`` command: one entry point, one subcommand per job."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import trio

USAGE = """usage: kelipsfs COMMAND [ARGS]

commands:
  node       run a storage node in the foreground (kelipsfs node --help)
  mount      run a node and mount the cluster:  kelipsfs mount MOUNTPOINT [--join HOST:PORT]
  umount     unmount it (the node leaves):       kelipsfs umount MOUNTPOINT
  bootstrap  run the optional introducer service
  put        store a local file:        kelipsfs put LOCAL NAME
  get        fetch an object:           kelipsfs get NAME [LOCAL|-]
  ls         list objects:              kelipsfs ls [PREFIX]
  rm         delete an object:          kelipsfs rm NAME
  stat       show an object's tuple:    kelipsfs stat NAME
  status     the membership table:      kelipsfs status [--json]
  keygen     write a new cluster key:   kelipsfs keygen FILE
  config     print a commented configuration file with every default
  sim        simulate a cluster of N nodes (kelipsfs sim --help)
"""


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command == "sim":
        from daemon.sim.cli import main as sim_main
        return sim_main(rest)
    handler = COMMANDS.get(command)
    if handler is None:
        print(f"kelipsfs: unknown command {command!r}\n{USAGE}", file=sys.stderr)
        return 2
    return handler(rest)


# --- node and bootstrap ------------------------------------------------------------------------

def _node_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kelipsfs node", description="Run a kelipsfs storage node "
                                "in the foreground until SIGINT/SIGTERM, then leave cleanly.")
    _cluster_args(p)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any configuration key (see `kelipsfs config`)")
    return p


def _cluster_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML configuration file")
    p.add_argument("--data-dir", help="where objects and identity live")
    p.add_argument("--listen", help="HOST:PORT for UDP gossip and HTTP (default 127.0.0.1:7400)")
    p.add_argument("--join", action="append", default=[], metavar="HOST:PORT",
                   help="join through this live member (repeatable)")
    p.add_argument("--bootstrap", metavar="HOST:PORT", help="introducer service")
    p.add_argument("--cluster-key-file", help="file with the cluster's secret key")


def load_node_settings(ns: argparse.Namespace) -> Any:
    from daemon.settings import load_settings, parse_override
    overrides: dict[str, object] = {}
    for pair in getattr(ns, "set", []) or []:
        key, value = parse_override(pair)
        overrides[key] = value
    if ns.data_dir:
        overrides["data_dir"] = ns.data_dir
    if ns.listen:
        overrides["listen"] = ns.listen
    if ns.join:
        overrides["join"] = list(ns.join)
    if ns.bootstrap:
        overrides["bootstrap"] = ns.bootstrap
    if ns.cluster_key_file:
        overrides["cluster_key_file"] = ns.cluster_key_file
    return load_settings(Path(ns.config) if ns.config else None, overrides)


def settings_or_report(ns: argparse.Namespace, what: str) -> Any:
    """The node settings from flags and file, or None after printing why they are unusable."""
    from daemon.settings import SettingsError
    try:
        return load_node_settings(ns)
    except (SettingsError, OSError, ValueError) as exc:
        print(f"kelipsfs {what}: {exc}", file=sys.stderr)
        return None


def cmd_node(argv: list[str]) -> int:
    settings = settings_or_report(_node_parser().parse_args(argv), "node")
    if settings is None:
        return 2
    from daemon.logs import configure_logging
    configure_logging(settings.log_level, settings.log_format)
    try:
        trio.run(_run_node, settings)
    except Exception as exc:
        return _fail("node", exc)
    return 0


def _fail(what: str, exc: BaseException) -> int:
    from daemon.runtime import JoinFailed, JoinRefused
    from daemon.security import KeyFileError
    leaf = exc
    while isinstance(leaf, BaseExceptionGroup) and len(leaf.exceptions) == 1:
        leaf = leaf.exceptions[0]
    if isinstance(leaf, (JoinRefused, JoinFailed, OSError, KeyFileError, ValueError)):
        print(f"kelipsfs {what}: {leaf}", file=sys.stderr)
        return 1
    raise exc


async def _run_node(settings: Any) -> None:
    from daemon.runtime import NodeRuntime
    from kelipsfs.client import write_endpoint
    runtime = NodeRuntime(settings)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            async def stop_on_signal() -> None:
                async for _ in signals:
                    runtime.shutdown()
                    return

            nursery.start_soon(stop_on_signal)
            await nursery.start(runtime.run)
            write_endpoint(settings.data_dir, settings.listen, settings.core.cluster_id,
                           settings.cluster_key_file)
            print(f"kelipsfs node ready on {settings.listen[0]}:{settings.listen[1]}",
                  flush=True)
            await runtime.wait_stopped()
            nursery.cancel_scope.cancel()


def cmd_bootstrap(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="kelipsfs bootstrap",
                                description="Run the optional introducer service.")
    p.add_argument("--listen", required=True, help="HOST:PORT")
    p.add_argument("--cluster-key-file")
    p.add_argument("--cluster-id", default="kelipsfs")
    p.add_argument("--ttl", type=float, default=30.0,
                   help="forget a node that has not refreshed for this long (seconds)")
    from daemon.settings import LOG_FORMATS, LOG_LEVELS
    p.add_argument("--log-level", choices=LOG_LEVELS, default="info")
    p.add_argument("--log-format", choices=LOG_FORMATS, default="text",
                   help="text, or json: one object per line (like the node's log_format)")
    ns = p.parse_args(argv)
    from daemon.security import Authenticator, KeyFileError, load_key, open_cluster_key
    from daemon.settings import SettingsError, parse_address
    try:
        listen = parse_address(ns.listen, key="--listen")
        key = load_key(Path(ns.cluster_key_file)) if ns.cluster_key_file \
            else open_cluster_key(ns.cluster_id)
    except (SettingsError, KeyFileError) as exc:
        print(f"kelipsfs bootstrap: {exc}", file=sys.stderr)
        return 2
    from daemon.logs import configure_logging
    configure_logging(ns.log_level, ns.log_format)
    from bootstrap.service import Introducer, serve_bootstrap
    introducer = Introducer(Authenticator(key), ttl=ns.ttl)

    async def run() -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                await nursery.start(serve_bootstrap, introducer, listen)
                print(f"kelipsfs bootstrap ready on {listen[0]}:{listen[1]}", flush=True)
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    return

    try:
        trio.run(run)
    except Exception as exc:
        return _fail("bootstrap", exc)
    return 0


# --- client commands ---------------------------------------------------------------------------

def _client_parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"kelipsfs {prog}", description=description)
    p.add_argument("--node", help="HOST:PORT of a node (default: the local node)")
    p.add_argument("--cluster-key-file")
    p.add_argument("--cluster-id")
    p.add_argument("--data-dir", help="data dir of the local node (to find it)")
    return p


def _run_client(ns: argparse.Namespace, what: str, work: Any) -> int:
    from daemon.security import KeyFileError
    from daemon.settings import SettingsError
    from kelipsfs.client import Client, ClientError, resolve_target
    try:
        target = resolve_target(ns.node, ns.cluster_key_file, ns.cluster_id, ns.data_dir)
    except (SettingsError, KeyFileError) as exc:
        print(f"kelipsfs {what}: {exc}", file=sys.stderr)
        return 2

    async def run() -> int:
        client = Client(target)
        try:
            return int(await work(client))
        finally:
            await client.aclose()

    try:
        return trio.run(run)
    except ClientError as exc:
        print(f"kelipsfs {what}: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"kelipsfs {what}: {exc}", file=sys.stderr)
        return 1


def cmd_put(argv: list[str]) -> int:
    p = _client_parser("put", "Store a local file in the cluster under NAME "
                              "('-' = standard input).")
    p.add_argument("local")
    p.add_argument("name")
    ns = p.parse_args(argv)
    if ns.local == "-":
        return _put_stdin(ns)
    local = Path(ns.local)
    if not local.is_file():
        why = ("no such file" if not local.exists() else
               "a directory" if local.is_dir() else "not a regular file")
        print(f"kelipsfs put: {local}: {why}", file=sys.stderr)
        return 2
    return _put_file(ns, local)


def _put_file(ns: argparse.Namespace, local: Path) -> int:
    async def work(client: Any) -> int:
        doc = await client.put(local, ns.name, sys.stderr.isatty())
        t = doc["tuple"]
        print(f"stored {doc.get('path', t['name'])} ({t['size']} bytes) on "
              f"{len(t['holders'])} holder(s)")
        return 0

    return _run_client(ns, "put", work)


def _put_stdin(ns: argparse.Namespace) -> int:
    """``put - NAME``: standard input is read to its end into a temporary file ($TMPDIR)
    first, because an upload announces its size and is sent and hashed from a file; the
    temporary file is removed whatever happens."""
    import shutil
    import tempfile
    with tempfile.NamedTemporaryFile(prefix="kelipsfs-put-") as spool:
        try:
            shutil.copyfileobj(sys.stdin.buffer, spool, 1 << 20)
            spool.flush()
        except OSError as exc:
            print(f"kelipsfs put: could not read standard input into {spool.name}: {exc}",
                  file=sys.stderr)
            return 1
        return _put_file(ns, Path(spool.name))


def cmd_get(argv: list[str]) -> int:
    p = _client_parser("get", "Fetch NAME into LOCAL (default: its basename; '-' = stdout).")
    p.add_argument("name")
    p.add_argument("local", nargs="?")
    ns = p.parse_args(argv)
    dest = ns.local or ns.name.rstrip("/").rsplit("/", 1)[-1]

    async def work(client: Any) -> int:
        if dest == "-":
            await client.get(ns.name, sys.stdout.buffer, False)
            sys.stdout.flush()
            return 0
        tmp = Path(f"{dest}.kelipsfs-part")
        try:
            with open(tmp, "wb") as fh:
                await client.get(ns.name, fh, sys.stderr.isatty())
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        return 0

    return _run_client(ns, "get", work)


def cmd_ls(argv: list[str]) -> int:
    p = _client_parser("ls", "List objects whose name starts with PREFIX.")
    p.add_argument("prefix", nargs="?", default="")
    p.add_argument("-l", action="store_true", help="long listing: size, mtime, name")
    p.add_argument("--json", action="store_true")
    ns = p.parse_args(argv)

    async def work(client: Any) -> int:
        doc = await client.listing(ns.prefix)
        if ns.json:
            print(json.dumps(doc))
            return 0
        import time as _time
        for item in doc["objects"]:
            if ns.l:
                stamp = _time.strftime("%Y-%m-%d %H:%M", _time.localtime(item["mtime_ns"] / 1e9))
                print(f"{item['mode'] & 0o7777:04o} {item['size']:>12} {stamp} {item['name']}")
            else:
                print(item["name"])
        if doc.get("unreachable_groups"):
            print(f"kelipsfs ls: groups {doc['unreachable_groups']} did not answer; the "
                  "listing may be incomplete", file=sys.stderr)
            return 1
        return 0

    return _run_client(ns, "ls", work)


def cmd_rm(argv: list[str]) -> int:
    p = _client_parser("rm", "Delete NAME from the cluster.")
    p.add_argument("name")
    ns = p.parse_args(argv)

    async def work(client: Any) -> int:
        await client.remove(ns.name)
        return 0

    return _run_client(ns, "rm", work)


def cmd_stat(argv: list[str]) -> int:
    p = _client_parser("stat", "Show NAME's tuple: version, size, checksum, holders.")
    p.add_argument("name")
    ns = p.parse_args(argv)

    async def work(client: Any) -> int:
        print(json.dumps(await client.stat(ns.name), indent=2))
        return 0

    return _run_client(ns, "stat", work)


def cmd_status(argv: list[str]) -> int:
    p = _client_parser("status", "Show the membership as the node sees it (the node of "
                                 "MOUNTPOINT when given).")
    p.add_argument("mountpoint", nargs="?", help="a kelipsfs mount on this machine")
    p.add_argument("--json", action="store_true")
    ns = p.parse_args(argv)
    if ns.mountpoint:
        data_dir = _mount_data_dir(Path(ns.mountpoint))
        if data_dir is None:
            print(f"kelipsfs status: {ns.mountpoint} is not a kelipsfs mount of this machine",
                  file=sys.stderr)
            return 2
        ns.data_dir = str(data_dir)

    async def work(client: Any) -> int:
        doc = await client.status()
        print(json.dumps(doc) if ns.json else format_status(doc))
        return 0

    return _run_client(ns, "status", work)


def _mount_data_dir(mountpoint: Path) -> Path | None:
    """The data dir of the node serving ``mountpoint`` (from the mount's registry record)."""
    from kelipsfs.mount import registry_file
    try:
        doc = json.loads(registry_file(mountpoint.absolute()).read_text())
        return Path(doc["data_dir"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def format_status(doc: dict[str, Any]) -> str:
    lines = [f"node {doc['node_id'][:10]} at {doc['address']}  group {doc['group']} of "
             f"k={doc['k']}  cluster {doc['cluster_id']!r}  N~{doc['n_estimate']}  "
             f"tuples {doc['tuples']}",
             f"{'NODE':<11} {'ADDRESS':<21} {'GROUP':>5} {'ROLE':<8} {'STATE':<7} "
             f"{'HEARTBEAT':>9} {'LAST HEARD':>10} {'RTT':>9} {'OBJECTS':>7}"]
    for row in doc["members"]:
        rtt = "-" if row["rtt_ms"] is None else f"{row['rtt_ms']:.2f}ms"
        lines.append(f"{row['id'][:10]:<11} {row['address']:<21} {row['group']:>5} "
                     f"{row['role']:<8} {row['state']:<7} {row['heartbeat']:>9} "
                     f"{row['last_heard_s']:>9.1f}s {rtt:>9} {row['objects']:>7}")
    per_group = doc["contacts_per_group"]
    if per_group:
        lines.append(f"contacts per group (budget {doc['contact_budget']}): "
                     + ", ".join(f"{g}:{n}" for g, n in per_group.items()))
    return "\n".join(lines)


def cmd_keygen(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="kelipsfs keygen",
                                description="Write a new random cluster key (mode 0600).")
    p.add_argument("file")
    ns = p.parse_args(argv)
    from daemon.security import generate_key_file
    path = Path(ns.file)
    if path.exists():
        print(f"kelipsfs keygen: {path} exists; not overwriting a key", file=sys.stderr)
        return 1
    generate_key_file(path)
    print(f"wrote {path}")
    return 0


def cmd_config(argv: list[str]) -> int:
    from daemon.settings import example_yaml
    argparse.ArgumentParser(prog="kelipsfs config",
                            description="Print a configuration file with every key and its "
                                        "default.").parse_args(argv)
    print(example_yaml(), end="")
    return 0


def cmd_mount(argv: list[str]) -> int:
    from kelipsfs.mount_cli import cmd_mount as run
    return run(argv)


def cmd_umount(argv: list[str]) -> int:
    from kelipsfs.mount_cli import cmd_umount as run
    return run(argv)


COMMANDS = {"node": cmd_node, "bootstrap": cmd_bootstrap, "put": cmd_put, "get": cmd_get,
            "ls": cmd_ls, "rm": cmd_rm, "stat": cmd_stat, "status": cmd_status,
            "keygen": cmd_keygen, "config": cmd_config, "mount": cmd_mount,
            "umount": cmd_umount}


if __name__ == "__main__":
    raise SystemExit(main())
