"""User-facing errors: every one carries a stable `code` (an `ErrorCode`) and a message that says what to change.

Each exception class has its code; `class_for(code)` is the other way round, so an error reply from the daemon
comes back as the class it was raised as (`prefetchd.protocol.error_from_reply`) and callers catch classes.
Several storage codes share `StorageError`: they name what is wrong (DNS, 403, ...) for the same kind of fix.
"""

from __future__ import annotations

import enum


class ErrorCode(enum.StrEnum):
    ERROR = "error"
    INTERNAL = "internal"                      # a bug: the daemon logged the traceback
    BAD_REQUEST = "bad_request"                # the control protocol was not followed
    BAD_DATASET = "bad_dataset"
    MIXED_SHAPES = "mixed_shapes"              # the selected fields are not one size and no shape= says how
    BAD_CONFIG = "bad_config"
    EMPTY_DATASET = "empty_dataset"
    SHM = "shm"
    NO_DAEMON = "no_daemon"
    BUSY = "busy"                              # another daemon owns the socket
    TOO_MANY_CONNECTIONS = "too_many_connections"  # a cap on control connections (per peer or in total)
    FORBIDDEN = "forbidden"                    # peer credentials refused
    STOPPING = "stopping"                      # the daemon is draining
    INDEX_BUILDING = "index_building"
    RANK_TAKEN = "rank_taken"
    JOB_MISMATCH = "job_mismatch"
    CORRUPT_OBJECT = "corrupt_object"
    CACHE_WRITE = "cache_write"
    STORAGE = "storage"
    NO_SUCH_BUCKET = "no_such_bucket"
    WRONG_REGION = "wrong_region"
    ACCESS_DENIED = "access_denied"
    DNS = "dns"
    CONNECTION_REFUSED = "connection_refused"
    TIMEOUT = "timeout"
    DAEMON_TIMEOUT = "daemon_timeout"          # the daemon did not answer within the client's timeout
    TLS = "tls"
    NO_ROOT = "no_root"


MAX_MESSAGE = 1000   # characters of an error message: it may quote what a client sent, never all of it


class PrefetchdError(Exception):
    """An error the user can fix. The CLI prints `error: <message>` (one line, no traceback)."""

    code: ErrorCode = ErrorCode.ERROR
    codes: tuple[ErrorCode, ...] = ()   # further codes raised as this class (besides `code`)

    def __init__(self, message: str, *, code: ErrorCode | str | None = None):
        super().__init__(message)
        if code is not None:
            self.code = ErrorCode(code)

    @property
    def message(self) -> str:
        """The one line the user sees; a message that quotes a huge request value is cut in the middle."""
        text = str(self.args[0])
        if len(text) <= MAX_MESSAGE:
            return text
        head, tail = MAX_MESSAGE * 2 // 3, MAX_MESSAGE // 4
        return f"{text[:head]} …({len(text) - head - tail} characters left out)… {text[-tail:]}"


class InternalError(PrefetchdError):
    code = ErrorCode.INTERNAL


class DatasetError(PrefetchdError):
    code = ErrorCode.BAD_DATASET
    codes = (ErrorCode.MIXED_SHAPES,)


class ConfigError(PrefetchdError):
    code = ErrorCode.BAD_CONFIG


class StorageError(PrefetchdError):
    """The object store cannot be reached or refuses us (DNS, connection, 403, missing bucket)."""

    code = ErrorCode.STORAGE
    codes = (ErrorCode.NO_SUCH_BUCKET, ErrorCode.WRONG_REGION, ErrorCode.ACCESS_DENIED, ErrorCode.DNS,
             ErrorCode.CONNECTION_REFUSED, ErrorCode.TIMEOUT, ErrorCode.TLS, ErrorCode.NO_ROOT)


class EmptyDatasetError(PrefetchdError):
    code = ErrorCode.EMPTY_DATASET


class ShmError(PrefetchdError):
    code = ErrorCode.SHM


class ProtocolError(PrefetchdError):
    code = ErrorCode.BAD_REQUEST


class DaemonNotRunning(PrefetchdError):
    code = ErrorCode.NO_DAEMON


class DaemonBusy(PrefetchdError):
    """Another daemon already listens on the socket."""

    code = ErrorCode.BUSY


class TooManyConnections(PrefetchdError):
    """The daemon refuses another control connection: this peer (or everyone together) holds too many."""

    code = ErrorCode.TOO_MANY_CONNECTIONS


class Forbidden(PrefetchdError):
    """The peer's uid/gid may not use this daemon."""

    code = ErrorCode.FORBIDDEN


class DaemonStopping(PrefetchdError):
    """The daemon is draining: reattach once it is back."""

    code = ErrorCode.STOPPING


class IndexBuilding(PrefetchdError):
    """The dataset's index is still being built: attach again later."""

    code = ErrorCode.INDEX_BUILDING


class AttachConflict(PrefetchdError):
    """The rank is attached elsewhere, or the job is attached with other settings."""

    code = ErrorCode.JOB_MISMATCH
    codes = (ErrorCode.RANK_TAKEN,)


class DaemonTimeout(PrefetchdError):
    """The daemon did not answer within the client's timeout (paused, hung or overloaded)."""

    code = ErrorCode.DAEMON_TIMEOUT


class CorruptObjectError(PrefetchdError):
    """An object that downloaded but cannot be decoded (truncated, not a TIFF, wrong shape)."""

    code = ErrorCode.CORRUPT_OBJECT


def _subclasses(cls: type[PrefetchdError]):
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def class_for(code: ErrorCode | str) -> type[PrefetchdError]:
    """The exception class an error code is raised as (PrefetchdError for a code this version does not know)."""
    for cls in _subclasses(PrefetchdError):
        if code == cls.code or code in cls.codes:
            return cls
    return PrefetchdError
