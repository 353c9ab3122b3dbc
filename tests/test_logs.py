"""Structured logs (daemon.logs): the text and JSON formats, levels, the node id, the
log_format setting, and a real node writing JSON lines with its membership events."""

from __future__ import annotations

import contextvars
import io
import json
import logging
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon import logs
from daemon.logs import configure_logging, fields, set_node
from daemon.settings import NodeSettings, SettingsError, load_settings
from tests.cluster import Cluster, NodeProc

TS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
log = logging.getLogger("kelipsfs.test")


@pytest.fixture(autouse=True)
def _restore_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """configure_logging changes the root logger: put it back, and keep node ids set here
    out of the process-wide set other tests may rely on."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    monkeypatch.setattr(logs, "_process_nodes", set())
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(False)


def _configure(level: str = "debug", log_format: str = "json") -> io.StringIO:
    stream = io.StringIO()
    configure_logging(level, log_format, stream)
    return stream


def _lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


# --- formats -----------------------------------------------------------------------------------

def test_json_lines_carry_the_fields() -> None:
    stream = _configure()
    log.info("member %s", "failed", extra=fields(member="3fa2c91b0e", address="10.0.0.7:7400",
                                                 group=2, when=Path("/x")))
    [doc] = _lines(stream)
    assert TS.fullmatch(doc.pop("ts"))
    assert doc == {"level": "info", "logger": "kelipsfs.test", "msg": "member failed",
                   "member": "3fa2c91b0e", "address": "10.0.0.7:7400", "group": 2,
                   "when": "/x"}  # not JSON-native: its str()


def test_json_keeps_one_line_and_the_exception_as_a_string() -> None:
    stream = _configure()
    try:
        raise ValueError("bad\nthing")
    except ValueError:
        log.exception("it broke\non two lines", extra=fields(msg="a field named msg"))
    [line] = stream.getvalue().splitlines()
    doc = json.loads(line)
    assert doc["level"] == "error"
    assert doc["msg"] == "it broke\non two lines"
    assert doc["msg_"] == "a field named msg"  # fields never overwrite the fixed keys
    assert doc["exc"].startswith("Traceback") and "ValueError: bad\nthing" in doc["exc"]


def test_text_format_appends_key_value_fields() -> None:
    stream = _configure(log_format="text")
    log.warning("dropped a datagram", extra=fields(reason="auth", peer="127.0.0.1:9",
                                                   note="two words", empty=""))
    line = stream.getvalue().rstrip("\n")
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} WARNING kelipsfs.test: dropped a "
                        r'datagram reason=auth peer=127.0.0.1:9 note="two words" empty=""', line)


def test_node_id_comes_from_the_context_or_the_only_node() -> None:
    stream = _configure()
    log.info("before")

    def as_node(node_id: bytes) -> None:
        set_node(node_id)
        log.info("inside")

    contextvars.copy_context().run(as_node, bytes.fromhex("ab" * 20))
    log.info("elsewhere, one node in the process")
    contextvars.copy_context().run(as_node, bytes.fromhex("cd" * 20))
    log.info("elsewhere, two nodes: none")
    assert [d.get("node") for d in _lines(stream)] == [
        None, "ababababab", "ababababab", "cdcdcdcdcd", None]


def test_level_filtering() -> None:
    stream = _configure(level="warning")
    log.debug("no")
    log.info("no")
    log.warning("yes")
    log.error("yes too")
    assert [(d["level"], d["msg"]) for d in _lines(stream)] == [
        ("warning", "yes"), ("error", "yes too")]
    stream = _configure(level="debug")  # replaces the first handler: no line twice
    log.debug("now")
    assert [d["msg"] for d in _lines(stream)] == ["now"]


def test_warnings_become_log_lines() -> None:
    import warnings
    stream = _configure()
    warnings.warn("careful", UserWarning, stacklevel=1)
    [doc] = _lines(stream)
    assert doc["logger"] == "py.warnings" and "careful" in doc["msg"]


def test_configure_refuses_unknown_values() -> None:
    with pytest.raises(ValueError, match="format"):
        configure_logging("info", "xml", io.StringIO())
    with pytest.raises(ValueError, match="level"):
        configure_logging("loud", "text", io.StringIO())


# --- the setting -------------------------------------------------------------------------------

def test_log_format_setting() -> None:
    assert NodeSettings().log_format == "text"
    assert load_settings(None, {"log_format": " JSON "}).log_format == "json"
    with pytest.raises(SettingsError, match=r"'log_format'.*text, json.*'xml'"):
        load_settings(None, {"log_format": "xml"})
    with pytest.raises(SettingsError, match="'log_format': must be a string"):
        load_settings(None, {"log_format": 1})
    with pytest.raises(SettingsError, match="'log_format'"):
        NodeSettings(log_format="yaml")


def test_node_command_refuses_a_bad_log_format(capsys: pytest.CaptureFixture[str]) -> None:
    from kelipsfs.cli import main
    assert main(["node", "--set", "log_format=xml"]) == 2
    assert "'log_format'" in capsys.readouterr().err


# --- structured events -------------------------------------------------------------------------

def test_rate_limited_warning_counts_what_it_suppressed(caplog: pytest.LogCaptureFixture) -> None:
    from daemon.runtime import _RateLimitedLog
    ratelog = _RateLimitedLog(interval=0.2)
    with caplog.at_level(logging.WARNING, logger="kelipsfs.node"):
        for _ in range(3):
            ratelog.warn("rejected_auth", "dropped", event="packet_rejected", reason="auth",
                         peer="127.0.0.1:9")
        time.sleep(0.25)
        ratelog.warn("rejected_auth", "dropped", event="packet_rejected", reason="auth",
                     peer="127.0.0.1:8")
    got = [r.fields for r in caplog.records]  # type: ignore[attr-defined]
    assert got == [
        {"event": "packet_rejected", "reason": "auth", "peer": "127.0.0.1:9"},
        {"event": "packet_rejected", "reason": "auth", "peer": "127.0.0.1:8", "suppressed": 2}]


def test_introducer_logs_registrations(caplog: pytest.LogCaptureFixture) -> None:
    from bootstrap.service import Introducer
    from daemon.core.messages import MemberEntry
    from daemon.security import Authenticator
    now = [0.0]
    introducer = Introducer(Authenticator(b"k" * 32), ttl=5, clock=lambda: now[0])
    entry = MemberEntry(bytes(range(20)), "10.0.0.1", 7400, 0, 1)
    with caplog.at_level(logging.INFO, logger="kelipsfs.bootstrap"):
        introducer.register(entry, 1, "c")
        introducer.register(entry, 1, "c")  # a refresh: not news
        now[0] = 10
        introducer.live()
    assert [r.fields for r in caplog.records] == [  # type: ignore[attr-defined]
        {"event": "member_registered", "member": "0001020304", "address": "10.0.0.1:7400"},
        {"event": "registration_expired", "member": "0001020304", "address": "10.0.0.1:7400"}]


# --- a real node -------------------------------------------------------------------------------

def _events(node: NodeProc) -> list[dict[str, Any]]:
    """Every line of the node's stderr, each of which must be a JSON object."""
    assert node.log is not None
    text = node.log.read_text()
    return [json.loads(line) for line in text.splitlines()]


