"""Start-up to first token, cold and warm: the real server launched twice on one compile-cache directory.

    python -m benchmarks.startup --model benchmarks/configs/llama-3.1-8b --load-format dummy --dtype bfloat16 \
        [--max-model-len 8192] [--cache-dir DIR] [--server-args --max-num-seqs 256 ...]

Each run starts `python -m serving.api_server` on a free port of 127.0.0.1 and times, from the launch: /health
answering 200, and the first streamed token of one /v1/completions request sent at once after it. The phases come
from the server's own log lines (timestamps of: listening, weights loaded, KV cache planned, buckets compiled,
"engine ready in X s"). The first run gets an empty cache directory (cold), the second the same directory (warm).

The server has no flag for its persistent XLA compile cache: `jaxllm.compile_cache.default_dir()` puts it under
$XDG_CACHE_HOME/jaxllm/xla, so each launch gets XDG_CACHE_HOME=<cache dir> in its environment. Without --cache-dir
a fresh temporary directory is used (and left in place, its path printed).
"""

import argparse
import asyncio
import datetime
import json
import os
import re
import tempfile
import time

import httpx

from benchmarks.serving import card_name, launch, server_command, stop_server, stream_completion, wait_healthy

# (phase key, regex on the server log); the first match of each is taken, "compiled" the last.
_MARKERS = {
    "listening": r"listening on http://",
    "loading": r"start-up: loading weights 0/",
    "weights_loaded": r"start-up: loading weights (\d+)/\1\b",
    "compile_started": r"start-up: compiling buckets 0/",
    "compiled": r"start-up: compiling buckets (\d+)/\1\b",
    "ready": r"engine ready in ([0-9.]+) s",
}
_LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def parse_log(text: str, launched_at: float) -> dict:
    """Seconds from the launch to each marker found in the server log (asctime format, this machine's clock)."""
    found: dict = {}
    for line in text.splitlines():
        stamp = _LOG_TIME.match(line)
        if not stamp:
            continue
        t = datetime.datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp() - launched_at
        for key, pattern in _MARKERS.items():
            match = re.search(pattern, line)
            if match and (key not in found or key == "compiled"):
                found[key] = t
                if key == "ready":
                    found["engine_ready_reported_s"] = float(match.group(1))
    return found


def phases(marks: dict) -> dict:
    """Durations between the markers; None where the server did not log one (e.g. no compile with enforce_eager)."""
    def span(a, b):
        return marks[b] - marks[a] if a in marks and b in marks else None

    kv_end = "compile_started" if "compile_started" in marks else "ready"
    return {"to_listening_s": marks.get("listening"), "engine_init_s": span("listening", "loading"),
            "weights_s": span("loading", "weights_loaded"), "kv_cache_s": span("weights_loaded", kv_end),
            "compile_s": span("compile_started", "compiled"),
            "engine_ready_reported_s": marks.get("engine_ready_reported_s")}


def first_token(url: str, prompt_len: int, max_tokens: int) -> float:
    """Send one streamed completion; return the time (time.time()) its first token arrived."""
    async def request() -> dict:
        async with httpx.AsyncClient(base_url=url, timeout=600) as client:
            return await stream_completion(client, "bench", list(range(10, 10 + prompt_len)), max_tokens)

    sent = time.time()
    result = asyncio.run(request())
    if not result["ok"]:
        raise RuntimeError(f"the first request failed: {result['error']}")
    return sent + result["ttft"]


def run_once(cmd: list[str], cache_dir: str, log_path: str, *, timeout: float, prompt_len: int) -> dict:
    env = {**os.environ, "XDG_CACHE_HOME": cache_dir}
    launched_at = time.time()
    proc = launch(cmd, log_path, env)
    try:
        url = wait_healthy(proc, log_path, timeout, poll_s=0.05)
        healthy_at = time.time()
        token_at = first_token(url, prompt_len, max_tokens=8)
    finally:
        stop_server(proc)
    with open(log_path) as f:
        marks = parse_log(f.read(), launched_at)
    return {"health_200_s": healthy_at - launched_at, "first_token_s": token_at - launched_at,
            "first_request_ttft_s": token_at - healthy_at, **phases(marks), "log": log_path}


def _dir_size(path: str) -> tuple[int, int]:
    files = [os.path.join(root, name) for root, _, names in os.walk(path) for name in names]
    return len(files), sum(os.path.getsize(f) for f in files)


_ROWS = [("to_listening_s", "launch -> listening (imports)"), ("engine_init_s", "listening -> loading weights"),
         ("weights_s", "weights loaded"), ("kv_cache_s", "KV cache planned + allocated"),
         ("compile_s", "compile buckets"), ("engine_ready_reported_s", "engine ready (server's figure)"),
         ("health_200_s", "launch -> /health 200"), ("first_request_ttft_s", "first request TTFT"),
         ("first_token_s", "launch -> first token")]


def format_table(runs: dict) -> str:
    names = list(runs)
    lines = [f"{'seconds':<32}" + "".join(f"{n:>10}" for n in names)]
    for key, label in _ROWS:
        cells = [runs[n].get(key) for n in names]
        lines.append(f"{label:<32}" + "".join(f"{'-' if c is None else f'{c:.2f}':>10}" for c in cells))
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model directory or .gguf; default: the server's default")
    parser.add_argument("--load-format", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--cache-dir", default=None, help="must be empty or absent (the cold run); default: a new "
                                                          "temporary directory")
    parser.add_argument("--prompt-len", type=int, default=32, help="token ids in the first request's prompt")
    parser.add_argument("--timeout", type=float, default=900, help="seconds each launch may take to be healthy")
    parser.add_argument("--output-json", default=None)
    parser.add_argument("--server-args", nargs=argparse.REMAINDER, default=[],
                        help="everything after it goes to the server (last on the command line)")
    args = parser.parse_args(argv)

    cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="jaxllm-xla-cache-")
    if os.path.isdir(cache_dir) and os.listdir(cache_dir):
        parser.error(f"--cache-dir {cache_dir} is not empty: the first run must be cold")
    os.makedirs(cache_dir, exist_ok=True)
    cmd = server_command(args.model, args.load_format,
                         ["--dtype", args.dtype, *(["--max-model-len", str(args.max_model_len)] if args.max_model_len
                                                   else []), *args.server_args])

    card = card_name()
    print(f"card: {card}\ncompile cache: {cache_dir} (XDG_CACHE_HOME of the server)\nserver: {' '.join(cmd)}",
          flush=True)
    runs = {}
    for name in ("cold", "warm"):
        log_path = os.path.join(tempfile.gettempdir(), f"jaxllm-startup-{name}-{os.getpid()}.log")
        runs[name] = run_once(cmd, cache_dir, log_path, timeout=args.timeout, prompt_len=args.prompt_len)
        runs[name]["cache_files"], runs[name]["cache_bytes"] = _dir_size(cache_dir)
        print(f"{name}: first token {runs[name]['first_token_s']:.1f} s after launch; cache now "
              f"{runs[name]['cache_files']} files, {runs[name]['cache_bytes'] / 1e6:.1f} MB (log: {log_path})",
              flush=True)
    print(format_table(runs))
    report = {"card": card, "cache_dir": cache_dir, "server_cmd": cmd, "runs": runs}
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
