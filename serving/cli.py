"""`jaxllm serve [MODEL] [flags]` / `python -m serving.api_server --model MODEL [flags]`: vLLM's flag names.

`make_parser()` is also what the deployment test runs the Kubernetes container args through, so the manifests
cannot drift from the flags.
"""

import argparse
import json
import os

from serving.request_limits import DEFAULT_MAX_BODY_BYTES

_DTYPES = ["auto", "half", "float16", "bfloat16", "float", "float32"]
_LOAD_FORMATS = ["auto", "safetensors", "gguf", "dummy"]
_LOG_LEVELS = ["critical", "error", "warning", "info", "debug", "trace"]


def _json_list(text: str) -> list[str]:
    """vLLM takes --allowed-origins '["https://a.example"]'; a bare comma list is accepted too."""
    try:
        value = json.loads(text)
    except ValueError:
        value = [part.strip() for part in text.split(",") if part.strip()]
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise argparse.ArgumentTypeError(f"expected a JSON list of strings, got {text!r}")
    return value


def _human_int(text: str) -> int:
    """4096, 4k, 32K, 1m: vLLM accepts these for --max-model-len."""
    units = {"k": 1000, "K": 1024, "m": 1000**2, "M": 1024**2}
    try:
        if text and text[-1] in units:
            return int(float(text[:-1]) * units[text[-1]])
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer such as 4096 or 4k, got {text!r}") from None


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jaxllm serve", description="OpenAI-compatible server for jaxllm (vLLM's flags).")
    p.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                   help="model directory or .gguf file (same as --model); default: SmolLM2-135M-Instruct")
    p.add_argument("--model", default=None, help="model directory or .gguf file")

    server = p.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 for all interfaces)")
    server.add_argument("--port", type=int, default=8000, help="port to bind; 0 picks a free one")
    server.add_argument("--served-model-name", nargs="+", default=None,
                        help="names the API answers to; the first is used in responses")
    server.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on /v1/* and friends")
    server.add_argument("--allowed-origins", type=_json_list, default=None, help="CORS origins; no CORS if unset")
    server.add_argument("--allowed-methods", type=_json_list, default=["*"])
    server.add_argument("--allowed-headers", type=_json_list, default=["*"])
    server.add_argument("--allow-credentials", action="store_true")
    server.add_argument("--chat-template", default=None, help="a chat template file, or the template text itself")
    server.add_argument("--max-log-len", type=int, default=None, help="prompt tokens to show in request logs")
    server.add_argument("--enable-log-requests", action="store_true", help="log every request's prompt and params")
    server.add_argument("--disable-log-stats", action="store_true", help="no periodic throughput/KV-usage log line")
    server.add_argument("--max-num-queued-reqs", type=int, default=None,
                        help="requests that may wait beyond --max-num-seqs before new ones get 503 + Retry-After")
    server.add_argument("--max-request-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES)
    server.add_argument("--shutdown-timeout", type=float, default=30.0,
                        help="seconds SIGTERM waits for in-flight requests before aborting them (0 = at once)")
    server.add_argument("--engine-stall-timeout", type=float, default=60.0,
                        help="seconds one busy engine step may take before /health reports the engine stalled")
    server.add_argument("--uvicorn-log-level", choices=_LOG_LEVELS, default="info")
    server.add_argument("--disable-uvicorn-access-log", action="store_true")

    engine = p.add_argument_group("engine")
    engine.add_argument("--tokenizer", default=None)
    engine.add_argument("--dtype", choices=_DTYPES, default="auto")
    engine.add_argument("--seed", type=int, default=0)
    engine.add_argument("--max-model-len", type=_human_int, default=None)
    engine.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    engine.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    engine.add_argument("--max-num-batched-tokens", type=int, default=None)
    engine.add_argument("--max-num-seqs", type=int, default=256)
    engine.add_argument("--block-size", type=int, default=16)
    engine.add_argument("--swap-space", type=float, default=4)
    engine.add_argument("--enforce-eager", action="store_true", help="compile buckets on first use, not at start-up")
    engine.add_argument("--quantization", "-q", default=None)
    engine.add_argument("--load-format", choices=_LOAD_FORMATS, default="auto")
    engine.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    engine.add_argument("--max-logprobs", type=int, default=20)
    engine.add_argument("--trust-remote-code", action="store_true")
    multihost = p.add_argument_group("multi-host (one model over several machines; -tp counts all their devices)")
    multihost.add_argument("--nnodes", "--num-nodes", type=int, default=1, help="hosts the model spans")
    multihost.add_argument("--node-rank", type=int, default=0,
                           help="0 serves HTTP and schedules; other ranks run node 0's steps")
    multihost.add_argument("--master-addr", default=None, help="node 0's address (the jax.distributed coordinator)")
    multihost.add_argument("--master-port", type=int, default=29501)
    multihost.add_argument("--headless", action="store_true", help="accepted for vLLM compatibility: ranks > 0 "
                                                                   "never serve HTTP")
    engine.add_argument("--allow-pickle", action="store_true",
                        help="allow .bin/.pt (pickle) checkpoints; refused by default, they can run code on load")
    engine.add_argument("--kernel-backend", "--attention-backend", choices=["auto", "reference", "xla", "triton"], default="auto")
    engine.add_argument("--disable-custom-all-reduce", action="store_true",
                        help="with -tp > 1 on GPU, keep every all-reduce on NCCL instead of XLA's collective kernels")
    engine.add_argument("--kv-cache-memory-bytes", type=_human_int, default=None,
                        help="fix the KV cache size instead of sizing it from free device memory")
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.model_tag and args.model and args.model_tag != args.model:
        parser.error(f"the model is given twice: {args.model_tag!r} and --model {args.model!r}")
    args.model = args.model or args.model_tag
    if args.chat_template and os.path.isfile(args.chat_template):
        with open(args.chat_template, encoding="utf-8") as f:
            args.chat_template = f.read()
    try:
        engine_config(args)
    except ValueError as exc:
        parser.error(str(exc))
    return args


def engine_config(args: argparse.Namespace):
    from jaxllm import EngineConfig

    return EngineConfig(
        model=args.model, tokenizer=args.tokenizer, dtype=args.dtype, quantization=args.quantization,
        tensor_parallel_size=args.tensor_parallel_size, gpu_memory_utilization=args.gpu_memory_utilization,
        max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, block_size=args.block_size, swap_space=args.swap_space,
        enforce_eager=args.enforce_eager, seed=args.seed, load_format=args.load_format,
        enable_prefix_caching=args.enable_prefix_caching, trust_remote_code=args.trust_remote_code,
        allow_pickle=args.allow_pickle, kernel_backend=args.kernel_backend,
        kv_cache_memory_bytes=args.kv_cache_memory_bytes, max_logprobs=args.max_logprobs,
        max_num_queued_reqs=args.max_num_queued_reqs, disable_custom_all_reduce=args.disable_custom_all_reduce,
        served_model_name=args.served_model_name[0] if args.served_model_name else None,
        nnodes=args.nnodes, node_rank=args.node_rank, master_addr=args.master_addr, master_port=args.master_port)


def main(argv: list[str] | None = None) -> int:
    import sys

    from serving.server import run

    return run(parse_args(list(sys.argv[1:] if argv is None else argv)))
