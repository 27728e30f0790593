"""One error shape for every response: `{"error": {"code", "message", "field"}}`."""

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from core.errors import InputError, SealerError, UnsupportedFormatError

logger = logging.getLogger(__name__)

_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    411: "length_required",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    503: "unavailable",
}


class ApiError(SealerError):
    """An error with its HTTP status; raised by routes and dependencies."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        field: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message, field=field, code=code)
        self.status = status
        self.headers = headers


def not_found(resource: str, identifier: str) -> ApiError:
    return ApiError(
        404, "not_found", f"{resource} {identifier!r} not found; check the id (each API key sees only its own {resource}s)"
    )


def error_body(error: SealerError) -> dict:
    return {"error": error.to_dict()}


def status_for(error: SealerError) -> int:
    if isinstance(error, ApiError):
        return error.status
    if isinstance(error, UnsupportedFormatError):
        return 415
    if isinstance(error, InputError):
        return 422
    return 500


def field_path(location: tuple | list, drop_first: bool = True) -> str | None:
    """Join a pydantic error location into a dotted field name such as `spec.training.steps`."""
    parts = [str(part) for part in location]
    if drop_first and parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:]
    return ".".join(parts) or None


def describe_validation_error(errors: list[dict], prefix: str | None = None) -> tuple[str, str | None]:
    """Turn pydantic errors into one message and the first offending field."""
    described = []
    first_field = None
    for error in errors:
        location = field_path(error.get("loc", ()))
        if prefix:
            location = f"{prefix}.{location}" if location else prefix
        if first_field is None:
            first_field = location
        got = error.get("input")
        value = f" (got {got!r})" if got is not None and not isinstance(got, dict | list) and len(repr(got)) < 200 else ""
        described.append(f"{location or 'request'}: {error.get('msg', 'invalid value')}{value}")
    message = "; ".join(described[:5])
    if len(described) > 5:
        message += f"; and {len(described) - 5} more"
    return message + "; fix these fields and send the request again", first_field


def spec_validation_error(error: ValidationError) -> ApiError:
    message, field = describe_validation_error(error.errors(include_url=False), prefix="spec")
    return ApiError(422, "invalid_spec", message, field=field)


def install_error_handlers(app: FastAPI) -> None:
    """Make every error, ours or the framework's, answer in the one error shape."""

    @app.exception_handler(SealerError)
    async def handle_sealer_error(request: Request, error: SealerError) -> JSONResponse:
        status = status_for(error)
        if status >= 500:
            logger.error("request %s %s failed: %s", request.method, request.url.path, error.message)
        headers = error.headers if isinstance(error, ApiError) else None
        return JSONResponse(error_body(error), status_code=status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def handle_validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        message, field = describe_validation_error(list(error.errors()))
        body = {"error": {"code": "invalid_request", "message": message, "field": field}}
        return JSONResponse(body, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def handle_http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(error.status_code, "http_error")
        message = str(error.detail)
        if error.status_code == 404 and message == "Not Found":
            message = f"no route for {request.method} {request.url.path}; see /docs for the API"
        body = {"error": {"code": code, "message": message, "field": None}}
        return JSONResponse(body, status_code=error.status_code, headers=getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def handle_unexpected(request: Request, error: Exception) -> JSONResponse:
        logger.exception("request %s %s failed", request.method, request.url.path)
        body = {
            "error": {
                "code": "internal_error",
                "message": f"internal error ({type(error).__name__}); the server log has the details",
                "field": None,
            }
        }
        return JSONResponse(body, status_code=500)
