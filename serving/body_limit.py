"""Request body size limit as raw ASGI middleware: refuses oversized bodies before anything buffers or parses them.

A declared Content-Length over the limit is answered 413 at once; a chunked body is counted as it arrives and the
request fails with 413 as soon as it passes the limit, so memory stays bounded either way.
"""

from serving.errors import APIError, send_asgi_error

DEFAULT_MAX_BODY_BYTES = 4 * 2**20


def _too_large(limit: int) -> APIError:
    return APIError(413, f"request body exceeds {limit} bytes", code="request_too_large")


class BodyLimitMiddleware:
    def __init__(self, app, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES):
        self.app = app
        self.limit = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = next((v for k, v in scope.get("headers", ()) if k == b"content-length"), None)
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
