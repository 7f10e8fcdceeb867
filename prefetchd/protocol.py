"""The control protocol: newline-delimited JSON over a unix socket, one request → one reply.

Requests are size-bounded and validated against a small schema per operation before anything acts
on them (`SCHEMA`, `decode_request`). Replies are built here (`*_reply`), so their fields are named in one
place. Every error reply is `{"ok": false, "code": ..., "error": "<what to change>"}` with a code of
`ErrorCode`; `error_from_reply` turns it back into the exception class it was raised as.
"""

from __future__ import annotations

import json
from typing import Any

from prefetchd.errors import ErrorCode, InternalError, PrefetchdError, ProtocolError, class_for

MAX_LINE = 64 * 1024  # bytes per request or reply line
INT_MIN, INT_MAX = -(2**63), 2**63 - 1  # every integer field must fit in int64

# op -> {field: (types, required)}
SCHEMA: dict[str, dict[str, tuple[tuple[type, ...], bool]]] = {
    "attach": {
        "dataset": ((str,), True),
        "batch_size": ((int,), True),
        "seed": ((int,), False),
        "rank": ((int,), False),
        "world_size": ((int,), False),
        "local_world_size": ((int,), False),
        "job": ((str,), False),
        "options": ((dict,), False),
    },
    "next": {"epoch": ((int,), True), "batch": ((int,), True)},
    "release": {"slots": ((list,), True)},
    "detach": {},
    "status": {},
    "stop": {},
    "ping": {},
}


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":"), default=_default).encode() + b"\n"


def _default(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    raise TypeError(f"cannot encode {type(value).__name__}")


def decode_request(line: bytes) -> dict[str, Any]:
    try:
        request = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"request is not valid JSON ({exc.__class__.__name__}); send one JSON object per line") from None
    except RecursionError:
        raise ProtocolError("request nests too deeply; send a flat JSON object per line") from None
    except ValueError:  # an integer of thousands of digits (Python refuses to convert it)
        raise ProtocolError("request has a number too long to read: integers must fit in 64 bits") from None
    if not isinstance(request, dict):
        raise ProtocolError("request must be a JSON object with an 'op' field")
    op = request.get("op")
    if op not in SCHEMA:
        raise ProtocolError(f"unknown op {op!r}; accepted ops: {', '.join(SCHEMA)}")
    fields = SCHEMA[op]
    for name, value in request.items():
        if name == "op":
            continue
        if name not in fields:
            raise ProtocolError(f"unknown field {name!r} for op {op!r}; accepted fields: {', '.join(fields) or 'none'}")
        types, _ = fields[name]
        if isinstance(value, bool) and bool not in types or not isinstance(value, types):
            raise ProtocolError(f"field {name!r} of op {op!r} must be {' or '.join(t.__name__ for t in types)}")
        if isinstance(value, int) and not INT_MIN <= value <= INT_MAX:
            raise ProtocolError(f"field {name!r} of op {op!r} is out of range: integers must fit in 64 bits")
    missing = [name for name, (_, required) in fields.items() if required and name not in request]
    if missing:
        raise ProtocolError(f"op {op!r} needs field(s): {', '.join(missing)}")
    return request


# ---- replies ---------------------------------------------------------------------------------------

def ok_reply(**fields: Any) -> dict[str, Any]:
    return {"ok": True, **fields}


def attach_reply(*, job: str, layout: dict, fields: int, channels: list[str], batches_per_epoch: int,
                 preprocessing: dict, epoch: int, position: int, field_shape: dict | None = None) -> dict[str, Any]:
    return ok_reply(job=job, layout=layout, fields=fields, channels=channels, batches_per_epoch=batches_per_epoch,
                    preprocessing=preprocessing, position={"epoch": epoch, "position": position},
                    field_shape=field_shape)


def batch_reply(*, epoch: int, batch: int, slots: list[int], ids: list[str], generations: list[int],
                waited_s: float, pixel_size_um: list[float | None] | None = None) -> dict[str, Any]:
    """The batch a rank asked for: slots leased to it until its next request, the ids of their fields and the
    µm per pixel of each (None where the microscope is unknown)."""
    return ok_reply(end=False, epoch=epoch, batch=batch, slots=slots, ids=ids, generations=generations,
                    waited_s=waited_s, pixel_size_um=pixel_size_um or [])


def end_of_epoch_reply(*, epoch: int, batches: int) -> dict[str, Any]:
    return ok_reply(end=True, epoch=epoch, batches=batches)


def error_reply(error: PrefetchdError) -> dict[str, Any]:
    return {"ok": False, "code": error.code, "error": error.message}


def internal_error_reply(exc: BaseException) -> dict[str, Any]:
    return error_reply(InternalError(f"internal error: {type(exc).__name__}: {exc}"))


def error_from_reply(reply: dict[str, Any]) -> PrefetchdError:
    """The exception an error reply stands for, as its own class (StorageError, DaemonStopping, ...)."""
    code = reply.get("code", ErrorCode.ERROR)
    message = reply.get("error", "unknown error")
    try:
        return class_for(code)(message, code=code)
    except ValueError:  # a code this version does not know (a newer daemon)
        error = PrefetchdError(message)
        error.code = code
        return error