def _node_id(node: NodeProc) -> str:
    return str(json.loads((node.data_dir / "node.json").read_text())["node_id"])


def test_node_writes_json_lines_with_its_id_and_member_events(tmp_path: Path) -> None:
    with Cluster(tmp_path, settings=["k=1", "t_fail=1.5", "log_format=json"]) as cluster:
        a = cluster.new_node()
        b = cluster.new_node(join=[a])
        a_id, b_id = _node_id(a)[:10], _node_id(b)[:10]

        def a_saw(event: str, **want: object) -> list[dict[str, Any]]:
            return [d for d in _events(a) if d.get("event") == event
                    and all(d.get(k) == v for k, v in want.items())]

        cluster.wait_for(lambda: a_saw("member_joined", member=b_id), 20, "a logs b's join")
        [up] = a_saw("node_up")
        assert up["level"] == "info" and up["logger"] == "kelipsfs.node"
        assert up["node"] == a_id and up["node_id"].startswith(a_id)
        assert up["address"] == a.address and up["group"] == 0
        assert TS.fullmatch(up["ts"])
        [joined] = a_saw("member_joined", member=b_id)
        assert joined["node"] == a_id and joined["address"] == b.address
        assert joined["group"] == 0

        host, port = a.address.rsplit(":", 1)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind(("127.0.0.1", 0))
            sock.sendto(b"\x01\x02 not a signed datagram", (host, int(port)))
            peer = f"127.0.0.1:{sock.getsockname()[1]}"
            cluster.wait_for(lambda: a_saw("packet_rejected", reason="auth", peer=peer), 10,
                             "a logs the rejected datagram")
        [rejected] = a_saw("packet_rejected")
        assert rejected["level"] == "warning" and rejected["node"] == a_id

        cluster.kill(b)
        cluster.wait_for(lambda: a_saw("member_failed", member=b_id, address=b.address), 20,
                         "a logs b's failure")
        for doc in _events(a):  # every line: the fixed keys, and this node's id
            assert {"ts", "level", "logger", "msg", "node"} <= doc.keys(), doc
            assert doc["node"] == a_id
