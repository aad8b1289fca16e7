"""`--api-key` as raw ASGI middleware: every route but /health, /metrics and /version needs `Bearer <key>`.

The check runs on the normalised request path before routing, so spellings such as `//v1/models`,
`/v1/./models` or `/v1/../v1/models` are judged as the route they could reach; anything not exactly an exempt path
needs the key (default deny). Keys are compared as SHA-256 digests with `hmac.compare_digest`, so the time taken
reveals neither the key nor its length.
"""

import hashlib
import hmac
import posixpath
import re

from serving.errors import APIError, send_asgi_error

EXEMPT_PATHS = frozenset({"/health", "/metrics", "/version"})


def normalize_path(path: str) -> str:
    collapsed = re.sub(r"/+", "/", "/" + path)
    return posixpath.normpath(collapsed)


def _digest(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()


class APIKeyMiddleware:
    def __init__(self, app, api_key: str):
        self.app = app
        self._expected = _digest(api_key.encode())

    def _authorized(self, scope) -> bool:
        header = next((v for k, v in scope.get("headers", ()) if k == b"authorization"), b"")
        scheme, _, token = header.partition(b" ")
        ok_scheme = scheme.lower() == b"bearer"
        # Compare even when the scheme is wrong, so the branch taken does not depend on the key.
        ok_token = hmac.compare_digest(_digest(token), self._expected)
        return ok_scheme and ok_token

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        if normalize_path(scope.get("path", "/")) in EXEMPT_PATHS or self._authorized(scope):
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        err = APIError(401, "invalid or missing API key", code="invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})
        await send_asgi_error(send, err)
