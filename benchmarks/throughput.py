"""Offline throughput, as `vllm bench throughput`: every request submitted at once to LLM.generate.

    python -m benchmarks.throughput --input-len 1024 --output-len 128 --num-prompts 1000 \
        --model <dir|gguf|omitted = default model> [--load-format dummy] [--dtype bfloat16]

Prompts are random token ids (fixed seed), ignore_eos=True so every request produces exactly --output-len tokens.
`--dataset sharegpt-like` draws (input, output) lengths from a fixed-seed synthetic distribution with mean ~210 in /
~190 out, prompt <= 1024 and prompt + output <= 2048 (the ShareGPT dataset itself cannot be downloaded here).
"""

import argparse
import json
import time

import numpy as np

from jaxllm import LLM, SamplingParams


def sharegpt_like_lengths(num: int, seed: int = 0) -> list[tuple[int, int]]:
    """Log-normal lengths fitted by eye to ShareGPT's published means; synthetic, say so when reporting."""
    rng = np.random.default_rng(seed)
    pairs = []
    while len(pairs) < num:
        i = int(rng.lognormal(mean=4.9, sigma=0.9))
        o = int(rng.lognormal(mean=4.9, sigma=0.8))
        if 4 <= i <= 1024 and 4 <= o and i + o <= 2048:
            pairs.append((i, o))
    return pairs


def make_requests(args, vocab_size: int) -> tuple[list[dict], list[SamplingParams]]:
    rng = np.random.default_rng(args.seed)
    if args.dataset == "sharegpt-like":
        lengths = sharegpt_like_lengths(args.num_prompts, args.seed)
    else:
        lengths = [(args.input_len, args.output_len)] * args.num_prompts
    prompts = [{"prompt_token_ids": rng.integers(10, vocab_size - 10, size=i).tolist()} for i, _ in lengths]
    params = [SamplingParams(temperature=1.0, top_p=1.0, ignore_eos=True, max_tokens=o) for _, o in lengths]
    return prompts, params


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--load-format", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--dataset", choices=["random", "sharegpt-like"], default="random")
    parser.add_argument("--input-len", type=int, default=1024)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--num-prompts", type=int, default=1000)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=None)
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--kv-cache-memory-bytes", type=int, default=None)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--skip-tokenizer-init", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args(argv)

    start = time.perf_counter()
    llm = LLM(model=args.model, load_format=args.load_format, dtype=args.dtype, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
              kv_cache_memory_bytes=args.kv_cache_memory_bytes, enforce_eager=args.enforce_eager, seed=args.seed,
              skip_tokenizer_init=args.skip_tokenizer_init)
    startup = time.perf_counter() - start
    prompts, params = make_requests(args, llm.llm_engine.model_config.vocab_size)
    warmup = min(len(prompts), args.max_num_seqs)
    llm.generate(prompts[:warmup], [SamplingParams(max_tokens=2, ignore_eos=True)] * warmup, use_tqdm=False)

    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outputs)
    output_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    result = {"elapsed_s": elapsed, "startup_s": startup, "requests_per_s": len(outputs) / elapsed,
              "total_tokens_per_s": (prompt_tokens + output_tokens) / elapsed,
              "output_tokens_per_s": output_tokens / elapsed, "num_requests": len(outputs),
              "prompt_tokens": prompt_tokens, "output_tokens": output_tokens}
    print(f"Start-up: {startup:.1f} s")
    print(f"Throughput: {result['requests_per_s']:.2f} requests/s, {result['total_tokens_per_s']:.2f} total tokens/s, "
          f"{result['output_tokens_per_s']:.2f} output tokens/s")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({**vars(args), **result}, f, indent=2)
    llm.close()
    return result


if __name__ == "__main__":
    main()
