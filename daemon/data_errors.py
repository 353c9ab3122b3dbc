"""The failures of the data path, each with the HTTP status the API answers it with."""

from __future__ import annotations


class DataError(Exception):
    """A data-path failure with an HTTP status and a message for the user."""

    status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotFound(DataError):
    status = 404


class Unavailable(DataError):
    status = 503


class TransferFailed(Unavailable):
    """A read broke on every holder of the version it started on (e.g. each copy was
    replaced by a newer write while it was read): reading the name again may succeed."""


class InsertFailed(DataError):
    """Fewer holders than the write quorum stored the bytes; ``full`` when a holder refused
    for lack of space (the mount turns that into ENOSPC, the HTTP API into 507)."""

    status = 503

    def __init__(self, message: str, full: bool = False) -> None:
        super().__init__(f"{message} (a holder's disk is full)" if full else message)
        self.full = full
        if full:
            self.status = 507


class Superseded(DataError):
    """No holder stored an upload because they hold a newer version of the name: another
    writer's, written meanwhile. Versions stamped by this node are above it from now on, so
    sending the same bytes again makes them the newest."""

    status = 409


class Changed(DataError):
    """A conditional delete found another version than the one it was for: not deleted."""

    status = 409


class ContentMismatch(DataError):
    """Every holder refused the upload's bytes: they do not match its size or digest."""

    status = 422
