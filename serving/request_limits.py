"""Request size limits as raw ASGI middleware: oversized heads and bodies are refused before anything buffers or
parses them.

uvicorn's h11 limit stops a head that trickles in forever, but a large head that arrives in one read is parsed
whole, so the total header size is checked here too (431). A declared Content-Length over the body limit is
answered 413 at once; a chunked body is counted as it arrives and fails with 413 as soon as it passes the limit.
"""

from serving.errors import APIError, send_asgi_error

DEFAULT_MAX_BODY_BYTES = 4 * 2**20
DEFAULT_MAX_HEADER_BYTES = 64 * 2**10


def _too_large(limit: int) -> APIError:
    return APIError(413, f"request body exceeds {limit} bytes", code="request_too_large")


class RequestLimitsMiddleware:
    def __init__(self, app, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES):
        self.app = app
        self.limit = max_body_bytes
        self.max_header_bytes = max_header_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = scope.get("headers", ())
        if sum(len(k) + len(v) + 4 for k, v in headers) > self.max_header_bytes:
            err = APIError(431, f"request headers exceed {self.max_header_bytes} bytes", code="headers_too_large")
            return await send_asgi_error(send, err)
        declared = next((v for k, v in headers if k == b"content-length"), None)
        if declared is not None:
            if not declared.isdigit():
                return await send_asgi_error(send, APIError(400, "invalid Content-Length header"))
            if int(declared) > self.limit:
                return await send_asgi_error(send, _too_large(self.limit))

        received = 0

        async def counting_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise _too_large(self.limit)
            return message

        await self.app(scope, counting_receive, send)
