"""Domain errors: each carries the contract's `code` and HTTP status, and nothing of FastAPI.

The HTTP layer (`service.api.errors`) turns them into `{"detail", "code", ...}` bodies; domain code
raises them without knowing it is behind HTTP.
"""

from __future__ import annotations

from typing import Any

# Names from a request (state_dict keys, fields, file and member names) echoed in an error are cut
# to this many characters, so a crafted 10 MB key is not sent back (twice) in the answer.
MAX_ECHOED = 200


def shorten(text: str, limit: int = MAX_ECHOED) -> str:
    """`text`, cut to `limit` characters with an ellipsis when longer."""
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


class BNServeError(Exception):
    """Base class: `status` is the HTTP status the contract gives this problem."""

    status: int = 400
    code: str = "bad_request"

    def __init__(self, detail: str, *, code: str | None = None, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        if code is not None:
            self.code = code
        self.extra = extra


class NotFound(BNServeError):
    status = 404
    code = "not_found"


class Conflict(BNServeError):
    status = 409
    code = "conflict"


class InvalidInput(BNServeError):
    """A request body or parameter that cannot be used as given (422)."""

    status = 422
    code = "invalid_input"


class InvalidCheckpoint(BNServeError):
    """An uploaded checkpoint that is refused; nothing is stored."""

    status = 422
    code = "invalid_checkpoint"


class UnsafeCheckpoint(InvalidCheckpoint):
    """A pickle that would need code outside the weights-only allowlist to load."""

    status = 400
    code = "unsafe_pickle"


class InvalidDataset(BNServeError):
    status = 422
    code = "invalid_dataset"


class PayloadTooLarge(BNServeError):
    status = 413
    code = "payload_too_large"


class ResponseTooLarge(PayloadTooLarge):
    """An answer that would hold more values than BNSERVE_MAX_RESPONSE_VALUES (refused before
    the forward pass)."""

    code = "response_too_large"


class NonFiniteOutput(BNServeError):
    """Outputs that overflowed to Inf or NaN: JSON has no such numbers (they would be `null`)."""

    status = 422
    code = "non_finite_output"


class UnsupportedMediaType(BNServeError):
    status = 415
    code = "unsupported_media_type"


class Unauthorized(BNServeError):
    status = 401
    code = "unauthorized"


class Overloaded(BNServeError):
    """The prediction queue is full; the client should retry after `retry_after` seconds."""

    status = 503
    code = "overloaded"

    def __init__(self, detail: str, *, retry_after: float = 1.0, **extra: Any) -> None:
        super().__init__(detail, **extra)
        self.retry_after = retry_after


class ModelReplaced(Conflict):
    """The model was deleted and its name created again while work on the old one ran."""

    code = "model_replaced"


class NotServing(Conflict):
    code = "no_serving_version"


class GateFailed(BNServeError):
    """A version that loaded but may not serve: non-finite or batch-dependent outputs."""

    status = 422
    code = "gate_failed"


class CorruptCheckpoint(BNServeError):
    """A stored checkpoint whose bytes no longer match the recorded sha256."""

    status = 500
    code = "corrupt_checkpoint"


class InsufficientStorage(BNServeError):
    """The disk (or quota) holding the data dir is full; nothing partial was kept."""

    status = 507
    code = "insufficient_storage"
