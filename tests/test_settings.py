"""The YAML configuration: defaults, precedence, strict errors naming the key, the example file."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import yaml

from daemon.core.config import CoreConfig
from daemon.settings import (
    DEFAULTS_DOC,
    KEYS,
    NodeSettings,
    SettingsError,
    default_data_dir,
    example_yaml,
    format_address,
    load_settings,
    parse_address,
    parse_override,
)

NODE_KEYS = {f.name for f in dataclasses.fields(NodeSettings)} - {"core"}
CORE_KEYS = {f.name for f in dataclasses.fields(CoreConfig) if f.init}


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("KELIPSFS_DATA_DIR", raising=False)
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def _write(tmp_path: Path, text: str, name: str = "node.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _error(path: Path | None, overrides: dict[str, object] | None = None) -> SettingsError:
    with pytest.raises(SettingsError) as info:
        load_settings(path, overrides)
    return info.value


# --- defaults ----------------------------------------------------------------------------------


def test_no_file_gives_defaults(tmp_path: Path) -> None:
    settings = load_settings(None)
    assert settings == NodeSettings()
    assert settings.core == CoreConfig()
    assert settings.listen == ("127.0.0.1", 7400)
    assert settings.data_dir == tmp_path / "home" / ".local" / "share" / "kelipsfs"
    assert settings.join == () and settings.bootstrap is None
    assert settings.cluster_key_file is None
    assert settings.write_quorum == 0
    assert settings.http_timeout == 10.0
    assert settings.max_request_bytes == 1 << 20 and settings.max_object_bytes == 1 << 40
    assert settings.bootstrap_refresh == 10.0 and settings.auth_window == 30.0
    assert settings.log_level == "info"


@pytest.mark.parametrize("text", ["", "\n", "# only a comment\n", "---\n"])
def test_empty_file_gives_defaults(tmp_path: Path, text: str) -> None:
    assert load_settings(_write(tmp_path, text)) == NodeSettings()


def test_data_dir_default_follows_environment(monkeypatch: pytest.MonkeyPatch,
                                              tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert default_data_dir() == tmp_path / "xdg" / "kelipsfs"
    monkeypatch.setenv("XDG_DATA_HOME", "relative/ignored")
    assert default_data_dir() == tmp_path / "home" / ".local" / "share" / "kelipsfs"
    monkeypatch.setenv("KELIPSFS_DATA_DIR", str(tmp_path / "explicit"))
    assert default_data_dir() == tmp_path / "explicit"
    assert load_settings(None).data_dir == tmp_path / "explicit"
    assert load_settings(None, {"data_dir": None}).data_dir == tmp_path / "explicit"


# --- file, overrides, conversion -------------------------------------------------------------


def test_file_sets_node_and_core_keys(tmp_path: Path) -> None:
    path = _write(tmp_path, """
