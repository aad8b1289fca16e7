"""Where a steady decode step's time goes: the whole engine step vs the jitted model step alone vs the sampler,
plus a jax.profiler trace of a few engine steps (kept with the results).

    python -m benchmarks.profile_decode --batch 1 --context 1024 --trace-dir /tmp/trace
"""

import argparse
import time

import jax
import numpy as np

from jaxllm import EngineConfig, LLMEngine, SamplingParams
from jaxllm.runtime import inputs


def _median_ms(fn, repeats: int = 20) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1e3


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="benchmarks/configs/llama-3.1-8b")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--trace-dir", default=None)
    parser.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    args = parser.parse_args(argv)

    engine = LLMEngine(EngineConfig(model=args.model, load_format="dummy", dtype="bfloat16", enforce_eager=True,
                                    skip_tokenizer_init=True, max_model_len=4096,
                                    tensor_parallel_size=args.tensor_parallel_size))
    rng = np.random.default_rng(0)
    params = SamplingParams(temperature=0.0, max_tokens=2000, ignore_eos=True)
    for i in range(args.batch):
        engine.add_request(str(i), {"prompt_token_ids": rng.integers(10, engine.model_config.vocab_size, args.context).tolist()}, params)
    started: set[str] = set()
    while len(started) < args.batch:  # run the prefills until every request decodes
        started.update(o.request_id for o in engine.step())
    for _ in range(5):
        engine.step()
    step_ms = _median_ms(engine.step)

    runner = engine.runner
    work = [inputs.SeqWork([5], args.context + 10, list(range(1, args.context // 16 + 3))) for _ in range(args.batch)]
    layout = runner.buckets.pick(args.batch, args.batch, decode_only=True)
    replicated = jax.sharding.NamedSharding(runner.mesh, jax.sharding.PartitionSpec())
    buffer = jax.device_put(inputs.pack(work, layout, runner.config.block_size), replicated)

    def model_only():
        runner.forward(buffer, layout).block_until_ready()

    model_ms = _median_ms(model_only)
    print(f"batch {args.batch} ctx {args.context}: engine.step {step_ms:.2f} ms, jitted model step alone "
          f"{model_ms:.2f} ms -> host + sampler + transfers {step_ms - model_ms:.2f} ms per step")
    if args.trace_dir:
        with jax.profiler.trace(args.trace_dir):
            for _ in range(10):
                engine.step()
        print(f"trace written to {args.trace_dir}")


if __name__ == "__main__":
    main()
