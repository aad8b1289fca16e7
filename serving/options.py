"""ServerOptions: the server's own flags (binding, auth, CORS, logging, limits), vLLM's names and defaults.

Each field's metadata (jaxllm/option.py) is its `jaxllm serve` flag, as for EngineConfig's fields; serving/cli.py
builds the parser from both.
"""

import argparse
import dataclasses
import json

from jaxllm.option import option
from serving.request_limits import DEFAULT_MAX_BODY_BYTES

LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")
_SERVER = "server"


def json_list(text: str) -> tuple[str, ...]:
    """vLLM takes --allowed-origins '["https://a.example"]'; a bare comma list is accepted too."""
    try:
        value = json.loads(text)
    except ValueError:
        value = [part.strip() for part in text.split(",") if part.strip()]
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise argparse.ArgumentTypeError(f"expected a JSON list of strings, got {text!r}")
    return tuple(value)


@dataclasses.dataclass(frozen=True)
class ServerOptions:
    host: str = option("127.0.0.1", group=_SERVER, help="address to bind (0.0.0.0 for all interfaces)")
    port: int = option(8000, group=_SERVER, help="port to bind; 0 picks a free one")
    served_model_name: tuple[str, ...] | None = option(None, group=_SERVER, type=str, nargs="+",
                                                       help="names the API answers to; the first is used in "
                                                            "responses")
    api_key: str | None = option(None, group=_SERVER, help="require `Authorization: Bearer KEY` on /v1/* and "
                                                           "friends")
    allowed_origins: tuple[str, ...] | None = option(None, group=_SERVER, type=json_list,
                                                     help="CORS origins; no CORS if unset")
    allowed_methods: tuple[str, ...] = option(("*",), group=_SERVER, type=json_list)
    allowed_headers: tuple[str, ...] = option(("*",), group=_SERVER, type=json_list)
    allow_credentials: bool = option(False, group=_SERVER)
    chat_template: str | None = option(None, group=_SERVER, help="a chat template file, or the template text "
                                                                 "itself")
    max_log_len: int | None = option(None, group=_SERVER, help="prompt tokens to show in request logs")
    enable_log_requests: bool = option(False, group=_SERVER, help="log every request's prompt and params")
    disable_log_stats: bool = option(False, group=_SERVER, help="no periodic throughput/KV-usage log line")
    max_request_body_bytes: int = option(DEFAULT_MAX_BODY_BYTES, group=_SERVER)
    shutdown_timeout: float = option(30.0, group=_SERVER, help="seconds SIGTERM waits for in-flight requests "
                                                               "before aborting them (0 = at once)")
    engine_stall_timeout: float = option(60.0, group=_SERVER, help="seconds one busy engine step may take before "
                                                                   "/health reports the engine stalled")
    uvicorn_log_level: str = option("info", group=_SERVER, choices=LOG_LEVELS)
    disable_uvicorn_access_log: bool = option(False, group=_SERVER)
    headless: bool = option(False, group="multi-host", help="accepted for vLLM compatibility: ranks > 0 never "
                                                            "serve HTTP")

    def __post_init__(self):
        for name, ok, limit in (("port", 0 <= self.port <= 65535, "in [0, 65535]"),
                                ("max_request_body_bytes", self.max_request_body_bytes > 0, "> 0"),
                                ("shutdown_timeout", self.shutdown_timeout >= 0, ">= 0"),
                                ("engine_stall_timeout", self.engine_stall_timeout > 0, "> 0"),
                                ("max_log_len", self.max_log_len is None or self.max_log_len >= 0, ">= 0")):
            if not ok:
                raise ValueError(f"{name} must be {limit}, got {getattr(self, name)!r}")
