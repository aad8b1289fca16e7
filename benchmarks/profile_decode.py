"""Where a steady decode step's time goes: the whole engine step vs the jitted model step alone vs the sampler,
plus a jax.profiler trace of a few engine steps (kept with the results) and what the GPU did in it: kernels, busy
and wall time per step, idle share, the top kernels (benchmarks/trace_summary.py). With --prefill, the trace
covers the prefill-heavy steps instead: `batch` prompts of `context` tokens, chunked by max_num_batched_tokens
(after the same prompts' shapes ran once untraced, so nothing compiles inside the trace).

    python -m benchmarks.profile_decode --batch 1 --context 1024 --trace-dir /tmp/trace --output-json out.json
    python -m benchmarks.profile_decode --prefill --batch 16 --context 1024 --trace-dir /tmp/trace
"""

import argparse
import json
import time

import jax
import numpy as np

from benchmarks import trace_summary
from jaxllm import EngineConfig, LLMEngine, SamplingParams
from jaxllm.runtime import inputs

TRACED_STEPS = 10


def _mean_ms(fn, repeats: int = 50) -> float:
    """Mean time per call (under run-ahead a step's call time alternates around the device's: latency.run_batch)."""
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e3


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="benchmarks/configs/llama-3.1-8b")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--trace-dir", default=None)
    parser.add_argument("--prefill", action="store_true", help="trace the prompts' steps, not steady decoding")
    parser.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    parser.add_argument("--output-json", default=None, help="step timings and, with --trace-dir, the trace summary")
    args = parser.parse_args(argv)

    engine = LLMEngine(EngineConfig(model=args.model, load_format="dummy", dtype="bfloat16", enforce_eager=True,
                                    skip_tokenizer_init=True, max_model_len=4096,
                                    tensor_parallel_size=args.tensor_parallel_size))
    rng = np.random.default_rng(0)
    if args.prefill:
        return _profile_prefill(engine, args, rng)
    params = SamplingParams(temperature=0.0, max_tokens=2000, ignore_eos=True)
    for i in range(args.batch):
        ids = rng.integers(10, engine.model_config.vocab_size, args.context).tolist()
        engine.add_request(str(i), {"prompt_token_ids": ids}, params)
    started: set[str] = set()
    while len(started) < args.batch:  # run the prefills until every request decodes
        started.update(o.request_id for o in engine.step())
    for _ in range(5):
        engine.step()
    step_ms = _mean_ms(engine.step)

    runner = engine.runner
    # Each sequence reads pages of its own, as the engine's do: shared pages would keep a batch's KV in the L2
    # (docs/perf-notes.md#measuring-pitfalls-the-benchmarks-avoid).
    pages = args.context // runner.config.block_size + 3
    if args.batch * pages >= runner.kv_plan.num_blocks:
        raise SystemExit(f"the KV cache has {runner.kv_plan.num_blocks} blocks: too few for the model step alone")
    work = [inputs.SeqWork([5], args.context + 10, list(range(1 + s * pages, 1 + (s + 1) * pages)))
            for s in range(args.batch)]
    layout = runner.buckets.pick(args.batch, args.batch, decode_only=True)
    replicated = jax.sharding.NamedSharding(runner.mesh, jax.sharding.PartitionSpec())
    buffer = jax.device_put(inputs.pack(work, layout, runner.config.block_size), replicated)

    def model_only():
        runner.forward(buffer, layout).block_until_ready()

    model_ms = _mean_ms(model_only)
    print(f"batch {args.batch} ctx {args.context}: engine.step {step_ms:.2f} ms (mean), jitted model step alone, "
          f"waited for each time, {model_ms:.2f} ms", flush=True)
    result = {"batch": args.batch, "context": args.context, "engine_step_ms": step_ms, "model_step_ms": model_ms,
              "trace": None}
    return _trace_and_save(args, result, lambda: [engine.step() for _ in range(TRACED_STEPS)], TRACED_STEPS, top=10)


def _trace_and_save(args, result: dict, run, steps: int, *, top: int) -> dict:
    """With --trace-dir, profile `run()` (`steps` engine steps) and add what the GPU did; with --output-json, save."""
    if args.trace_dir:
        with trace_summary.trace(args.trace_dir):
            run()
        result["trace"] = trace_summary.summarize(args.trace_dir, steps=steps, top=top)
        print(trace_summary.format_summary(result["trace"]))
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=2)
    return result


def _profile_prefill(engine: LLMEngine, args, rng) -> dict:
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)

    def prompts_to_first_token(tag: str) -> tuple[float, int]:
        for i in range(args.batch):  # fresh random prompts: no prefix-cache hits
            ids = rng.integers(10, engine.model_config.vocab_size, args.context).tolist()
            engine.add_request(f"{tag}{i}", {"prompt_token_ids": ids}, params)
        start, steps = time.perf_counter(), 0
        while engine.has_unfinished_requests():
            engine.step()
            steps += 1
        return time.perf_counter() - start, steps

    prompts_to_first_token("warm")
    seconds, steps = prompts_to_first_token("timed")
    tokens = args.batch * args.context
    print(f"prefill of {args.batch} x {args.context} tokens: {seconds * 1e3:.1f} ms in {steps} steps, "
          f"{tokens / seconds:,.0f} tokens/s")
    result = {"batch": args.batch, "context": args.context, "prefill_s": seconds, "steps": steps, "trace": None}
    return _trace_and_save(args, result, lambda: prompts_to_first_token("traced"), steps, top=15)


if __name__ == "__main__":
    main()
