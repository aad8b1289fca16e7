"""Online serving, as `vllm bench serve`: streaming clients against the real server.

    python -m benchmarks.serving --model benchmarks/configs/llama-3.1-8b --load-format dummy \
        --request-rates 1,4,16,inf --concurrencies 1,8,32,128 --num-prompts 200 --input-len 1024 --output-len 128 \
        [--max-duration-s 60] [--server-args --max-model-len 4096 ...]

Starts `python -m serving.api_server` on 127.0.0.1 (or uses --url), sends token-id prompts with ignore_eos, and
prints per setting vLLM's result block: request and token throughput; TTFT, TPOT = (E2E - TTFT) / (out - 1), ITL
(every gap between streamed chunks) and E2E as mean / median / p99. Without --model the server's default model is
used. Every setting (and the warm-up) gets its own random prompts: with prefix caching on, reusing the ids of an
earlier setting would let its prefill hit the cache. --max-duration-s caps each setting: no request starts after it,
the ones in flight finish, and the figures cover the requests done.
"""

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import httpx
import numpy as np

from benchmarks.synthetic_model import make_model_dir

_DEFAULT_VOCAB = 1000  # token ids below this exist in any real tokenizer; used when the vocabulary is unknown


def card_name() -> str:
    """The accelerator's name as JAX reports it, asked of a child process that exits before the server starts: a
    JAX client here would take device memory the server is meant to size its KV cache from."""
    env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    done = subprocess.run([sys.executable, "-c", "from benchmarks.roofline import device_name; print(device_name())"],
                          capture_output=True, text=True, env=env, timeout=300)
    return done.stdout.strip() or f"unknown ({done.stderr.strip().splitlines()[-1:]})"


def vocab_size(model: str | None) -> int:
    """From config.json of a model directory, or the token list of a GGUF file (the default model is one)."""
    if model is None or model.endswith(".gguf"):
        from gguf import GGUFReader

        from jaxllm.default_model import default_model_path

        reader = GGUFReader(model or default_model_path())
        return len(reader.fields["tokenizer.ggml.tokens"].data)
    with open(os.path.join(model, "config.json")) as f:
        return json.load(f)["vocab_size"]


async def stream_completion(client: httpx.AsyncClient, model: str, prompt: list[int], output_len: int) -> dict:
    """One streamed completion: ok, token counts, TTFT, E2E, ITL and TPOT in seconds (or ok False and the error)."""
    body = {"model": model, "prompt": prompt, "max_tokens": output_len, "ignore_eos": True, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    chunks, output_tokens = [], None
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                return {"ok": False, "error": f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"}
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = json.loads(line[6:])
                if data.get("choices"):
                    chunks.append(time.perf_counter())
                elif data.get("usage"):
                    output_tokens = data["usage"]["completion_tokens"]
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    end = time.perf_counter()
    if not chunks:
        return {"ok": False, "error": "no token streamed"}
    output_tokens = len(chunks) if output_tokens is None else output_tokens
    return {"ok": True, "prompt_tokens": len(prompt), "output_tokens": output_tokens, "ttft": chunks[0] - start,
            "e2e": end - start, "itl": np.diff(chunks).tolist(),
            "tpot": (end - chunks[0]) / (output_tokens - 1) if output_tokens > 1 else None}


def _stats(values: list[float]) -> dict:
    if not values:
        return {"mean_ms": float("nan"), "median_ms": float("nan"), "p99_ms": float("nan")}
    ms = np.asarray(values) * 1e3
    return {"mean_ms": float(ms.mean()), "median_ms": float(np.median(ms)), "p99_ms": float(np.percentile(ms, 99))}


def summarize(results: list[dict], duration: float, *, rate: float, concurrency: int | None, sent: int,
              num_prompts: int) -> dict:
    ok = [r for r in results if r["ok"]]
    input_tokens = sum(r["prompt_tokens"] for r in ok)
    output_tokens = sum(r["output_tokens"] for r in ok)
    return {"rate": rate, "concurrency": concurrency, "num_prompts": num_prompts, "sent": sent,
            "completed": len(ok), "failed": len(results) - len(ok),
            "errors": sorted({r["error"] for r in results if not r["ok"]})[:5], "duration_s": duration,
            "total_input_tokens": input_tokens, "total_output_tokens": output_tokens,
            "requests_per_s": len(ok) / duration, "output_tokens_per_s": output_tokens / duration,
            "total_tokens_per_s": (input_tokens + output_tokens) / duration,
            "ttft": _stats([r["ttft"] for r in ok]), "tpot": _stats([r["tpot"] for r in ok if r["tpot"] is not None]),
            "itl": _stats([gap for r in ok for gap in r["itl"]]), "e2e": _stats([r["e2e"] for r in ok])}


async def run_setting(url: str, model: str, prompts: list[list[int]], output_len: int, *, rate: float,
                      concurrency: int | None, seed: int = 0, max_duration_s: float | None = None) -> dict:
    rng = np.random.default_rng(seed)
    limit = asyncio.Semaphore(concurrency or len(prompts))
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=1024)) as client:
        start = time.perf_counter()
        deadline = float("inf") if max_duration_s is None else start + max_duration_s

        async def limited(prompt):
            async with limit:
                if time.perf_counter() > deadline:
                    return None  # still queued for a concurrency slot when the cap came: never sent
                return await stream_completion(client, model, prompt, output_len)

        tasks = []
        for prompt in prompts:
            if time.perf_counter() > deadline:
                break
            tasks.append(asyncio.create_task(limited(prompt)))
            if rate != float("inf"):
                await asyncio.sleep(rng.exponential(1 / rate))
        results = [r for r in await asyncio.gather(*tasks) if r is not None]
        duration = time.perf_counter() - start
    return summarize(results, duration, rate=rate, concurrency=concurrency, sent=len(results),
                     num_prompts=len(prompts))


