"""Object names: the file's path in the mount, validated once at the edge of the system.

A name is a relative POSIX path of components separated by '/': no empty, '.' or '..'
components, no NUL, each component at most 255 bytes and the whole at most 4,096 bytes of
UTF-8 (the limits of Linux filesystems, so anything stored can be mounted back).
"""

from __future__ import annotations

MAX_COMPONENT_BYTES = 255
MAX_NAME_BYTES = 4096


class NameError_(ValueError):
    """A name a user gave cannot name an object; the message says why."""


def validate_name(name: str) -> str:
    """Return the canonical form of ``name`` (leading '/' removed) or raise NameError_."""
    if not isinstance(name, str):
        raise NameError_("a name must be text")
    canonical = name.lstrip("/")
    if not canonical:
        raise NameError_("a name must not be empty")
    if "\x00" in canonical:
        raise NameError_("a name must not contain NUL")
    try:
        raw = canonical.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise NameError_("a name must be valid UTF-8") from exc
    if len(raw) > MAX_NAME_BYTES:
        raise NameError_(f"a name is at most {MAX_NAME_BYTES} bytes, this one is {len(raw)}")
    for part in canonical.split("/"):
        if part in ("", ".", ".."):
            raise NameError_(f"{name!r}: empty, '.' and '..' path components are not allowed")
        if len(part.encode("utf-8")) > MAX_COMPONENT_BYTES:
            raise NameError_(f"{name!r}: a path component is at most {MAX_COMPONENT_BYTES} bytes")
    return canonical


def validate_prefix(prefix: str) -> str:
    """A listing prefix: '' (everything) or a valid name, optionally ending in '/'."""
    stripped = prefix.lstrip("/")
    if not stripped:
        return ""
    trailing = stripped.endswith("/")
    core = validate_name(stripped.rstrip("/"))
    return core + "/" if trailing else core
