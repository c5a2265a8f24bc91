"""Domain errors. Each carries a stable machine-readable code; gpud/api/errors.py maps kinds to HTTP."""

from __future__ import annotations

import enum


class ErrorKind(enum.Enum):
    """What sort of failure this is; the web layer turns each kind into one HTTP status."""

    INVALID = "invalid"  # 400: the request is malformed or a value is out of range
    UNAUTHORIZED = "unauthorized"  # 401
    FORBIDDEN = "forbidden"  # 403: e.g. an image not on the allowlist
    NOT_FOUND = "not_found"  # 404
    CONFLICT = "conflict"  # 409
    GONE = "gone"  # 410: e.g. a session that has ended
    TOO_LARGE = "too_large"  # 413
    BUSY = "busy"  # 429: e.g. a full session queue
    INTERNAL = "internal"  # 500
    UNAVAILABLE = "unavailable"  # 503: no GPU free, engine down


class GpudError(Exception):
    """Base of every error gpud reports to a client; `code` is stable, `message` is for people."""

    kind: ErrorKind = ErrorKind.INTERNAL
    code: str = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        kind: ErrorKind | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if kind is not None:
            self.kind = kind
        self.retry_after = retry_after

    def to_dict(self) -> dict[str, str]:
        """The body's `error` object."""
        return {"code": self.code, "message": self.message}


class InvalidRequest(GpudError):
    """The client sent something gpud cannot accept."""

    kind = ErrorKind.INVALID
    code = "invalid_request"


class NotFound(GpudError):
    """The named thing does not exist."""

    kind = ErrorKind.NOT_FOUND
    code = "not_found"


class Gone(GpudError):
    """The named thing existed but has ended."""

    kind = ErrorKind.GONE
    code = "gone"


class Forbidden(GpudError):
    """Policy forbids it (e.g. an image not on the allowlist)."""

    kind = ErrorKind.FORBIDDEN
    code = "forbidden"


class Conflict(GpudError):
    """The request conflicts with the current state."""

    kind = ErrorKind.CONFLICT
    code = "conflict"


class Busy(GpudError):
    """Try again later: a bounded queue is full."""

    kind = ErrorKind.BUSY
    code = "busy"


class Unavailable(GpudError):
    """A resource gpud depends on is not available now (no free GPU, engine down)."""

    kind = ErrorKind.UNAVAILABLE
    code = "unavailable"


class ConfigError(Exception):
    """One or more configuration problems; each line names the key and where it came from."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems
