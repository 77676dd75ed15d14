"""One tree of Helios errors; each class knows its HTTP status and OpenAI error `type`.

The router's exception handler turns any of these into OpenAI's error body. Errors
raised inside an engine replica cross Ray as the same classes (Ray re-raises the
cause's type), so the mapping holds end to end.
"""

from __future__ import annotations


class HeliosError(Exception):
    """Base error. A 5xx subclass never shows its message to the client."""

    status_code = 500
    error_type = "server_error"
    code: str | None = None
    def __init__(self, message: str = "", *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers: dict[str, str] = {}  # extra response headers (Retry-After on a 503)

    def __reduce__(self):  # keep `param` when pickled across Ray
        return (_rebuild, (type(self), self.message, self.param))

    def to_body(self, request_id: str | None = None) -> dict:
        """The OpenAI error body; server errors hide their text behind the request id."""
        message = self.message
        if self.status_code >= 500:
            message = "Internal server error" + (f" (request id {request_id})" if request_id else "")
        return {"error": {"message": message, "type": self.error_type, "param": self.param, "code": self.code}}


def _rebuild(cls: type[HeliosError], message: str, param: str | None) -> HeliosError:
    return cls(message, param=param)


class InvalidRequest(HeliosError):
    status_code = 400
    error_type = "invalid_request_error"


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"


class AuthenticationFailed(HeliosError):
    status_code = 401
    error_type = "authentication_error"
    code = "invalid_api_key"


class ModelNotFound(HeliosError):
    status_code = 404
    error_type = "not_found_error"
    code = "model_not_found"


class RouteNotFound(HeliosError):
    status_code = 404
    error_type = "not_found_error"


class MethodNotAllowed(HeliosError):
    status_code = 405
    error_type = "invalid_request_error"


class PermissionDenied(HeliosError):
    status_code = 403
    error_type = "permission_error"


class Conflict(HeliosError):
    status_code = 409
    error_type = "invalid_request_error"


class ServiceUnavailable(HeliosError):
    status_code = 503
    error_type = "service_unavailable"

    def __init__(self, message: str = "", *, param: str | None = None, retry_after_s: int | None = None) -> None:
        super().__init__(message, param=param)
        self.retry_after_s = retry_after_s
        if retry_after_s is not None:
            self.headers = {"Retry-After": str(max(int(retry_after_s), 1))}

    def __reduce__(self):
        return (_rebuild_unavailable, (type(self), self.message, self.retry_after_s))

    def to_body(self, request_id: str | None = None) -> dict:
        # A 503 is the client's cue to retry; its reason is safe to show.
        return {"error": {"message": self.message, "type": self.error_type, "param": None, "code": None}}


class RateLimited(HeliosError):
    """429: over a per-key rate limit, or the model's queue is full; Retry-After says when to come back."""

    status_code = 429
    error_type = "rate_limit_error"

    def __init__(self, message: str = "", *, param: str | None = None, retry_after_s: int = 1,
                 code: str = "rate_limit_exceeded") -> None:
        super().__init__(message, param=param)
        self.code = code
        self.retry_after_s = retry_after_s
        self.headers = {"Retry-After": str(max(int(retry_after_s), 1))}

    def __reduce__(self):
        return (_rebuild_rate_limited, (self.message, self.retry_after_s, self.code))


class EngineUnavailable(ServiceUnavailable):
    """The replica that took a request died, or its engine did, before any output: safe to retry.

    `replica`: the replica's id when it is known (its engine died under a live replica), so
    the router can count the failure against that replica's circuit breaker; `dead`: the
    engine is known to be gone for good (not a transient, unreachable actor), so the breaker
    opens at once."""

    def __init__(self, message: str = "", *, param: str | None = None, retry_after_s: int | None = None,
                 replica: str | None = None, dead: bool = False) -> None:
        super().__init__(message, param=param, retry_after_s=retry_after_s)
        self.replica = replica
        self.dead = dead

    def __reduce__(self):
        return (_rebuild_engine_unavailable, (self.message, self.replica, self.dead))


class EngineError(HeliosError):
    """The engine failed while serving a request (logged, hidden from the client)."""


class ModelVersionNotFound(ModelNotFound):
    """No manifest for this model (or version) in any tier of the store."""


class StorageError(HeliosError):
    """The model cache failed: a tier, a transfer or the remote store (message is for operators)."""


class BlobNotFound(StorageError):
    """A manifest names a blob that no tier holds."""


class CorruptBlob(StorageError):
    """A blob's bytes do not match its digest."""


class TierFull(StorageError):
    """A local tier cannot make room (capacity or disk) for a blob."""


class RemoteUnavailable(StorageError):
    """The remote tier cannot be reached or refuses us (URL, endpoint, credentials, bucket)."""


def _rebuild_unavailable(cls: type[ServiceUnavailable], message: str, retry_after_s: int | None) -> ServiceUnavailable:
    return cls(message, retry_after_s=retry_after_s)


def _rebuild_rate_limited(message: str, retry_after_s: int, code: str) -> RateLimited:
    return RateLimited(message, retry_after_s=retry_after_s, code=code)


def _rebuild_engine_unavailable(message: str, replica: str | None, dead: bool = False) -> EngineUnavailable:
    return EngineUnavailable(message, replica=replica, dead=dead)


def unwrap(exc: BaseException) -> BaseException:
    """The Helios error inside a Ray task error, if there is one."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, HeliosError) else exc
