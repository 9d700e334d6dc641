"""Every error leaves the server in OpenAI's shape:
``{"error": {"message", "type", "param", "code"}}``, with a status that says who must act,
except on the routes of another API (Ollama's ``/api/*``, Anthropic's ``/v1/messages``):
those register their own shape (``ErrorShape``), so their clients read the message."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from .metrics import route_label

log = logging.getLogger("mjc.api")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
    504: "timeout",
}


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "invalid_request_error")
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


@dataclass(frozen=True)
class ErrorShape:
    """How one API writes an error: for the paths ``matches`` accepts, ``body(exc)``."""

    matches: Callable[[str], bool]
    body: Callable[[APIError], dict]


def shaped_response(shapes, path: str, exc: APIError) -> JSONResponse:
    """``exc`` as a response in the shape of the API ``path`` belongs to (OpenAI's by default)."""
    for shape in shapes:
        if shape.matches(path):
            return JSONResponse(shape.body(exc), status_code=exc.status, headers=exc.headers)
    return exc.response()


def respond(request: Request, exc: APIError) -> JSONResponse:
    return shaped_response(getattr(request.app.state, "error_shapes", ()), request.url.path, exc)


def _field_path(loc: tuple) -> str:
    parts = [str(p) for p in loc if p != "body"]
    # Drop pydantic's union-branch markers such as 'str' / 'list[TextPart]'.
    parts = [
        p
        for p in parts
        if not (p[:1].islower() and ("[" in p or p in ("str", "int", "float", "bool", "constrained-str")))
    ]
    return ".".join(parts)


def validation_error(exc: RequestValidationError) -> APIError:
    """The first problem of a request body, naming the field."""
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    if first.get("type") == "json_invalid":
        return APIError(
            400,
            f"request body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}",
            code="invalid_json",
        )
    field = _field_path(tuple(first.get("loc", ())))
    msg = first.get("msg", "invalid value").removeprefix("Value error, ")
    if not field:
        return APIError(400, f"request body: {msg}", code="invalid_request")
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return APIError(400, f"{field}: {msg}{more}", param=field, code="invalid_value")


def record(request: Request, exc: APIError) -> APIError:
    """Note ``exc`` in the app's error history (``/errors``, ``mjc_errors_total``)."""
    observer = getattr(request.app.state, "observer", None)
    if observer is not None:
        observer.error(route_label(request.scope), exc.status, exc.type, exc.message)
    return exc


def install(app: FastAPI) -> None:
    from .adapters import ClientLeft  # adapters imports this module

    @app.exception_handler(ClientLeft)
    async def _left(request: Request, exc: ClientLeft) -> Response:
        return Response(status_code=499)  # not an error: the request's watch counted a cancellation

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return respond(request, record(request, exc))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return respond(request, record(request, validation_error(exc)))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 404:
            message = (
                f"no route {request.method} {request.url.path}; see /v1/models, /v1/chat/completions, "
                "/v1/completions, /v1/responses, /v1/messages, /api/chat, /api/generate, /health"
            )
        return respond(
            request, record(request, APIError(exc.status_code, message, headers=getattr(exc, "headers", None)))
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return respond(request, record(request, APIError(500, f"internal error: {type(exc).__name__}")))