listen: 10.0.0.5:7500
data_dir: /var/lib/kelipsfs
join: [10.0.0.6:7400, 10.0.0.7, localhost:9000]
bootstrap: 10.0.0.1:7000
cluster_key_file: keys/cluster.key
write_quorum: 2
http_timeout: 3
max_request_bytes: 4096
max_object_bytes: 1000000
bootstrap_refresh: 2.5
auth_window: 60
log_level: DEBUG
k: 32
cluster_id: prod
fanout: 3
t_fail: 6
replication: 4
""")
    settings = load_settings(path)
    assert settings.listen == ("10.0.0.5", 7500)
    assert settings.data_dir == Path("/var/lib/kelipsfs")
    assert settings.join == (("10.0.0.6", 7400), ("10.0.0.7", 7400), ("127.0.0.1", 9000))
    assert settings.bootstrap == ("10.0.0.1", 7000)
    assert settings.cluster_key_file == tmp_path / "keys" / "cluster.key"  # relative to the file
    assert settings.write_quorum == 2
    assert settings.http_timeout == 3.0 and isinstance(settings.http_timeout, float)
    assert settings.max_request_bytes == 4096 and settings.max_object_bytes == 1000000
    assert settings.bootstrap_refresh == 2.5 and settings.auth_window == 60.0
    assert settings.log_level == "debug"
    assert settings.core == CoreConfig(k=32, cluster_id="prod", fanout=3, t_fail=6.0,
                                       replication=4)
    assert settings.core.t_cleanup == 12.0  # derived default still derived
    assert isinstance(settings.core.t_fail, float)


def test_overrides_win_over_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "fanout: 3\nlisten: 10.0.0.5:7500\nlog_level: warning\nk: 4\n")
    settings = load_settings(path, {"fanout": 5, "listen": "127.0.0.1:7600",
                                    "data_dir": "rel/dir"})
    assert settings.core.fanout == 5
    assert settings.core.k == 4  # untouched file key kept
    assert settings.listen == ("127.0.0.1", 7600)
    assert settings.log_level == "warning"
    assert settings.data_dir == Path("rel/dir")  # overrides stay relative to the working dir


def test_overrides_without_file_and_typed_values(tmp_path: Path) -> None:
    settings = load_settings(None, {"listen": ("127.0.0.1", 7401), "data_dir": tmp_path,
                                    "join": [("10.0.0.1", 1), "10.0.0.2:2"],
                                    "cluster_key_file": "~/k"})
    assert settings.listen == ("127.0.0.1", 7401)
    assert settings.data_dir == tmp_path
    assert settings.join == (("10.0.0.1", 1), ("10.0.0.2", 2))
    assert settings.cluster_key_file == tmp_path / "home" / "k"


def test_null_override_clears_bootstrap(tmp_path: Path) -> None:
    path = _write(tmp_path, "bootstrap: 10.0.0.1:7000\n")
    assert load_settings(path).bootstrap == ("10.0.0.1", 7000)
    assert load_settings(path, {"bootstrap": None}).bootstrap is None


def test_derived_core_defaults_follow_overridden_t_fail(tmp_path: Path) -> None:
    settings = load_settings(_write(tmp_path, "t_fail: 3\n"), {"t_cleanup": 9})
    assert settings.core.t_cleanup == 9.0 and settings.core.graveyard_ttl == 9.0


def test_parse_override() -> None:
    assert parse_override("fanout=3") == ("fanout", 3)
    assert parse_override("t_fail=2.5") == ("t_fail", 2.5)
    assert parse_override(" cluster_id = prod") == ("cluster_id", "prod")
    assert parse_override("listen=10.0.0.1:7400") == ("listen", "10.0.0.1:7400")
    assert parse_override("bootstrap=") == ("bootstrap", None)
    assert parse_override("join=[10.0.0.1, 10.0.0.2]") == ("join", ["10.0.0.1", "10.0.0.2"])
    with pytest.raises(SettingsError, match="KEY=VALUE"):
        parse_override("fanout")
    with pytest.raises(SettingsError, match="'join'"):
        parse_override("join=[unclosed")


# --- errors name the key -----------------------------------------------------------------------


@pytest.mark.parametrize(("key", "value", "words"), [
    ("fanout", "'3'", "integer"),
    ("fanout", "0", "from 1 to 16"),
    ("fanout", "2.0", "integer"),
    ("k", "true", "integer"),
    ("k", "0", "between 1 and"),
    ("cluster_id", "7", "string"),
    ("cluster_id", "''", "1 to 255"),
    ("t_fail", "abc", "number"),
    ("t_fail", "0.5", "longer than heartbeat_interval"),
    ("t_fail", ".inf", "finite"),
    ("heartbeat_interval", "-1", "positive"),
    ("tuple_share", "2", "between 0 and 1"),
    ("tuple_share", "0.85", "foreign_share"),
    ("max_datagram", "100", "512"),
    ("t_cleanup", "1", "at least t_fail"),
    ("listen", "7400", "string"),
    ("listen", "example.com:7400", "IPv4"),
    ("listen", "10.0.0.1:0", "port"),
    ("listen", "'[::1]:7400'", "IPv6"),
    ("listen", "null", "HOST:PORT"),
    ("join", "10.0.0.1:7400", "list"),
    ("join", "[10.0.0.1:99999]", "port"),
    ("join", "[[10.0.0.1, 7400]]", "HOST:PORT"),
    ("bootstrap", "10.0.0.1:x", "port"),
    ("data_dir", "5", "path"),
    ("data_dir", "''", "path"),
    ("cluster_key_file", "[a]", "path"),
    ("write_quorum", "-1", "at most replication"),
    ("write_quorum", "4", "at most replication (3)"),
    ("write_quorum", "yes", "integer"),
    ("http_timeout", "0", "positive"),
    ("http_timeout", "'10'", "number"),
    ("max_request_bytes", "0", "from 1"),
    ("max_object_bytes", "1.5", "integer"),
    ("bootstrap_refresh", "-3", "positive"),
    ("auth_window", ".nan", "finite"),
    ("log_level", "verbose", "debug, info, warning, error"),
    ("log_level", "3", "string"),
])
def test_bad_values_name_the_key(tmp_path: Path, key: str, value: str, words: str) -> None:
    error = _error(_write(tmp_path, f"{key}: {value}\n"))
    assert error.key == key
    assert str(error).startswith(f"config key {key!r}: ")
    assert words in str(error)


def test_error_message_format(tmp_path: Path) -> None:
    error = _error(_write(tmp_path, "fanout: 0\n"))
    assert str(error) == "config key 'fanout': must be an integer from 1 to 16, got 0"


def test_numbers_read_as_text_get_a_hint(tmp_path: Path) -> None:
    assert "drop any quotes" in str(_error(_write(tmp_path, "fanout: '3'\n")))
    assert "1.0e+3" in str(_error(_write(tmp_path, "http_timeout: 1e3\n")))
    assert load_settings(_write(tmp_path, "http_timeout: 1.0e+3\n")).http_timeout == 1000.0
    assert "YAML read it" not in str(_error(_write(tmp_path, "fanout: abc\n")))


def test_override_errors_name_the_key() -> None:
    assert _error(None, {"fanout": "3"}).key == "fanout"
    assert _error(None, {"listen": ("10.0.0.1", "7400")}).key == "listen"
    assert _error(None, {"nope": 1}).key == "nope"


def test_write_quorum_against_replication(tmp_path: Path) -> None:
    assert load_settings(_write(tmp_path, "replication: 5\nwrite_quorum: 5\n")).write_quorum == 5
    error = _error(_write(tmp_path, "replication: 2\nwrite_quorum: 3\n"))
    assert error.key == "write_quorum" and "replication (2)" in str(error)
    assert load_settings(None, {"replication": 1, "write_quorum": 1}).write_quorum == 1
    assert load_settings(None, {"replication": 1, "write_quorum": 0}).write_quorum == 0


def test_unknown_key_suggests_the_close_one(tmp_path: Path) -> None:
    error = _error(_write(tmp_path, "fanuot: 4\n"))
    assert error.key == "fanuot" and "did you mean 'fanout'" in str(error)
    error = _error(_write(tmp_path, "zzz: 4\n"))
    assert str(error) == "config key 'zzz': unknown key"


def test_non_string_key(tmp_path: Path) -> None:
    assert _error(_write(tmp_path, "1: 4\n")).key == "1"


def test_nested_mapping_is_a_type_error(tmp_path: Path) -> None:
    error = _error(_write(tmp_path, "core:\n  fanout: 3\n"))
    assert error.key == "core" and "unknown key" in str(error)
    error = _error(_write(tmp_path, "fanout:\n  value: 3\n"))
    assert error.key == "fanout" and "mapping" in str(error)


def test_duplicate_key_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path, "fanout: 2\nk: 3\nfanout: 4\n")
    error = _error(path)
    assert error.key == "fanout" and str(path) in str(error)
    assert "line 3" in str(error) and "line 1" in str(error)


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_non_mapping_document(tmp_path: Path, text: str) -> None:
    path = _write(tmp_path, text)
    error = _error(path)
    assert str(path) in str(error) and "mapping" in str(error)


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "fanout: 2\nk: 3\nlisten: [unclosed\nlog_level: info\n")
    error = _error(path)
    assert str(path) in str(error) and "line" in str(error)
    path = _write(tmp_path, "fanout: 2\n  bad: indent\n", "b.yaml")
    assert "line 2" in str(_error(path))


def test_multiple_documents_refused(tmp_path: Path) -> None:
    path = _write(tmp_path, "fanout: 2\n---\nk: 3\n")
    assert str(path) in str(_error(path))


def test_unreadable_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    error = _error(missing)
    assert str(missing) in str(error) and "cannot read" in str(error)
    assert "cannot read" in str(_error(tmp_path))  # a directory
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00\x81garbage\x00")
    assert str(binary) in str(_error(binary))
    if os.geteuid() != 0:  # root reads anything
        locked = _write(tmp_path, "k: 1\n", "locked.yaml")
        locked.chmod(0)
        assert "cannot read" in str(_error(locked))


# --- NodeSettings built in code ----------------------------------------------------------------


def test_node_settings_validates_on_construction() -> None:
    with pytest.raises(SettingsError, match="'listen'"):
        NodeSettings(listen=("10.0.0.1", 0))
    with pytest.raises(SettingsError, match="'write_quorum'"):
        NodeSettings(write_quorum=4)
    with pytest.raises(SettingsError, match="'log_level'"):
        NodeSettings(log_level="INFO")
    with pytest.raises(SettingsError, match="'data_dir'"):
        NodeSettings(data_dir="/tmp")  # type: ignore[arg-type]
    with pytest.raises(SettingsError, match="'join'"):
        NodeSettings(join=["10.0.0.1:1"])  # type: ignore[arg-type]
    with pytest.raises(SettingsError, match="'core'"):
        NodeSettings(core=None)  # type: ignore[arg-type]


def test_node_settings_normalises_addresses() -> None:
    settings = NodeSettings(listen=("localhost", 1), join=(("LOCALHOST", 2),),
                            bootstrap=("localhost", 3))
    assert settings.listen == ("127.0.0.1", 1)
    assert settings.join == (("127.0.0.1", 2),)
    assert settings.bootstrap == ("127.0.0.1", 3)


# --- addresses ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("10.1.2.3:7500", ("10.1.2.3", 7500)),
    ("10.1.2.3", ("10.1.2.3", 7400)),
    ("0.0.0.0:1", ("0.0.0.0", 1)),
    ("255.255.255.255:65535", ("255.255.255.255", 65535)),
    ("localhost", ("127.0.0.1", 7400)),
    ("LocalHost:80", ("127.0.0.1", 80)),
    (" 10.0.0.1:9 ", ("10.0.0.1", 9)),
])
def test_parse_address_accepts(text: str, expected: tuple[str, int]) -> None:
    assert parse_address(text) == expected
    assert parse_address(format_address(expected)) == expected


def test_parse_address_default_port() -> None:
    assert parse_address("10.0.0.1", default_port=9000) == ("10.0.0.1", 9000)
    with pytest.raises(SettingsError, match="port"):
        parse_address("10.0.0.1", default_port=0)


@pytest.mark.parametrize(("text", "words"), [
    ("", "IPv4"),
    (":7400", "IPv4"),
    ("10.0.0.1:", "port"),
    ("10.0.0.1:0", "port"),
    ("10.0.0.1:65536", "port"),
    ("10.0.0.1:123456", "port"),
    ("10.0.0.1:-1", "port"),
    ("10.0.0.1:+80", "port"),
    ("10.0.0.1:８０", "port"),
    ("10.0.0.1:http", "port"),
    ("256.0.0.1", "IPv4"),
    ("10.0.0", "IPv4"),
    ("010.0.0.1", "IPv4"),
    ("example.com:7400", "IPv4"),
    ("[::1]:7400", "IPv6"),
    ("::1", "IPv6"),
    ("fe80::1", "IPv6"),
])
def test_parse_address_rejects(text: str, words: str) -> None:
    with pytest.raises(SettingsError) as info:
        parse_address(text, key="listen")
    assert info.value.key == "listen"
    assert words in str(info.value)


def test_parse_address_rejects_non_string() -> None:
    with pytest.raises(SettingsError, match="string"):
        parse_address(7400)  # type: ignore[arg-type]


# --- documentation and the example file --------------------------------------------------------


def test_every_key_is_documented() -> None:
    assert set(KEYS) == NODE_KEYS | CORE_KEYS
    assert len(KEYS) == len(set(KEYS))
    assert set(DEFAULTS_DOC) == set(KEYS)
    for key, line in DEFAULTS_DOC.items():
        assert "\n" not in line and "(default: " in line, key


def test_documented_defaults_match_the_dataclasses() -> None:
    assert DEFAULTS_DOC["fanout"].endswith("(default: 2)")
    assert DEFAULTS_DOC["listen"].endswith("(default: 127.0.0.1:7400)")
    assert DEFAULTS_DOC["cluster_id"].endswith("(default: kelipsfs)")
    assert DEFAULTS_DOC["t_cleanup"].endswith("(default: 0 = 2 * t_fail)")
    assert "KELIPSFS_DATA_DIR" in DEFAULTS_DOC["data_dir"]


def test_example_yaml_loads_to_the_defaults(tmp_path: Path) -> None:
    text = example_yaml()
    assert load_settings(_write(tmp_path, text)) == NodeSettings()
    document = yaml.safe_load(text)
    assert list(document) == list(KEYS)
    for key in KEYS:
        assert f"# {DEFAULTS_DOC[key]}\n{key}: " in text


def test_example_yaml_respects_data_dir_environment(monkeypatch: pytest.MonkeyPatch,
                                                    tmp_path: Path) -> None:
    monkeypatch.setenv("KELIPSFS_DATA_DIR", str(tmp_path / "d"))
    assert load_settings(_write(tmp_path, example_yaml())).data_dir == tmp_path / "d"


def test_example_yaml_with_one_change(tmp_path: Path) -> None:
    text = example_yaml().replace("\nfanout: 2\n", "\nfanout: 5\n")
    assert load_settings(_write(tmp_path, text)).core.fanout == 5
