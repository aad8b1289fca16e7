"""Errors in OpenAI's shape: one exception type the routes raise, and the handlers that render every failure.

Every failure a client can cause becomes `{"error": {"message", "type", "param", "code"}}` with a 4xx status; pydantic
and JSON errors are 400, never FastAPI's 422. Unexpected exceptions become a bare 500 whose body names no file, line
or exception text, so nothing about the host leaks.
"""

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger("jaxllm.serving")

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
          405: "invalid_request_error", 413: "invalid_request_error", 431: "invalid_request_error",
          500: "server_error", 503: "server_error"}


class APIError(Exception):
    """A failure to report to the client; `status` picks the HTTP code, `headers` e.g. Retry-After."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.status, self.message, param=self.param, code=self.code)


def error_body(status: int, message: str, *, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": _TYPES.get(status, "invalid_request_error"), "param": param,
                      "code": code}}


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def unavailable(message: str, code: str, retry_after: int = 1) -> APIError:
    return APIError(503, message, code=code, headers={"Retry-After": str(retry_after)})


def from_engine_value_error(exc: ValueError) -> APIError:
    """The engine's validation (SamplingParams, validate_request) raises ValueError naming the field: a 400."""
    from jaxllm.validation import ContextLengthExceededError

    message = str(exc) or "invalid request"
    if isinstance(exc, ContextLengthExceededError):
        return APIError(400, message, param="max_tokens" if "max_tokens" in message else "prompt",
                        code="context_length_exceeded")
    first_word = message.split(" ", 1)[0].split("[", 1)[0]  # "steering[3] must ..." names steering
    return APIError(400, message, param=first_word if first_word in _engine_fields() else None)


def _engine_fields() -> frozenset[str]:
    import dataclasses

    from jaxllm import SamplingParams

    return frozenset(f.name for f in dataclasses.fields(SamplingParams)) | {"prompt_token_ids"}


def pydantic_message(errors: list[dict]) -> tuple[str, str | None]:
    """The first pydantic error as (message, param); the input value itself is never echoed back."""
    if not errors:
        return "invalid request", None
    first = errors[0]
    loc = [str(part) for part in first.get("loc", ()) if part not in ("body",)]
    param = ".".join(loc) or None
    message = first.get("msg", "invalid value").removeprefix("Value error, ")
    return (f"{param}: {message}" if param else message), param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        message, param = pydantic_message(list(exc.errors()))
        return error_response(bad_request(message, param))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        messages = {404: "no such route", 405: "method not allowed"}
        message = messages.get(exc.status_code, "request failed")
        return JSONResponse(error_body(exc.status_code, message), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        logger.exception("unhandled error on %s", request.url.path)
        return JSONResponse(error_body(500, "internal server error", code="internal_error"), status_code=500)


async def send_asgi_error(send, err: APIError) -> None:
    """Sends an error response from raw ASGI middleware, before any route or body parsing ran."""
    body = json.dumps(err.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in err.headers.items()]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
