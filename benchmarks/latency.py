"""Latency, as `vllm bench latency`, plus the decode-step and TTFT figures of BENCHMARKS.md, each against the roofline
computed from this card's copy bandwidth and matmul rate measured in the same run.

    python -m benchmarks.latency --model benchmarks/configs/llama-3.1-8b --load-format dummy

L1: batch-1 decode ms/token at 32 / 1024 / 8192 context. S1: decode step time at batch 1 / 64 / 256 with 1k context.
TTFT: one 1024-token prompt on an idle engine, the median of --ttft-repeats. Prompts are random token ids;
ignore_eos; warm-up excluded.
With --trace-dir, each batch-1 measured run is a jax.profiler trace (its figures include the profiler's cost) in
which the time to the first token is the host annotation `ttft`; a line after the case's row says what the GPU did in
that window: kernels, busy time, the window's span, idle share and the top 5 kernels (benchmarks/trace_summary.py).
"""

import argparse
import contextlib
import gc
import json
import time

import jax
import numpy as np

from benchmarks import roofline, trace_summary
from jaxllm import EngineConfig, LLMEngine, SamplingParams


class GcPauses:
    """Python's garbage collections while in the block, as [generation, ms] pairs: a full collection stops the
    host, so a step that runs into one takes that much longer."""

    def __init__(self):
        self.pauses: list[list] = []
        self._started = 0.0

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.pauses.append([info["generation"], (time.perf_counter() - self._started) * 1e3])

    def __enter__(self) -> "GcPauses":
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc) -> None:
        gc.callbacks.remove(self._callback)


