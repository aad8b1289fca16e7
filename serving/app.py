"""The FastAPI app: routes, error handlers and the ASGI guards (CORS, API key, body limit) around them."""

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from jaxllm.validation import validate_prompt_token_ids
from serving.auth import APIKeyMiddleware
from serving.chat import create_chat_completion
from serving.completions import create_completion
from serving.context import ServerContext
from serving.errors import bad_request, error_body, install_error_handlers
from serving.options import ServerOptions
from serving.protocol import DetokenizeRequest, ModelCard, ModelList, TokenizeRequest, parse_body
from serving.request_limits import RequestLimitsMiddleware
from serving.stats_log import log_stats_forever

logger = logging.getLogger("jaxllm.serving")
STATS_INTERVAL_S = 10.0  # vLLM's periodic stats line; --disable-log-stats turns it off


def build_app(ctx: ServerContext, options: ServerOptions, on_fatal: Callable[[BaseException], None] = lambda e: None,
              on_ready: Callable[[], None] = lambda: None) -> FastAPI:
    """The ASGI app. Its lifespan starts loading the engine in the background, so /health answers 503 meanwhile;
    `on_fatal` is called if the engine cannot be built, `on_ready` once it serves."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        stats_task: list[asyncio.Task] = []

        async def start():
            started = time.monotonic()
            try:
                await ctx.host.load()
            except Exception as exc:  # noqa: BLE001 - reported once, then the process exits non-zero
                logger.error("engine failed to start: %s: %s", type(exc).__name__, exc)
                on_fatal(exc)
                return
            quantization = ctx.host.engine.quantization
            logger.info("engine ready in %.1f s; serving %s (max_model_len %d, %s)", time.monotonic() - started,
                        ", ".join(ctx.served_model_names), ctx.host.engine.max_model_len,
                        f"quantization {quantization}" if quantization else "dense")
            if not options.disable_log_stats:
                stats_task.append(asyncio.create_task(log_stats_forever(ctx.host.engine, STATS_INTERVAL_S)))
            on_ready()

        loader = asyncio.create_task(start())
        try:
            yield
        finally:
            loader.cancel()
            for task in stats_task:
                task.cancel()
            await ctx.host.shutdown()

    app = FastAPI(title="jaxllm OpenAI-compatible server", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    install_error_handlers(app)
    _add_routes(app, ctx)
    # Added innermost first: requests pass CORS, then the API key, then the size limits, then the routes.
    app.add_middleware(RequestLimitsMiddleware, max_body_bytes=options.max_request_body_bytes)
    if options.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=options.api_key)
    if options.allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(options.allowed_origins),
                           allow_methods=list(options.allowed_methods), allow_headers=list(options.allowed_headers),
                           allow_credentials=options.allow_credentials)
    return app


def _add_routes(app: FastAPI, ctx: ServerContext) -> None:
    @app.get("/health")
    async def health():
        status = ctx.host.health()
        if status.ok:
            return Response(status_code=200)
        return JSONResponse(error_body(503, status.reason, code="unhealthy"), status_code=503,
                            headers={"Retry-After": "5"})

    @app.get("/metrics")
    async def metrics():
        return Response(ctx.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/version")
    async def version():
        from jaxllm import __version__

        return {"version": __version__}

    @app.get("/v1/models")
    async def models():
        engine = ctx.host.ready_engine()
        cards = [ModelCard(id=name, root=ctx.model_name, max_model_len=engine.max_model_len,
                           quantization=engine.quantization)
                 for name in ctx.served_model_names]
        return ModelList(data=cards).model_dump()

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await create_completion(request, ctx)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await create_chat_completion(request, ctx)

    @app.post("/tokenize")
    async def tokenize(request: Request):
        body = parse_body(await request.body(), request.headers.get("content-type"), TokenizeRequest)
        ctx.check_model(body.model)
        engine = ctx.host.ready_engine()
        if body.messages is not None:
            messages = [m.as_template_message() for m in body.messages]
            tokens = await ctx.chat_prompt_ids(engine, messages, body.add_generation_prompt)
        else:
            tokens = await ctx.encode(engine, body.prompt, body.add_special_tokens)
        return {"count": len(tokens), "max_model_len": engine.max_model_len, "tokens": tokens}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        body = parse_body(await request.body(), request.headers.get("content-type"), DetokenizeRequest)
        ctx.check_model(body.model)
        engine = ctx.host.ready_engine()
        if body.tokens:
            try:
                validate_prompt_token_ids(body.tokens, vocab_size=engine.tokenizer.vocab_size)
            except ValueError as exc:
                raise bad_request(str(exc).replace("prompt_token_ids", "tokens"), "tokens") from None
        return {"prompt": engine.tokenizer.decode(body.tokens, skip_special_tokens=False)}
