"""The decode-step cost of the research features (issue 20): plain vs hidden states of one layer vs of every layer
vs steering one layer on every row, at one batch and context, in one engine.

    python -m benchmarks.research_cost --model benchmarks/configs/llama-3.1-8b --load-format dummy --dtype bfloat16

Each timing prefills a fresh batch plain; once every request decodes, their params are switched to the mode's, so
the timed steps are decode steps of the whole batch with the feature on every row (the prefill's gathering is not
what is measured). Each mode is warmed up (its programs compiled) first, then the modes are timed in turns,
--rounds times; a mode's figure is the median over rounds of its mean step time (the mean: with run-ahead, step()
call times alternate around the device's step time).
"""

import argparse
import json
import time

import numpy as np

from jaxllm import EngineConfig, LLMEngine, SamplingParams


def mode_params(engine: LLMEngine, mode: str, max_tokens: int) -> SamplingParams:
    """The params a mode's rows decode with, validated (and resolved) by the engine."""
    c = engine.model_config
    research = {"plain": {}, "hidden_one_layer": dict(return_hidden_states=[c.num_layers // 2]),
                "hidden_all_layers": dict(return_hidden_states=True),
                "steer_one_layer": dict(steering={c.num_layers // 2: [0.01] * c.hidden_size})}[mode]
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **research)
    return engine.process_request("validate", [1], params).params


def prefill(engine: LLMEngine, *, batch: int, context: int, max_tokens: int, seed: int) -> list[str]:
    """Add `batch` plain requests of `context` random ids; step until every one has its first token."""
    rng = np.random.default_rng(seed)
    vocab = engine.model_config.vocab_size
    ids = [f"rc{seed}r{i}" for i in range(batch)]
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    for request_id in ids:
        engine.add_request(request_id, {"prompt_token_ids": rng.integers(10, vocab - 10, context).tolist()}, params)
    started = set()
    while len(started) < batch:
        started.update(o.request_id for o in engine.step() if o.outputs[0].token_ids)
    return ids


def decode_step_s(engine: LLMEngine, params: SamplingParams, *, batch: int, context: int, steps: int,
                  seed: int) -> float:
    """A fresh batch prefilled plain, switched to `params`, timed over `steps` decode steps, then aborted."""
    ids = prefill(engine, batch=batch, context=context, max_tokens=params.max_tokens, seed=seed)
    for request_id in ids:
        engine.scheduler.get_group(request_id).params = params
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    engine.abort_request(ids)
    while engine.has_unfinished_requests():
        engine.step()
    return float(np.mean(times[1:]))  # the first overlaps a step built before the switch


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="benchmarks/configs/llama-3.1-8b")
    parser.add_argument("--load-format", default="dummy")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--kernel-backend", default="auto")
    parser.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args(argv)

    engine = LLMEngine(EngineConfig(model=args.model, load_format=args.load_format, dtype=args.dtype,
                                    enforce_eager=True, skip_tokenizer_init=True, max_model_len=args.max_model_len,
                                    max_num_seqs=max(args.batch, 1), kernel_backend=args.kernel_backend,
                                    max_num_batched_tokens=args.max_num_batched_tokens,
                                    tensor_parallel_size=args.tensor_parallel_size))
    modes = ("plain", "hidden_one_layer", "hidden_all_layers", "steer_one_layer")
    params = {m: mode_params(engine, m, args.decode_steps + 8) for m in modes}
    shape = dict(batch=args.batch, context=args.context)
    for i, mode in enumerate(modes):  # warm-up: each mode's programs compiled
        decode_step_s(engine, params[mode], **shape, steps=3, seed=100 + i)
    samples = {m: [] for m in modes}
    for r in range(args.rounds):
        for i, mode in enumerate(modes):
            samples[mode].append(decode_step_s(engine, params[mode], **shape, steps=args.decode_steps,
                                               seed=r * len(modes) + i))
    engine.close()
    step = {m: float(np.median(samples[m])) for m in modes}
    print(f"batch {args.batch} ctx {args.context}, decode step (median of {args.rounds} rounds' means):")
    for mode in modes:
        print(f"  {mode:18s} {step[mode] * 1e3:8.2f} ms  x{step[mode] / step['plain']:.3f} of plain", flush=True)
    result = {"batch": args.batch, "context": args.context, "decode_step_s": step, "samples_s": samples,
              "ratio_to_plain": {m: step[m] / step["plain"] for m in modes}}
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
