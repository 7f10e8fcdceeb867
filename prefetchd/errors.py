"""User-facing errors: every one carries a stable `code` and a message that says what to change."""

from __future__ import annotations


class PrefetchdError(Exception):
    """An error the user can fix. The CLI prints `error: <message>` (one line, no traceback)."""

    code = "error"

    def __init__(self, message: str, *, code: str | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self.args[0])

    def to_reply(self) -> dict:
        return {"ok": False, "code": self.code, "error": self.message}


class DatasetError(PrefetchdError):
    code = "bad_dataset"


class ConfigError(PrefetchdError):
    code = "bad_config"


class StorageError(PrefetchdError):
    """The object store cannot be reached or refuses us (DNS, connection, 403, missing bucket)."""

    code = "storage"


class EmptyDatasetError(PrefetchdError):
    code = "empty_dataset"


class ShmError(PrefetchdError):
    code = "shm"


class ProtocolError(PrefetchdError):
    code = "bad_request"


class DaemonNotRunning(PrefetchdError):
    code = "no_daemon"


class DaemonTimeout(PrefetchdError):
    """The daemon did not answer within the client's timeout (paused, hung or overloaded)."""

    code = "daemon_timeout"


class CorruptObjectError(PrefetchdError):
    """An object that downloaded but cannot be decoded (truncated, not a TIFF, wrong shape)."""

    code = "corrupt_object"


def error_from_reply(reply: dict) -> PrefetchdError:
    return PrefetchdError(reply.get("error", "unknown error"), code=reply.get("code", "error"))
