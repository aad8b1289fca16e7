"""Running the app under uvicorn: bind, start the engine in the background, and shut down gracefully.

SIGTERM (or Ctrl-C) starts a drain: new requests and /health get 503, in-flight requests run to completion for up
to --shutdown-timeout seconds, whatever is left is aborted, then uvicorn stops and the process exits 0. A second
signal skips the wait. If the engine cannot be built the process exits 1, so an orchestrator sees a crash loop
rather than a server that is 503 forever.
"""

import asyncio
import logging
import os
import socket
import sys

import uvicorn

from jaxllm import AsyncLLMEngine, EngineConfig, run_worker
from jaxllm.default_model import default_model_name
from serving.app import build_app
from serving.context import ServerContext
from serving.engine_host import EngineHost
from serving.metrics import ServerMetrics
from serving.options import ServerOptions
from serving.request_limits import DEFAULT_MAX_HEADER_BYTES

logger = logging.getLogger("jaxllm.serving")


class _DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, host: EngineHost, shutdown_timeout_s: float):
        super().__init__(config)
        self.host = host
        self.shutdown_timeout_s = shutdown_timeout_s
        self.exit_code = 0
        self._draining = False
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets=sockets)

    def handle_exit(self, sig: int, frame) -> None:
        # Not recorded in _captured_signals: uvicorn would re-raise it after serve(), and the process would die by
        # the signal instead of exiting 0 after a clean drain.
        if self._loop is None:
            self.should_exit = True
            return
        if self._draining:
            logger.info("second signal: exiting without waiting")
            self._loop.call_soon_threadsafe(self._exit_now)
            return
        self._draining = True
        logger.info("signal %d: draining in-flight requests (up to %.0f s)", sig, self.shutdown_timeout_s)
        self._loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._drain()))

    async def _drain(self) -> None:
        finished = await self.host.drain(self.shutdown_timeout_s)
        if not finished:
            logger.warning("shutdown timeout: aborted the requests still running")
        self.should_exit = True

    def _exit_now(self) -> None:
        async def abort_then_exit():
            self.host.draining = True
            await self.host.abort_all()  # streams end at once with finish_reason "abort"
            self.should_exit = True

        asyncio.ensure_future(abort_then_exit())

    def fail_startup(self) -> None:
        self.exit_code = 1
        self.should_exit = True


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _configure_logging(level: str) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    logging.getLogger("jaxllm").setLevel(logging.INFO)
    logging.getLogger("uvicorn").setLevel(level.upper() if level != "trace" else 5)


def _progress(phase: str, done: int, total: int) -> None:
    logger.info("start-up: %s %d/%d", phase, done, total)


def run(config: EngineConfig, options: ServerOptions) -> int:
    """Serve `config`'s engine as `options` say until a signal; -> the process's exit code."""
    _configure_logging(options.uvicorn_log_level)
    if config.node_rank > 0:  # a follower host: it runs node 0's steps and serves nothing
        run_worker(config)
        return 0
    names = list(options.served_model_name or [config.model or default_model_name()])

    def build_engine():
        logger.info("loading %s", config.model or f"the default model ({default_model_name()})")
        return AsyncLLMEngine(config, progress=_progress)

    # The queue limit counts engine requests the server has admitted: the running batch plus the allowed queue.
    max_in_flight = None if config.max_num_queued_reqs is None else config.max_num_seqs + config.max_num_queued_reqs
    host = EngineHost(build_engine, max_in_flight=max_in_flight, stall_timeout_s=options.engine_stall_timeout)
    ctx = ServerContext(host=host, metrics=ServerMetrics(host, names[0]), served_model_names=names,
                        chat_template=options.chat_template, log_requests=options.enable_log_requests,
                        max_log_len=options.max_log_len)
    sock = bind_socket(options.host, options.port)
    bound_host, bound_port = sock.getsockname()[:2]

    def on_ready() -> None:
        logger.info("ready: http://%s:%d/v1 (model %s)", bound_host, bound_port, names[0])

    app = build_app(ctx, options, on_fatal=lambda exc: server.fail_startup(), on_ready=on_ready)
    # h11 refuses a request head that trickles in past the limit; RequestLimitsMiddleware checks complete ones.
    uv_config = uvicorn.Config(app, log_level=options.uvicorn_log_level,
                               access_log=not options.disable_uvicorn_access_log,
                               h11_max_incomplete_event_size=DEFAULT_MAX_HEADER_BYTES, timeout_graceful_shutdown=5,
                               timeout_keep_alive=5, lifespan="on", log_config=None)
    server = _DrainingServer(uv_config, host, options.shutdown_timeout)
    # Printed before the model loads, so a supervisor (or a test) can poll /health, which is 503 until ready.
    logger.info("listening on http://%s:%d (model loading; /health is 503 until ready)", bound_host, bound_port)
    server.run(sockets=[sock])
    logger.info("server stopped (exit code %d)", server.exit_code)
    if host.engine is None and host.load_error is None:
        # Stopped while the engine was still loading: its thread is inside XLA's compiler. The interpreter's exit
        # would run under it (a traceback from the thread, once a C++ abort); leave now, as the thread would leave.
        logging.shutdown()
        os._exit(server.exit_code)
    return server.exit_code
