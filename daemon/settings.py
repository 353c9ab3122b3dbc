"""The node's YAML configuration: one flat mapping of node keys and every CoreConfig field.

One flat file, because an operator should not have to know which layer a knob lives in; the
split into ``NodeSettings`` (this machine) and ``CoreConfig`` (the protocol, which must agree
across the cluster) happens here. Loading is strict: an unknown key, a wrong type or a bad value
stops the daemon with a message naming the key, because a typo that silently falls back to a
default (``fanuot: 4``) is the kind of misconfiguration nobody finds until it hurts.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import math
import os
import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from daemon.core.config import CoreConfig
from daemon.core.ids import ConfigError

Address = tuple[str, int]

DEFAULT_PORT = 7400
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
_MAX_SIZE = (1 << 63) - 1  # byte limits travel in int64 headers


class SettingsError(ValueError):
    """The configuration is unusable; the message names the offending key (or file and line)."""

    def __init__(self, message: str, key: str | None = None) -> None:
        self.key = key
        super().__init__(f"config key {key!r}: {message}" if key is not None else message)


def default_data_dir() -> Path:
    """Where a node keeps its state unless told: $KELIPSFS_DATA_DIR, then the XDG data home.

    Read at call time (not import time) so tests and service managers can set the environment.
    """
    explicit = os.environ.get("KELIPSFS_DATA_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME")
    if xdg and Path(xdg).is_absolute():  # the XDG spec says to ignore relative values
        return Path(xdg) / "kelipsfs"
    return Path.home() / ".local" / "share" / "kelipsfs"


# --- addresses ---------------------------------------------------------------------------------

_PORT_RE = re.compile(r"[0-9]{1,5}")


def parse_address(text: str, default_port: int = DEFAULT_PORT, *, key: str = "address") -> Address:
    """``HOST:PORT`` or ``HOST`` -> (ipv4, port); ``key`` names the setting in errors.

    Pure on purpose: no DNS at config time (a name that resolves differently later, or not at
    all at boot, is worse than a clear error). Hosts are IPv4 literals or ``localhost``; the
    gossip layer is IPv4-only, so IPv6 is refused here rather than failing at bind time.
    """
    if not isinstance(text, str):
        raise SettingsError(f"must be a string HOST:PORT, got {_describe(text)}", key)
    stripped = text.strip()
    if stripped.startswith("[") or stripped.count(":") > 1:
        raise SettingsError(f"IPv6 addresses are not supported, got {text!r}", key)
    host, sep, port_text = stripped.partition(":")
    if not sep:
        port = default_port
    elif not _PORT_RE.fullmatch(port_text):
        raise SettingsError(f"port must be a number from 1 to 65535, got {text!r}", key)
    else:
        port = int(port_text)
    if not 1 <= port <= 65535:
        raise SettingsError(f"port must be from 1 to 65535, got {text!r}", key)
    if host.lower() == "localhost":
        return ("127.0.0.1", port)
    try:
        return (str(ipaddress.IPv4Address(host)), port)
    except ValueError:
        raise SettingsError(
            f"host must be an IPv4 address or 'localhost', got {text!r}", key) from None


def format_address(address: Address) -> str:
    """The ``HOST:PORT`` text of an address (what parse_address reads back)."""
    return f"{address[0]}:{address[1]}"


def _check_address(key: str, value: object) -> Address:
    if (not isinstance(value, tuple) or len(value) != 2 or not isinstance(value[0], str)
            or isinstance(value[1], bool) or not isinstance(value[1], int)):
        raise SettingsError(f"must be an address (host, port), got {value!r}", key)
    return parse_address(format_address(value), key=key)


# --- the settings ------------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeSettings:
    """Everything one daemon needs: the cluster-wide protocol plus this machine's own knobs.

    Validated on construction, so settings built in code (tests, the CLI) get the same checks
    as those loaded from YAML.
    """

    core: CoreConfig = field(default_factory=CoreConfig)
    #: One port for both UDP gossip and the HTTP API (TCP), so a node is one address everywhere.
    listen: Address = ("127.0.0.1", DEFAULT_PORT)
    data_dir: Path = field(default_factory=default_data_dir)
    join: tuple[Address, ...] = ()
    bootstrap: Address | None = None
    #: None = an open cluster: datagrams are still MACed, with a key derived from cluster_id.
    cluster_key_file: Path | None = None
    #: 0 = every reachable one of the replication targets (at least 1); else 1..replication.
    write_quorum: int = 0
    http_timeout: float = 10.0
    max_request_bytes: int = 1 << 20
    max_object_bytes: int = 1 << 40
    #: Seconds a chunk no manifest names any more stays readable (``daemon.chunks``).
    chunk_retire_grace: float = 60.0
    bootstrap_refresh: float = 10.0
    auth_window: float = 30.0
    log_level: str = "info"
    #: text (for people) or json (one object per line, for log collectors): daemon.logs.
    log_format: str = "text"
    #: Tests and experiments only: every outgoing datagram waits this long (emulated latency;
    #: this kernel has no netem). 0 in production.
    send_delay: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.core, CoreConfig):
            raise SettingsError(f"must be a CoreConfig, got {self.core!r}", "core")
        if not isinstance(self.join, tuple):
            raise SettingsError(f"must be a tuple of addresses, got {self.join!r}", "join")
        # Normalised ("localhost" -> 127.0.0.1) so addresses compare equal to what peers report.
        object.__setattr__(self, "listen", _check_address("listen", self.listen))
        object.__setattr__(self, "join", tuple(_check_address("join", a) for a in self.join))
        if self.bootstrap is not None:
            object.__setattr__(self, "bootstrap", _check_address("bootstrap", self.bootstrap))
        if not isinstance(self.data_dir, Path):
            raise SettingsError(f"must be a Path, got {self.data_dir!r}", "data_dir")
        if self.cluster_key_file is not None and not isinstance(self.cluster_key_file, Path):
            raise SettingsError(
                f"must be a Path or None, got {self.cluster_key_file!r}", "cluster_key_file")
        replication = self.core.replication
        _check_int("write_quorum", self.write_quorum, 0, replication,
                   f"0 (all reachable) or at most replication ({replication})")
        _check_int("max_request_bytes", self.max_request_bytes, 1, _MAX_SIZE)
        _check_int("max_object_bytes", self.max_object_bytes, 1, _MAX_SIZE)
        for name in ("http_timeout", "bootstrap_refresh", "auth_window", "chunk_retire_grace"):
            _check_positive(name, getattr(self, name))
        if isinstance(self.send_delay, bool) or not isinstance(self.send_delay, (int, float)) \
                or not 0 <= self.send_delay <= 5:
            raise SettingsError(f"must be a number from 0 to 5, got {self.send_delay!r}",
                                "send_delay")
        if self.log_level not in LOG_LEVELS:
            raise SettingsError(
                f"must be one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}", "log_level")
        if self.log_format not in LOG_FORMATS:
            raise SettingsError(
                f"must be one of {', '.join(LOG_FORMATS)}, got {self.log_format!r}",
                "log_format")


def _check_int(key: str, value: object, low: int, high: int, bound: str | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SettingsError(f"must be an integer, got {_describe(value)}", key)
    if not low <= value <= high:
        limits = bound if bound is not None else f"from {low} to {high}"
        raise SettingsError(f"must be an integer {limits}, got {value}", key)


def _check_positive(key: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SettingsError(f"must be a number, got {_describe(value)}", key)
    if not math.isfinite(value) or value <= 0:
        raise SettingsError(f"must be a positive number, got {value!r}", key)


# --- key table and documentation ---------------------------------------------------------------

# Node keys and how a YAML value becomes the field's type; ranges are NodeSettings' business.
_NODE_KINDS: dict[str, str] = {
    "listen": "address",
    "data_dir": "data_dir",
    "join": "addresses",
    "bootstrap": "optional_address",
    "cluster_key_file": "optional_path",
    "write_quorum": "int",
    "http_timeout": "float",
    "max_request_bytes": "int",
    "max_object_bytes": "int",
    "chunk_retire_grace": "float",
    "bootstrap_refresh": "float",
    "auth_window": "float",
    "log_level": "choice",
    "log_format": "choice",
    "send_delay": "float",
}
_CORE_FIELDS = [f.name for f in dataclasses.fields(CoreConfig) if f.init]
_CORE_TYPES = typing.get_type_hints(CoreConfig)
_CORE_KINDS: dict[str, str] = {
    name: {int: "int", float: "float", str: "str"}[_CORE_TYPES[name]] for name in _CORE_FIELDS}
KEYS: tuple[str, ...] = (*_NODE_KINDS, *_CORE_FIELDS)

_DESCRIPTIONS: dict[str, str] = {
    "listen": "IPv4 HOST:PORT for both UDP gossip and the HTTP API (TCP)",
    "data_dir": "directory for this node's id, objects and tuples",
    "join": "list of HOST:PORT addresses of members to join through",
    "bootstrap": "HOST:PORT of a bootstrap server handing out live members, or null",
    "cluster_key_file": "file with the cluster's shared HMAC secret (`kelipsfs keygen`); "
                        "null = open cluster, key derived from cluster_id and NOT secret",
    "write_quorum": "copies stored before a write succeeds: 0 = every reachable one of the "
                    "replication targets (at least 1), else 1..replication (the write returns "
                    "once that many have it; the others finish in the background)",
    "http_timeout": "seconds allowed for every node-to-node HTTP call",
    "max_request_bytes": "largest control request body accepted, in bytes (not object bodies)",
    "max_object_bytes": "largest object accepted, in bytes",
    "chunk_retire_grace": "seconds a chunk of a large file that was replaced, cut or removed stays "
                          "readable (for readers of the older version on other mounts) before it "
                          "is reclaimed",
    "bootstrap_refresh": "seconds between refreshes of the bootstrap server's member list",
    "auth_window": "seconds of clock skew accepted on signed datagrams and requests "
                   "(nonces are remembered this long against replay)",
    "log_level": "debug, info, warning or error",
    "log_format": "text (for people) or json (one object per line: ts, level, logger, msg, "
                  "node and the event's fields)",
    "send_delay": "tests only: seconds every outgoing datagram is held back (emulated latency; "
                  "0..5)",
    "k": "number of affinity groups, about sqrt(expected nodes); must agree cluster-wide",
    "cluster_id": "cluster name; other clusters' nodes and datagrams are refused; must agree",
    "heartbeat_interval": "seconds between bumps of this node's heartbeat counter",
    "gossip_interval": "seconds between gossip rounds",
    "fanout": "own-group targets per gossip round (1..16)",
    "t_fail": "seconds without a rising heartbeat before a member is failed",
    "t_cleanup": "seconds after which a failed member is forgotten",
    "contacts_per_group": "most contacts kept per foreign group (1..16); fewer in some while "
                          "the own group is above average",
    "replication": "copies of every object (1..16)",
    "max_datagram": "largest gossip datagram in bytes, MAC included (512..65507)",
    "tuple_share": "share of a gossip message's entries given to file tuples (0..1)",
    "foreign_share": "share of a gossip message's entries given to foreign contacts (0..1)",
    "rtt_exponent": "spatial gossip: target weight falls as (rtt_floor / rtt) ** this (0..4)",
    "rtt_floor": "spatial gossip: RTTs below this many seconds count as this",
    "uniform_share": "spatial gossip: share of targets drawn uniformly (0..1)",
    "probe_timeout": "seconds (at least; 4 x RTT if longer) before an unanswered probe misses",
    "probe_misses": "consecutive missed probes before a contact is replaced",
    "explore_probability": "chance per round of probing a new foreign node for a closer contact",
    "rtt_refresh_probability": "chance that a gossip message asks for an ack to refresh the RTT",
    "anti_entropy_interval": "seconds between full state exchanges with one group member",
    "tombstone_ttl": "seconds tombstones of deleted objects are kept",
    "graveyard_ttl": "seconds removed members are remembered so stale gossip cannot revive them",
}

_DEFAULT_TEXT: dict[str, str] = {
    "data_dir": "null = $KELIPSFS_DATA_DIR, else $XDG_DATA_HOME/kelipsfs, "
                "else ~/.local/share/kelipsfs",
    "max_request_bytes": "1048576 = 1 MiB",
    "max_object_bytes": "1099511627776 = 1 TiB",
    "t_cleanup": "0 = 2 * t_fail",
    "graveyard_ttl": "0 = t_cleanup",
}


def _init_default(cls: type[object], name: str) -> object:
    """A field's declared default (not a derived value: t_cleanup stays 0 = "derive it")."""
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
    raise KeyError(name)


