"""One error type for the service and the one place that maps errors to HTTP responses.

Every error body is `{"error": {"code": str, "message": str, "field"?: str}}`. Validation errors
(422) name the offending field as a dotted path into the request body (`groups.0.responses.2`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)


class GPMError(Exception):
    """An error with an HTTP status, a stable machine-readable `code` and an optional field."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        field: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        err: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.field is not None:
            err["field"] = self.field
        return {"error": err}


# The family: small constructors so every raise site says the same thing the same way.
def queue_full(depth: int, retry_after_s: int = 1) -> GPMError:
    return GPMError(
        429,
        "queue_full",
        f"the scoring queue is full ({depth} sequences waiting); retry later",
        headers={"Retry-After": str(retry_after_s)},
    )


def not_ready(reason: str = "the model is still loading") -> GPMError:
    return GPMError(503, "not_ready", reason, headers={"Retry-After": "5"})


def draining() -> GPMError:
    return GPMError(503, "draining", "the service is shutting down", headers={"Retry-After": "1"})


def unauthorized() -> GPMError:
    return GPMError(
        401,
        "unauthorized",
        "missing or invalid API key (send `Authorization: Bearer <key>`)",
        headers={"WWW-Authenticate": "Bearer"},
    )


def too_large(limit: str, value: int, maximum: int, field: str | None = None) -> GPMError:
    return GPMError(
        413, "too_large", f"{limit} is {value}, the limit is {maximum}", field=field or limit
    )


def inference_failed() -> GPMError:
    return GPMError(500, "inference_failed", "the model failed on the batch holding this request")


def client_gone() -> GPMError:
    # 499 (nginx's "client closed request"): nobody reads it; it makes the logs and metrics honest.
    return GPMError(499, "client_gone", "the client disconnected before the answer was ready")


def field_path(loc: Sequence[int | str]) -> str:
    """`("body", "groups", 0, "prompt")` → `groups.0.prompt` (the body prefix is implied)."""
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:]
    # Union tags and validator wrappers (`<messages>`, `function-after[...]`) are not fields.
    parts = [p for p in parts if not p.startswith("<") and "[" not in p]
    return ".".join(parts) or "body"


def _count(request: Request, code: str) -> None:
    metrics = getattr(request.app.state, "metrics", None)
    if metrics is not None:
        metrics.errors.labels(reason=code).inc()


def to_response(err: GPMError) -> JSONResponse:
    """The JSON response for `err` (also used by the ASGI body-size guard, before routing)."""
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def error_response(request: Request, err: GPMError) -> JSONResponse:
    _count(request, err.code)
    return to_response(err)


def validation_error(exc: RequestValidationError) -> GPMError:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    path = field_path(first.get("loc", ()))
    msg = str(first.get("msg", "invalid value"))
    if first.get("type") == "json_invalid":
        return GPMError(422, "invalid_json", f"request body is not valid JSON: {msg}")
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return GPMError(422, "invalid_request", f"{path}: {msg}{more}", field=path)


_BODY_PARSE_ERROR = "There was an error parsing the body"
_BAD_BYTES = "invalid UTF-8 or nested too deeply"
_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 401: "unauthorized"}


def install_error_handlers(app: FastAPI) -> None:
    """Register the mapping; the only place in the service that turns errors into responses."""

    @app.exception_handler(GPMError)
    async def _gpm(request: Request, exc: GPMError) -> JSONResponse:
        return error_response(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(request, validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and exc.detail == _BODY_PARSE_ERROR:
            # FastAPI's answer when json.loads fails other than by syntax: invalid UTF-8,
            # nesting deeper than the parser's recursion limit. Same code as any bad JSON.
            err = GPMError(422, "invalid_json", "request body is not valid JSON: " + _BAD_BYTES)
            return error_response(request, err)
        code = _HTTP_CODES.get(exc.status_code, f"http_{exc.status_code}")
        err = GPMError(exc.status_code, code, str(exc.detail), headers=exc.headers)
        return error_response(request, err)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(request, GPMError(500, "internal_error", "internal server error"))
