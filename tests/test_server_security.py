"""--api-key on every route but /health, /metrics and /version, whatever the path spelling; no CORS headers unless
configured, and the configured origins only when they are."""

import socket
import threading
import urllib.parse

import httpx
import pytest

from server_harness import API_KEY, MAIN_ARGS, InProcessServer, shared_server
from serving.app import build_app
from serving.auth import normalize_path
from serving.context import ServerContext
from serving.engine_host import EngineHost
from serving.metrics import ServerMetrics
from serving.options import ServerOptions

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def url(request):
    return shared_server(request, *MAIN_ARGS).url


def raw_request(url: str, target: str, headers: dict[str, str] | None = None, method: str = "GET",
                body: bytes = b"") -> tuple[int, bytes]:
    """Sends the request target byte for byte (httpx would normalise `..` and `//` away)."""
    parsed = urllib.parse.urlsplit(url)
    lines = [f"{method} {target} HTTP/1.1", f"Host: {parsed.netloc}", "Connection: close",
             f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    with socket.create_connection((parsed.hostname, parsed.port), timeout=30) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return int(data.split(b" ", 2)[1]), data


@pytest.mark.parametrize("target", ["/v1/models", "//v1/models", "/v1//models", "/v1/./models", "/v1/../v1/models",
                                    "/health/../v1/models", "/v1/models/", "/V1/models", "/%2e%2e/v1/models",
                                    "/v1/models?x=/health", "/tokenize", "/detokenize", "/v1/completions"])
def test_every_spelling_of_a_guarded_route_needs_the_key(url, target):
    status, _ = raw_request(url, target)
    assert status == 401
    status, data = raw_request(url, target, {"Authorization": "Bearer wrong-key"})
    assert status == 401 and b"invalid_api_key" in data


def test_the_right_key_opens_guarded_routes(url):
    assert httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200
    assert httpx.get(f"{url}/v1/models", headers={"Authorization": f"bearer {API_KEY}"}).status_code == 200
    status, _ = raw_request(url, "/v1/../v1/models", {"Authorization": f"Bearer {API_KEY}"})
    assert status in (200, 404)


@pytest.mark.parametrize("header", [API_KEY, f"Basic {API_KEY}", f"Bearer {API_KEY}x", f"Bearer {API_KEY[:-1]}",
                                    "Bearer", f"Token {API_KEY}", f"Bearer  {API_KEY}"])
def test_near_miss_keys_are_refused(url, header):
    r = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "x"}, headers={"Authorization": header})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert r.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("path", ["/health", "/metrics", "/version"])
def test_probes_and_metrics_need_no_key(url, path):
    assert httpx.get(f"{url}{path}").status_code == 200


def test_no_cors_headers_unless_configured(url):
    preflight = httpx.options(f"{url}/v1/models", headers={"Origin": "https://evil.example",
                                                           "Access-Control-Request-Method": "GET"})
    assert "access-control-allow-origin" not in preflight.headers
    r = httpx.get(f"{url}/health", headers={"Origin": "https://evil.example"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_paths_normalise_before_the_exemption_check():
    assert normalize_path("//v1/models") == "/v1/models"
    assert normalize_path("/v1/../v1/models") == "/v1/models"
    assert normalize_path("/health/../v1/models") == "/v1/models"
    assert normalize_path("/../../health") == "/health"
    assert normalize_path("") == "/"


@pytest.fixture(scope="module")
def cors_server():
    """Only the ASGI layers matter here, so the engine never finishes loading (its factory waits on a gate)."""
    gate = threading.Event()

    def never_ready():
        gate.wait(120)
        raise RuntimeError("not needed")

    host = EngineHost(never_ready)
    ctx = ServerContext(host=host, metrics=ServerMetrics(host, "cors"), served_model_names=["cors"])
    options = ServerOptions(api_key="k", allowed_origins=("https://ok.example",), allowed_methods=("GET", "POST"))
    server = InProcessServer(build_app(ctx, options))
    yield server.url
    gate.set()
    server.stop()


def test_configured_cors_allows_only_the_listed_origin(cors_server):
    ok = httpx.options(f"{cors_server}/v1/models", headers={"Origin": "https://ok.example",
                                                             "Access-Control-Request-Method": "GET"})
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "https://ok.example"
    bad = httpx.options(f"{cors_server}/v1/models", headers={"Origin": "https://evil.example",
                                                              "Access-Control-Request-Method": "GET"})
    assert "access-control-allow-origin" not in bad.headers
    # A refused key still carries CORS headers, so the browser can show the 401.
    denied = httpx.get(f"{cors_server}/v1/models", headers={"Origin": "https://ok.example"})
    assert denied.status_code == 401 and denied.headers["access-control-allow-origin"] == "https://ok.example"


def test_health_is_503_while_the_engine_loads(cors_server):
    r = httpx.get(f"{cors_server}/health")
    assert r.status_code == 503 and r.json()["error"]["message"] == "starting"
    r = httpx.get(f"{cors_server}/v1/models", headers={"Authorization": "Bearer k"})
    assert r.status_code == 503 and r.headers["retry-after"] and r.json()["error"]["code"] == "server_starting"