def run_batch(engine: LLMEngine, *, batch: int, context: int, decode_steps: int, seed: int = 0,
              annotate: bool = False) -> dict:
    """Submit `batch` requests of `context` prompt tokens; time the prefill, then `decode_steps` steps once every
    request decodes, and abort them. (Chunked prefill starts the first requests decoding while the last still
    prefill: had each stopped after a fixed number of tokens, the timed steps would run shrinking batches, and with
    enforce_eager compile each new size inside the timing.) With `annotate`, the time to the first tokens is a
    `ttft` TraceAnnotation for a profiler trace."""
    rng = np.random.default_rng(seed)
    vocab = engine.model_config.vocab_size
    ids = [f"b{batch}c{context}s{seed}r{i}" for i in range(batch)]
    prefill_steps = -(-batch * context // engine.runner.max_num_batched_tokens)
    params = SamplingParams(temperature=0.0, max_tokens=prefill_steps + decode_steps + 8, ignore_eos=True)
    ttft_window = contextlib.ExitStack()
    if annotate:
        ttft_window.enter_context(jax.profiler.TraceAnnotation("ttft"))
    start = time.perf_counter()
    for request_id in ids:
        engine.add_request(request_id, {"prompt_token_ids": rng.integers(10, vocab - 10, context).tolist()}, params)
    first_tokens, decode_times = 0, []
    with GcPauses() as collections:
        while len(decode_times) < decode_steps:
            step_start = time.perf_counter()
            outputs = engine.step()
            elapsed = time.perf_counter() - step_start
            if first_tokens == batch:
                decode_times.append(elapsed)
            first_tokens += sum(1 for o in outputs if len(o.outputs[0].token_ids) == 1)
            if first_tokens == batch and not decode_times:
                ttft = time.perf_counter() - start
                ttft_window.close()
    engine.abort_request(ids)
    while engine.has_unfinished_requests():
        engine.step()
    # The mean, not the median: with run-ahead a step() call returns the previous step's tokens, so call times can
    # alternate short and long around the device's step time, and only their mean is that time.
    return {"batch": batch, "context": context, "ttft_s": ttft,
            "decode_step_s": float(np.mean(decode_times)), "decode_step_median_s": float(np.median(decode_times)),
            "decode_steps_s": decode_times, "gc_pauses_ms": collections.pauses}


def time_to_first_token(engine: LLMEngine, *, context: int, repeats: int, seed: int = 2) -> list[float]:
    """Seconds from add_request to the first token of one `context`-token prompt on an idle engine, `repeats`
    times (one prompt's TTFT is a single prefill step: a single figure of it varied by 30% from run to run)."""
    rng = np.random.default_rng(seed)
    vocab = engine.model_config.vocab_size
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    times = []
    for i in range(repeats):
        ids = rng.integers(10, vocab - 10, context).tolist()
        start = time.perf_counter()
        engine.add_request(f"ttft{context}s{seed}r{i}", {"prompt_token_ids": ids}, params)
        while not any(o.finished for o in engine.step()):
            pass
        times.append(time.perf_counter() - start)
        while engine.has_unfinished_requests():
            engine.step()
    return times


def parse_cases(text: str) -> list[tuple[int, int]]:
    """"1x32,64x1024" -> [(1, 32), (64, 1024)]: (batch, context) pairs."""
    return [tuple(int(x) for x in case.split("x")) for case in text.split(",")]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="benchmarks/configs/llama-3.1-8b")
    parser.add_argument("--load-format", default="dummy")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--quantization", "-q", default=None, help="with --load-format dummy: random packed weights")
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--kernel-backend", default="auto")
    parser.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    parser.add_argument("--no-async-scheduling", action="store_true", help="one step at a time (the baseline)")
    parser.add_argument("--disable-custom-all-reduce", action="store_true", help="TP all-reduces on NCCL only")
    parser.add_argument("--cases", default="1x32,1x1024,1x8192,64x1024,256x1024", help="batch x context, ...")
    parser.add_argument("--ttft-repeats", type=int, default=9, help="TTFT of one prompt: the median of this many")
    parser.add_argument("--output-json", default=None)
    parser.add_argument("--trace-dir", default=None, help="profile each batch-1 measured run into DIR/b1c<context>")
    args = parser.parse_args(argv)

    bandwidth, flops = roofline.copy_bandwidth(), roofline.matmul_rate()
    print(f"card: {roofline.device_name()}  copy bandwidth {bandwidth / 1e12:.2f} TB/s  bf16 matmul "
          f"{flops / 1e12:.0f} TFLOP/s")
    start = time.perf_counter()
    engine = LLMEngine(EngineConfig(model=args.model, load_format=args.load_format, dtype=args.dtype,
                                    quantization=args.quantization, enforce_eager=True, skip_tokenizer_init=True,
                                    max_model_len=16384,
                                    max_num_batched_tokens=args.max_num_batched_tokens,
                                    kernel_backend=args.kernel_backend,
                                    async_scheduling=not args.no_async_scheduling,
                                    tensor_parallel_size=args.tensor_parallel_size,
                                    disable_custom_all_reduce=args.disable_custom_all_reduce))
    print(f"start-up (load + KV allocation, no compile): {time.perf_counter() - start:.1f} s")
    costs = roofline.model_costs(engine.runner.params, engine.model_config)
    rows = []
    for batch, context in parse_cases(args.cases):
        run_batch(engine, batch=batch, context=context, decode_steps=4, seed=1)  # compile and warm up these shapes
        trace_dir = f"{args.trace_dir}/b{batch}c{context}" if args.trace_dir and batch == 1 else None
        tracing = trace_summary.trace(trace_dir) if trace_dir else contextlib.nullcontext()
        with tracing:
            r = run_batch(engine, batch=batch, context=context, decode_steps=args.decode_steps,
                          annotate=trace_dir is not None)
        # Per GPU under tensor parallelism (each reads 1/tp of the weights and KV); all-reduces not included.
        tp = args.tensor_parallel_size
        floor = (costs.read_bytes + batch * context * costs.kv_bytes_per_token) / (tp * bandwidth)
        r["decode_roofline_s"] = floor
        r["decode_ratio"] = r["decode_step_s"] / floor
        if batch == 1:
            time_to_first_token(engine, context=context, repeats=1, seed=3)  # warm-up, other prompts: no cache hit
            r["ttft_samples_s"] = time_to_first_token(engine, context=context, repeats=args.ttft_repeats)
            r["ttft_s"] = float(np.median(r["ttft_samples_s"]))
            r["ttft_roofline_s"] = costs.prefill_flops(context) / (tp * flops)
            r["ttft_ratio"] = r["ttft_s"] / r["ttft_roofline_s"]
        rows.append(r)
        print(f"batch {batch:4d} ctx {context:5d}: decode step {r['decode_step_s'] * 1e3:7.2f} ms "
              f"(roofline {floor * 1e3:6.2f} ms, x{r['decode_ratio']:.2f})  TTFT {r['ttft_s'] * 1e3:8.1f} ms"
              + (f" (FLOP roofline {r['ttft_roofline_s'] * 1e3:.1f} ms, x{r['ttft_ratio']:.2f})" if batch == 1
                 else ""), flush=True)
        print(f"  median step {r['decode_step_median_s'] * 1e3:.2f} ms, slowest {max(r['decode_steps_s']) * 1e3:.1f}"
              f" ms; garbage collections while timed (generation, ms): "
              f"{[[g, round(ms, 1)] for g, ms in r['gc_pauses_ms'] if g > 0 or ms > 1]}", flush=True)
        if trace_dir:
            for device in trace_summary.summarize(trace_dir, top=5, annotation="ttft")["devices"]:
                print(f"  trace {trace_dir}, TTFT window, {trace_summary.one_line(device)}", flush=True)
    result = {"card": roofline.device_name(), "copy_bandwidth": bandwidth, "matmul_rate": flops,
              "weight_bytes_read": costs.read_bytes, "quantization": args.quantization, "rows": rows}
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=2)
    engine.close()
    return result


if __name__ == "__main__":
    main()
