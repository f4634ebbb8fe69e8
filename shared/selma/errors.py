"""Domain errors shared by every service.

Core logic raises these (it never imports grpc); one server interceptor maps each to its
gRPC status code (see ``selma.grpc_server``).  Messages must tell the caller what to change,
e.g. ``rank must be > 0; got 0``.  ``field`` names the offending request field when known.
"""

from __future__ import annotations

from enum import Enum

# A status message travels in a gRPC trailer (clients refuse metadata beyond ~8 KiB) and lands in logs
# and job records: every message is cut to this many characters, so a huge request value echoed by
# some check can never make the answer itself fail.
MAX_MESSAGE_CHARS = 900
# How much of a user's value a message quotes (see :func:`quote`).
QUOTE_CHARS = 64
_FIELD_CHARS = 128


def shorten(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """``text`` if it is at most ``limit`` characters, else its head and tail with the cut length said."""
    if len(text) <= limit:
        return text
    tail = min(80, limit // 8)
    head = max(limit - tail - 40, 0)  # 40: room for the note
    return f"{text[:head]} …[{len(text) - head - tail} characters cut]… {text[-tail:] if tail else ''}"


def quote(value: object, limit: int = QUOTE_CHARS) -> str:
    """A user value for an error message: its repr, or only a short prefix and its length when it is long."""
    text = value if isinstance(value, str) else str(value)
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}… ({len(text)} characters)"


class ErrorCode(str, Enum):
    """Transport-neutral error codes; names match gRPC status codes one to one."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    UNAVAILABLE = "UNAVAILABLE"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    CANCELLED = "CANCELLED"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    ABORTED = "ABORTED"
    INTERNAL = "INTERNAL"


class SelmaError(Exception):
    """Base class of every domain error; carries a code and an optional field name."""

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str, *, field: str | None = None, trailers: tuple[tuple[str, str], ...] = ()) -> None:
        self.field = shorten(field, _FIELD_CHARS) if field else field
        self.trailers = trailers  # gRPC trailing metadata sent with the status (e.g. retry-after-ms)
        message = shorten(str(message), MAX_MESSAGE_CHARS - _FIELD_CHARS - 2)  # room to prefix the field name
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        if self.field and self.field not in self.message:  # name the field once
            return shorten(f"{self.field}: {self.message}")
        return self.message


class InvalidArgument(SelmaError):
    """The request itself is wrong (bad value, missing field); fix the request."""

    code = ErrorCode.INVALID_ARGUMENT


class NotFound(SelmaError):
    """A named thing (artifact, object, job, model) does not exist."""

    code = ErrorCode.NOT_FOUND


class AlreadyExists(SelmaError):
    """Creating something that exists with different content."""

    code = ErrorCode.ALREADY_EXISTS


class FailedPrecondition(SelmaError):
    """The request is valid but the system is not in a state to do it (e.g. model not loaded)."""

    code = ErrorCode.FAILED_PRECONDITION


class ResourceExhausted(SelmaError):
    """A quota, queue or memory limit was hit; retry later or ask for less."""

    code = ErrorCode.RESOURCE_EXHAUSTED


class Unavailable(SelmaError):
    """A dependency (S3, LLM endpoint, Kubernetes API) cannot be reached; retrying may help."""

    code = ErrorCode.UNAVAILABLE


class PermissionDenied(SelmaError):
    """Not allowed: a dependency refused us (credentials, RBAC), or the caller lacks the scope a call needs."""

    code = ErrorCode.PERMISSION_DENIED


class Unauthenticated(SelmaError):
    """The caller presented no credentials, or ones that do not verify (a missing or unknown token)."""

    code = ErrorCode.UNAUTHENTICATED


class Cancelled(SelmaError):
    """The work was cancelled by the caller."""

    code = ErrorCode.CANCELLED


class DeadlineExceeded(SelmaError):
    """The work did not finish within its deadline."""

    code = ErrorCode.DEADLINE_EXCEEDED


class Aborted(SelmaError):
    """A concurrency conflict (e.g. an idempotency key reused with different parameters)."""

    code = ErrorCode.ABORTED


class RunFailed(FailedPrecondition):
    """A remote job or pipeline stage failed; the message says which and why (the CLI prints it, exit 2)."""


def require(condition: bool, message: str, *, field: str | None = None) -> None:
    """Raise InvalidArgument(message) unless condition holds; for request validation."""
    if not condition:
        raise InvalidArgument(message, field=field)


def error_for_code(code: str, message: str, *, default: type[SelmaError] = Aborted) -> SelmaError:
    """The domain error of a stored code (e.g. a worker's recorded failure); ``default`` for codes that are no client error."""
    classes = {c.code.value: c for c in (InvalidArgument, NotFound, AlreadyExists, FailedPrecondition, ResourceExhausted,
                                           Unavailable, PermissionDenied, DeadlineExceeded, Aborted)}
    return classes.get(code, default)(message)
