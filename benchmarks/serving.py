"""Online serving, as `vllm bench serve`: streaming clients against the real server.

    python -m benchmarks.serving --model benchmarks/configs/llama-3.1-8b --load-format dummy \
        --request-rates 1,4,16,inf --concurrencies 1,8,32,128 --num-prompts 200 --input-len 1024 --output-len 128

Starts `python -m serving.api_server` on 127.0.0.1 (or uses --url), sends token-id prompts with ignore_eos, and
reports per setting: request and output-token throughput; TTFT, TPOT = (E2E - TTFT) / (out - 1), ITL (every gap
between streamed chunks) and E2E as mean / median / p99.
"""

import argparse
import asyncio
import json
import re
import subprocess
import sys
import tempfile
import time

import httpx
import numpy as np

from benchmarks.synthetic_model import make_model_dir


async def _one(client: httpx.AsyncClient, prompt: list[int], output_len: int) -> dict:
    body = {"model": "bench", "prompt": prompt, "max_tokens": output_len, "ignore_eos": True, "temperature": 0,
            "stream": True}
    start = time.perf_counter()
    chunks = []
    async with client.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                if json.loads(line[6:])["choices"]:
                    chunks.append(time.perf_counter())
    end = time.perf_counter()
    return {"ttft": chunks[0] - start, "e2e": end - start, "itl": list(np.diff(chunks)),
            "tpot": (end - chunks[0]) / max(1, output_len - 1)}


async def run_setting(url: str, prompts: list[list[int]], output_len: int, *, rate: float, concurrency: int | None,
                      seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    limit = asyncio.Semaphore(concurrency or len(prompts))
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=1024)) as client:
        async def limited(prompt):
            async with limit:
                return await _one(client, prompt, output_len)

        start = time.perf_counter()
        tasks = []
        for prompt in prompts:
            tasks.append(asyncio.create_task(limited(prompt)))
            if rate != float("inf"):
                await asyncio.sleep(rng.exponential(1 / rate))
        results = await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start

    def stats(values):
        values = np.asarray(values) * 1e3
        return {"mean_ms": float(values.mean()), "median_ms": float(np.median(values)),
                "p99_ms": float(np.percentile(values, 99))}

    return {"rate": rate, "concurrency": concurrency, "requests_per_s": len(prompts) / elapsed,
            "output_tokens_per_s": len(prompts) * output_len / elapsed,
            "ttft": stats([r["ttft"] for r in results]), "tpot": stats([r["tpot"] for r in results]),
            "itl": stats([gap for r in results for gap in r["itl"]]), "e2e": stats([r["e2e"] for r in results])}


def start_server(args) -> tuple[subprocess.Popen, str]:
    model = make_model_dir(args.model, tempfile.mkdtemp(prefix="jaxllm-bench-")) if args.load_format == "dummy" \
        else args.model
    log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
    cmd = [sys.executable, "-m", "serving.api_server", "--model", model, "--load-format", args.load_format,
           "--served-model-name", "bench", "--port", "0", "--disable-log-stats", "--disable-uvicorn-access-log",
           *args.server_args]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + args.startup_timeout
    while time.monotonic() < deadline:
        match = re.search(r"listening on (http://[0-9.]+:\d+)", open(log.name).read())
        if match and httpx.get(match.group(1) + "/health", timeout=5).status_code == 200:
            return proc, match.group(1)
        if proc.poll() is not None:
            raise RuntimeError(open(log.name).read()[-4000:])
        time.sleep(1)
    proc.kill()
    raise TimeoutError(open(log.name).read()[-4000:])


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=None, help="an already running server; else one is started")
    parser.add_argument("--model", default="benchmarks/configs/llama-3.1-8b")
    parser.add_argument("--load-format", default="dummy")
    parser.add_argument("--server-args", nargs=argparse.REMAINDER, default=[])
    parser.add_argument("--num-prompts", type=int, default=200)
    parser.add_argument("--input-len", type=int, default=1024)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--request-rates", default="1,4,16,inf")
    parser.add_argument("--concurrencies", default="1,8,32,128")
    parser.add_argument("--startup-timeout", type=float, default=900)
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args(argv)

    proc, url = (None, args.url) if args.url else start_server(args)
    try:
        vocab = json.load(open(f"{args.model}/config.json"))["vocab_size"] if args.load_format == "dummy" else 1000
        rng = np.random.default_rng(0)
        prompts = [rng.integers(10, vocab - 10, args.input_len).tolist() for _ in range(args.num_prompts)]
        asyncio.run(run_setting(url, prompts[:4], 4, rate=float("inf"), concurrency=None))  # warm-up
        settings = [(float(r), None) for r in args.request_rates.split(",") if r] + \
                   [(float("inf"), int(c)) for c in args.concurrencies.split(",") if c]
        results = []
        for rate, concurrency in settings:
            r = asyncio.run(run_setting(url, prompts, args.output_len, rate=rate, concurrency=concurrency))
            results.append(r)
            print(f"rate {rate:>5} concurrency {concurrency or '-':>4}: {r['requests_per_s']:6.2f} req/s "
                  f"{r['output_tokens_per_s']:8.1f} out tok/s | TTFT mean {r['ttft']['mean_ms']:7.1f} median "
                  f"{r['ttft']['median_ms']:7.1f} p99 {r['ttft']['p99_ms']:7.1f} ms | TPOT mean "
                  f"{r['tpot']['mean_ms']:6.2f} p99 {r['tpot']['p99_ms']:6.2f} ms | ITL median "
                  f"{r['itl']['median_ms']:6.2f} p99 {r['itl']['p99_ms']:6.2f} ms | E2E mean {r['e2e']['mean_ms']:8.1f} ms",
                  flush=True)
        if args.output_json:
            with open(args.output_json, "w") as f:
                json.dump(results, f, indent=2)
        return results
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(60)


if __name__ == "__main__":
    main()