def _yaml_value(key: str) -> object:
    """A key's default as it is written in YAML."""
    if key == "data_dir":
        return None  # null = the environment-dependent default; a path here would pin it
    value = _init_default(NodeSettings if key in _NODE_KINDS else CoreConfig, key)
    if isinstance(value, tuple) and key in ("listen", "bootstrap"):
        return format_address(typing.cast(Address, value))
    if isinstance(value, tuple):
        return [format_address(a) for a in value]
    return value


def _yaml_scalar(value: object) -> str:
    """One YAML value as the YAML dumper writes it (so floats like 1e-05 stay floats)."""
    return yaml.safe_dump(value, default_flow_style=True, width=1 << 16).split("\n", 1)[0]


#: Every key -> one line: what it does and its default. The README is checked against this.
DEFAULTS_DOC: dict[str, str] = {
    key: f"{_DESCRIPTIONS[key]} (default: "
         f"{_DEFAULT_TEXT.get(key) or _yaml_scalar(_yaml_value(key))})"
    for key in KEYS
}


def example_yaml() -> str:
    """A commented configuration file with every key at its default; loads unchanged."""
    lines = [
        "# kelipsfs node configuration: one flat mapping; every key is optional.",
        "# Every key is shown at its default. Relative paths are relative to this file.",
        "",
        "# --- this node ---",
    ]
    for key in KEYS:
        if key == _CORE_FIELDS[0]:
            lines += ["", "# --- protocol (k and cluster_id must agree across the cluster) ---"]
        lines += [f"# {DEFAULTS_DOC[key]}", f"{key}: {_yaml_scalar(_yaml_value(key))}"]
    return "\n".join(lines) + "\n"