def format_result(r: dict) -> str:
    """vLLM's `bench serve` result block, same labels and layout."""
    lines = ["{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=50, c="="),
             "{:<40} {:<10}".format("Traffic request rate:", r["rate"]),
             "{:<40} {:<10}".format("Max request concurrency:", r["concurrency"] or "None"),
             "{:<40} {:<10}".format("Successful requests:", r["completed"]),
             "{:<40} {:<10}".format("Failed requests:", r["failed"])]
    if r["sent"] < r["num_prompts"]:
        lines.append("{:<40} {:<10}".format("Not sent (--max-duration-s):", r["num_prompts"] - r["sent"]))
    lines += ["{:<40} {:<10.2f}".format("Benchmark duration (s):", r["duration_s"]),
              "{:<40} {:<10}".format("Total input tokens:", r["total_input_tokens"]),
              "{:<40} {:<10}".format("Total generated tokens:", r["total_output_tokens"]),
              "{:<40} {:<10.2f}".format("Request throughput (req/s):", r["requests_per_s"]),
              "{:<40} {:<10.2f}".format("Output token throughput (tok/s):", r["output_tokens_per_s"]),
              "{:<40} {:<10.2f}".format("Total Token throughput (tok/s):", r["total_tokens_per_s"])]
    for key, title, name in (("ttft", "Time to First Token", "TTFT"),
                             ("tpot", "Time per Output Token (excl. 1st token)", "TPOT"),
                             ("itl", "Inter-token Latency", "ITL"), ("e2e", "End-to-end Latency", "E2EL")):
        lines.append("{s:{c}^{n}}".format(s=title, n=50, c="-"))
        for stat, label in (("mean_ms", "Mean"), ("median_ms", "Median"), ("p99_ms", "P99")):
            lines.append("{:<40} {:<10.2f}".format(f"{label} {name} (ms):", r[key][stat]))
    lines.append("=" * 50)
    for error in r["errors"]:
        lines.append(f"error: {error}")
    return "\n".join(lines)


def server_command(model: str | None, load_format: str, extra_args=()) -> list[str]:
    """`python -m serving.api_server` for a benchmark client: 127.0.0.1, a port the server picks (it logs it), model
    name "bench", no stats lines. A dummy-weight model gets a directory with a synthetic tokenizer beside its config."""
    if load_format == "dummy":
        if model is None:
            raise SystemExit("--load-format dummy needs --model: a directory with a config.json")
        model = make_model_dir(model, tempfile.mkdtemp(prefix="jaxllm-bench-"))
    return [sys.executable, "-m", "serving.api_server", *(["--model", model] if model else []),
            "--load-format", load_format, "--served-model-name", "bench", "--host", "127.0.0.1", "--port", "0",
            "--disable-log-stats", "--disable-uvicorn-access-log", *extra_args]


def start_server(args, extra_args: list[str] = (), *, timeout: float = 900) -> tuple[subprocess.Popen, str, str]:
    """Launch `python -m serving.api_server` on a free port of 127.0.0.1; return (process, base URL, log path) once
    /health answers 200."""
    log_path = tempfile.NamedTemporaryFile(suffix=".log", prefix="jaxllm-server-", delete=False).name
    proc = launch(server_command(args.model, args.load_format, extra_args), log_path)
    return proc, wait_healthy(proc, log_path, timeout), log_path


