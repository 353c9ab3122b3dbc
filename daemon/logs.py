"""Logging for one kelipsfs process: one stderr handler, ``text`` for people or ``json`` lines.

Log calls may carry structured fields: ``log.info("member failed", extra=fields(member=...,
address=...))``. The text format appends them to the message as ``key=value``; the JSON format
makes them keys of the line's object, beside ``ts`` (ISO-8601 UTC, milliseconds), ``level``,
``logger``, ``msg``, ``node`` (this node's short id, once known) and ``exc`` (a traceback, as
one string). A field named like one of those keys is written as ``key_``.

The node id: ``set_node`` is called by the runtime once its identity is loaded. It is kept in a
context variable (trio tasks and worker threads inherit it), so several nodes in one process
(tests) each label their own lines; lines from outside any node's tasks (the FUSE threads of a
mount) get the id when the process has had exactly one node.
"""

from __future__ import annotations

import contextvars
import datetime
import json
import logging
import sys
from typing import IO

from daemon.settings import LOG_FORMATS, LOG_LEVELS

#: Keys every JSON line may have; structured fields never overwrite them.
RESERVED = ("ts", "level", "logger", "msg", "node", "exc", "stack")

_node: contextvars.ContextVar[str | None] = contextvars.ContextVar("kelipsfs_node", default=None)
_process_nodes: set[str] = set()


def fields(**values: object) -> dict[str, object]:
    """``extra=`` for a log call with structured fields: ``extra=fields(peer="1.2.3.4:7400")``."""
    return {"fields": values}


def short_id(node_id: bytes) -> str:
    """The 10-hex-digit form of a node id used in logs (``kelipsfs status`` shows it whole)."""
    return node_id.hex()[:10]


def set_node(node_id: bytes) -> None:
    """Label this task's (and its future children's) log lines with the node's short id."""
    short = short_id(node_id)
    _node.set(short)
    _process_nodes.add(short)


def current_node() -> str | None:
    node = _node.get()
    if node is None and len(_process_nodes) == 1:
        node = next(iter(_process_nodes))
    return node


class NodeFilter(logging.Filter):
    """Sets ``record.node`` (the short node id or None); passes every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "node", None) is None:
            record.node = current_node()
        return True


def record_fields(record: logging.LogRecord) -> dict[str, object]:
    values = getattr(record, "fields", None)
    return values if isinstance(values, dict) else {}


class TextFormatter(logging.Formatter):
    """``2024-05-01 12:00:00,123 INFO kelipsfs.node: member failed member=3fa2 group=1``."""

    def format(self, record: logging.LogRecord) -> str:
        record.message = record.getMessage()
        line = f"{self.formatTime(record)} {record.levelname} {record.name}: {record.message}"
        extra = record_fields(record)
        if extra:
            line += " " + " ".join(f"{key}={_text_value(value)}" for key, value in extra.items())
        for block in (_exception_text(self, record), record.stack_info):
            if block:
                line += "\n" + block
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line (newlines in messages and tracebacks are escaped)."""

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        doc: dict[str, object] = {
            "ts": ts.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        node = getattr(record, "node", None)
        if node is not None:
            doc["node"] = node
        for key, value in record_fields(record).items():
            doc[f"{key}_" if key in RESERVED else key] = value
        exc = _exception_text(self, record)
        if exc:
            doc["exc"] = exc
        if record.stack_info:
            doc["stack"] = record.stack_info
        return json.dumps(doc, default=str)


def _exception_text(formatter: logging.Formatter, record: logging.LogRecord) -> str:
    if record.exc_info and not record.exc_text:
        record.exc_text = formatter.formatException(record.exc_info)
    return record.exc_text or ""


def _text_value(value: object) -> str:
    text = str(value)
    if not text or any(c.isspace() or c in '="' for c in text):
        return json.dumps(text)
    return text


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """Ours, so a second configure_logging replaces it instead of doubling every line."""


def configure_logging(level: str = "info", log_format: str = "text",
                      stream: IO[str] | None = None) -> logging.Handler:
    """Send this process's logs (and Python warnings) to ``stream`` (stderr) at ``level`` in
    ``log_format``. Replaces a handler an earlier call installed; leaves others alone."""
    if level not in LOG_LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LOG_LEVELS)}, got {level!r}")
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, "
                         f"got {log_format!r}")
    handler = _Handler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    handler.addFilter(NodeFilter())
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("hypercorn.error").setLevel(logging.WARNING)
    logging.captureWarnings(True)
    return handler
