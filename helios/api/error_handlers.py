"""Map every failure at the HTTP edge onto OpenAI's error body, with the right status."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from helios.errors import HeliosError, InvalidRequest, MethodNotAllowed, RouteNotFound, unwrap
from helios.observability.logs import get_logger, log_event

logger = get_logger("api")


def request_id_of(request: Request) -> str | None:
    return getattr(request.state, "request_id", None)


def invalid_from_validation(exc: ValidationError | RequestValidationError) -> InvalidRequest:
    """A pydantic report as one 400 naming the first bad field."""
    err = exc.errors()[0]
    loc = [str(p) for p in err.get("loc", ()) if p not in ("body",)]
    param = ".".join(loc) or None
    msg = err.get("msg", "invalid value").removeprefix("Value error, ")
    return InvalidRequest(f"{param}: {msg}" if param else msg, param=param)


def error_response(exc: HeliosError, request_id: str | None) -> JSONResponse:
    if exc.status_code >= 500:
        log_event(logger, "request_failed", logging.ERROR, request_id=request_id, error=type(exc).__name__, detail=exc.message)
    headers = {**exc.headers, **({"x-request-id": request_id} if request_id else {})}
    return JSONResponse(exc.to_body(request_id), status_code=exc.status_code, headers=headers)


def install(app: FastAPI) -> None:
    """Register the handlers: Helios errors, validation errors, unknown routes, anything else."""

    @app.exception_handler(HeliosError)
    async def _helios(request: Request, exc: HeliosError) -> JSONResponse:
        return error_response(exc, request_id_of(request))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(invalid_from_validation(exc), request_id_of(request))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            err: HeliosError = RouteNotFound(f"No route {request.method} {request.url.path}")
        elif exc.status_code == 405:
            err = MethodNotAllowed(f"Method {request.method} is not allowed on {request.url.path}")
        else:
            err = HeliosError(str(exc.detail))
            err.status_code = exc.status_code
        return error_response(err, request_id_of(request))

    @app.exception_handler(Exception)
    async def _other(request: Request, exc: Exception) -> JSONResponse:
        inner = unwrap(exc)
        if isinstance(inner, HeliosError):
            return error_response(inner, request_id_of(request))
        log_event(logger, "unhandled_error", logging.ERROR, request_id=request_id_of(request), error=repr(exc))
        return error_response(HeliosError("unhandled"), request_id_of(request))