def launch(cmd: list[str], log_path: str, env: dict | None = None) -> subprocess.Popen:
    """Start the server command with its output in `log_path` (where wait_healthy reads the URL it listens on)."""
    with open(log_path, "w") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)


def wait_healthy(proc: subprocess.Popen, log_path: str, timeout: float, poll_s: float = 0.2) -> str:
    """The URL the server logs it listens on, once its /health answers 200."""
    deadline = time.monotonic() + timeout
    url = None
    while time.monotonic() < deadline:
        if url is None:
            match = re.search(r"listening on (http://[0-9.]+:\d+)", open(log_path).read())
            url = match and match.group(1)
        if url is not None:
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    return url
            except httpx.HTTPError:
                pass
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}:\n" + open(log_path).read()[-4000:])
        time.sleep(poll_s)
    stop_server(proc)
    raise TimeoutError(f"the server was not healthy after {timeout:.0f} s:\n" + open(log_path).read()[-4000:])


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=None, help="an already running server; else one is started")
    parser.add_argument("--model", default=None, help="model directory or .gguf; default: the server's default")
    parser.add_argument("--load-format", default="auto")
    parser.add_argument("--vocab-size", type=int, default=None,
                        help="prompt token ids are drawn below it; default: from the model, or 1000 with --url")
    parser.add_argument("--num-prompts", type=int, default=200)
    parser.add_argument("--input-len", type=int, default=1024)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--request-rates", default="1,4,16,inf")
    parser.add_argument("--concurrencies", default="1,8,32,128")
    parser.add_argument("--max-duration-s", type=float, default=None,
                        help="per setting: no request starts after this many seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--startup-timeout", type=float, default=900)
    parser.add_argument("--output-json", default=None)
    parser.add_argument("--server-args", nargs=argparse.REMAINDER, default=[],
                        help="everything after it goes to the server (last on the command line)")
    args = parser.parse_args(argv)

    card = card_name()
    print(f"card: {card}" + (" (this machine; the server is at --url)" if args.url else ""), flush=True)
    if args.vocab_size is not None:
        vocab = args.vocab_size
    elif args.url and args.model is None:
        vocab = _DEFAULT_VOCAB
    else:
        vocab = vocab_size(args.model)
    proc = None
    if args.url:
        url = args.url
    else:
        start = time.perf_counter()
        proc, url, log_path = start_server(args, args.server_args, timeout=args.startup_timeout)
        print(f"server healthy after {time.perf_counter() - start:.1f} s (log: {log_path})", flush=True)
    try:
        model = httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]
        rng = np.random.default_rng(args.seed)

        def fresh_prompts() -> list[list[int]]:
            return [rng.integers(10, vocab - 10, args.input_len).tolist() for _ in range(args.num_prompts)]

        # Warm-up at the benchmark's sizes (a few tokens each) so no setting pays a first-use compile.
        asyncio.run(run_setting(url, model, fresh_prompts(), min(args.output_len, 4), rate=float("inf"),
                                concurrency=None))
        settings = [(float(r), None) for r in args.request_rates.split(",") if r] + \
                   [(float("inf"), int(c)) for c in args.concurrencies.split(",") if c]
        results = []
        for i, (rate, concurrency) in enumerate(settings):
            r = asyncio.run(run_setting(url, model, fresh_prompts(), args.output_len, rate=rate,
                                        concurrency=concurrency, seed=args.seed + i,
                                        max_duration_s=args.max_duration_s))
            results.append(r)
            print(format_result(r), flush=True)
        print(f"\nSummary ({card}; {args.num_prompts} prompts of {args.input_len} tokens, {args.output_len} out):")
        print(f"{'rate':>6} {'conc':>5} {'ok':>5} {'req/s':>8} {'out tok/s':>10} {'TTFT med':>9} {'TTFT p99':>9} "
              f"{'TPOT med':>9} {'ITL p99':>8} {'E2E med':>9}  (ms)")
        for r in results:
            print(f"{r['rate']:>6} {r['concurrency'] or '-':>5} {r['completed']:>5} {r['requests_per_s']:>8.2f} "
                  f"{r['output_tokens_per_s']:>10.1f} {r['ttft']['median_ms']:>9.1f} {r['ttft']['p99_ms']:>9.1f} "
                  f"{r['tpot']['median_ms']:>9.2f} {r['itl']['p99_ms']:>8.2f} {r['e2e']['median_ms']:>9.1f}")
        report = {"card": card, "args": vars(args), "settings": results}
        if args.output_json:
            with open(args.output_json, "w") as f:
                json.dump(report, f, indent=2)
        return report
    finally:
        if proc is not None:
            stop_server(proc)


if __name__ == "__main__":
    main()