# --- loading -----------------------------------------------------------------------------------


def load_settings(path: Path | None, overrides: Mapping[str, object] | None = None) -> NodeSettings:
    """Read the YAML file at ``path`` (None = no file), apply ``overrides``, validate everything.

    Overrides (command-line flags) win over the file and are applied literally: the CLI passes
    only flags that were given, and a None override means null. Relative paths in the file are
    relative to the file's directory (a service's working directory is rarely the config's);
    relative paths in overrides stay relative to the working directory.
    """
    raw: dict[object, tuple[object, Path | None]] = {}
    if path is not None:
        for key, value in _read_yaml(path).items():
            raw[key] = (value, path.parent)
    for key, value in (overrides or {}).items():
        raw[key] = (value, None)
    node: dict[str, object] = {}
    core: dict[str, object] = {}
    for key, (value, base) in raw.items():
        if not isinstance(key, str):
            raise SettingsError(f"keys must be strings, got {key!r}", str(key))
        if key in _NODE_KINDS:
            node[key] = _convert(key, _NODE_KINDS[key], value, base)
        elif key in _CORE_KINDS:
            core[key] = _convert(key, _CORE_KINDS[key], value, base)
        else:
            close = difflib.get_close_matches(key, KEYS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise SettingsError(f"unknown key{hint}", key)
    try:
        config = CoreConfig(**core)  # type: ignore[arg-type]
    except ConfigError as exc:
        raise _from_config_error(exc, core) from None
    return NodeSettings(core=config, **node)  # type: ignore[arg-type]


def parse_override(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` from a ``--set`` flag, VALUE read as YAML (``fanout=3`` gives the int 3)."""
    key, sep, value_text = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise SettingsError(f"--set wants KEY=VALUE, got {text!r}")
    try:
        return key, yaml.safe_load(value_text)
    except yaml.YAMLError as exc:
        raise SettingsError(f"value is not valid YAML: {exc}", key) from None


def _read_yaml(path: Path) -> dict[object, object]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SettingsError(f"config file {path}: cannot read: {exc.strerror or exc}") from None
    try:
        document = yaml.load(data, Loader=_StrictLoader)  # a SafeLoader subclass
    except _DuplicateKey as exc:
        raise SettingsError(f"duplicate key in config file {path} line {exc.line} "
                            f"(first on line {exc.first})", exc.key) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" line {mark.line + 1}" if mark is not None else ""
        what = ", ".join(part for part in (exc.context, exc.problem) if part)
        raise SettingsError(f"config file {path}{where}: {what}") from None
    except yaml.YAMLError as exc:
        raise SettingsError(f"config file {path}: {exc}") from None
    if document is None:
        return {}
    if not isinstance(document, dict):
        raise SettingsError(
            f"config file {path}: must be a mapping of keys to values, "
            f"got {_describe(document)}")
    return document


class _DuplicateKey(Exception):
    def __init__(self, key: str, line: int, first: int) -> None:
        super().__init__(key)
        self.key, self.line, self.first = key, line, first


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (PyYAML silently keeps the last one)."""


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[object, object]:
    loader.flatten_mapping(node)
    seen: dict[str, int] = {}
    for key_node, _ in node.value:
        if isinstance(key_node, yaml.ScalarNode):
            line = key_node.start_mark.line + 1
            if key_node.value in seen:
                raise _DuplicateKey(key_node.value, line, seen[key_node.value])
            seen[key_node.value] = line
    return loader.construct_mapping(node, deep=True)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _convert(key: str, kind: str, value: object, base: Path | None) -> object:
    """A YAML (or override) value -> the field's Python type; type errors name the key."""
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise SettingsError(f"must be an integer, got {_describe(value)}{_hint(value)}", key)
        return value
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SettingsError(f"must be a number, got {_describe(value)}{_hint(value)}", key)
        if not math.isfinite(value):
            raise SettingsError(f"must be a finite number, got {value!r}", key)
        return float(value)
    if kind == "str":
        if not isinstance(value, str):
            raise SettingsError(f"must be a string, got {_describe(value)}", key)
        return value
    if kind == "choice":  # a keyword, checked by NodeSettings
        if not isinstance(value, str):
            raise SettingsError(f"must be a string, got {_describe(value)}", key)
        return value.strip().lower()
    if kind in ("address", "optional_address"):
        if value is None and kind == "optional_address":
            return None
        return _to_address(key, value)
    if kind == "addresses":
        if not isinstance(value, (list, tuple)):
            raise SettingsError(f"must be a list of HOST:PORT, got {_describe(value)}", key)
        return tuple(_to_address(key, entry) for entry in value)
    if kind in ("data_dir", "optional_path"):
        if value is None:
            return default_data_dir() if kind == "data_dir" else None
        return _to_path(key, value, base)
    raise AssertionError(f"unknown kind {kind!r}")  # pragma: no cover


def _to_address(key: str, value: object) -> Address:
    if isinstance(value, tuple):
        return _check_address(key, value)
    if not isinstance(value, str):
        raise SettingsError(f"must be a string HOST:PORT, got {_describe(value)}", key)
    return parse_address(value, key=key)


def _to_path(key: str, value: object, base: Path | None) -> Path:
    if not isinstance(value, (str, Path)) or not str(value).strip():
        raise SettingsError(f"must be a path, got {_describe(value)}", key)
    result = Path(value).expanduser()
    if base is not None and not result.is_absolute():
        result = base / result
    return result


def _from_config_error(exc: ConfigError, core: Mapping[str, object]) -> SettingsError:
    """CoreConfig says "fanout must be ..."; find the key it names and say it our way."""
    message = str(exc)
    first = message.split(" ", 1)[0]
    if first in _CORE_KINDS:
        rest = message[len(first) + 1:]
        return SettingsError(rest if rest.startswith("must ") else message, first)
    named = [name for name in _CORE_FIELDS if re.search(rf"\b{name}\b", message)]
    given = [name for name in named if name in core]
    key = (given or named or list(core) or ["k"])[0]
    return SettingsError(message, key)


def _hint(value: object) -> str:
    """Why a number came out as text: quotes, or PyYAML's YAML 1.1 reading of ``1e3``."""
    if isinstance(value, str):
        try:
            float(value)
        except ValueError:
            return ""
        return " (YAML read it as text: drop any quotes; write exponents as 1.0e+3)"
    return ""


def _describe(value: object) -> str:
    """A value as the YAML author wrote it: 'a string ('3')', 'a boolean (true)', 'null'."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, str):
        return f"a string ({value!r})"
    if isinstance(value, (int, float)):
        return f"a number ({value!r})"
    if isinstance(value, (list, tuple)):
        return f"a list ({value!r})"
    if isinstance(value, dict):
        return "a mapping"
    return f"{type(value).__name__} ({value!r})"
