"""OpenAI-style errors: `{"error": {"message", "type", "param", "code"}}` for every failure.

`APIError` is what serving code raises; the handlers installed here turn it, request
validation errors, unknown routes and anything unexpected into that JSON shape, so no
response, however bad the input, leaves without it.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ondo.engine.async_llm import EngineUnavailable, QueueFull

log = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    503: "service_unavailable",
}


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers

    @property
    def type(self) -> str:
        return _TYPES.get(self.status, "internal_error" if self.status >= 500 else "invalid_request_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


_SAMPLING_ERROR = re.compile(r"invalid sampling parameter (\w+)=")


def from_sampling_error(e: ValueError, rename: dict[str, str] | None = None) -> APIError:
    """SamplingParams says "invalid sampling parameter NAME=...: why"; name the request field."""
    match = _SAMPLING_ERROR.match(str(e))
    param = match.group(1) if match else None
    if param and rename:
        param = rename.get(param, param)
    return bad_request(str(e), param)


def from_engine_exception(e: Exception) -> APIError:
    if isinstance(e, QueueFull):
        return APIError(503, str(e), code="queue_full",
                        headers={"Retry-After": str(e.retry_after_s)})
    if isinstance(e, EngineUnavailable):
        return APIError(503, str(e), code="unavailable", headers={"Retry-After": "5"})
    if isinstance(e, ValueError):
        return bad_request(str(e))
    return APIError(500, f"the engine failed: {e}", code="engine_error")


# The tags pydantic puts in an error's location for the branch of a union it tried.
_UNION_TAG = re.compile(r"^(str|int|float|bool|none|.*\[.*\]|[a-z]+-[a-z-]+|[A-Z]\w*)$")


def _param_path(loc: tuple[Any, ...]) -> str | None:
    parts = [p for p in loc if p != "body"]
    path = ""
    for p in parts:
        if isinstance(p, int):
            path += f"[{p}]"
        elif _UNION_TAG.match(str(p)):
            continue
        else:
            path += f".{p}" if path else str(p)
    return path or None


def _json_media_type(content_type: str) -> bool:
    media = content_type.split(";")[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


def validation_error(exc: RequestValidationError, content_type: str | None = None) -> APIError:
    """The 400 a request that failed validation gets, naming what was wrong: the body as
    a whole (not JSON, sent as another media type, not an object) or its first fields."""
    errors = list(exc.errors())
    if not errors:
        return bad_request("invalid request")
    first = errors[0]
    if first.get("type") == "json_invalid":
        why = (first.get("ctx") or {}).get("error", "")
        return bad_request(f"the request body is not valid JSON: {why}".rstrip(": "))
    param = _param_path(tuple(first.get("loc", ())))
    if first.get("type") == "missing" and param is None:
        return bad_request("a JSON request body is required")
    if param is None:  # the body as a whole
        if content_type and not _json_media_type(content_type):
            return bad_request(f"the request body must be a JSON object sent as Content-Type: application/json, "
                               f"not {content_type!r}")
        return bad_request("the request body must be a JSON object")
    messages = []
    for err in errors[:3]:
        where = _param_path(tuple(err.get("loc", ()))) or "body"
        messages.append(f"{where}: {err.get('msg', 'invalid')}")
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return bad_request("invalid request: " + "; ".join(messages) + more, param)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc, request.headers.get("content-type")).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        return APIError(exc.status_code, message, headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # A bug, not the client's fault: say so, in the same shape, and log it.
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return APIError(500, f"internal server error: {type(exc).__name__}",
                        code="internal_error").response()
