"""Offline throughput, as `vllm bench throughput`: every request submitted at once to LLM.generate.

    python -m benchmarks.throughput --input-len 1024 --output-len 128 --num-prompts 1000 \
        --model <dir|gguf|omitted = default model> [--load-format dummy] [--dtype bfloat16] [-tp 1]

Prompts are random token ids (fixed seed), ignore_eos=True so every request produces exactly its requested length.
`--dataset sharegpt-like` draws (input, output) lengths from a fixed-seed synthetic distribution with mean ~185 in /
~180 out, prompt <= 1024 and prompt + output <= 2048 (the ShareGPT dataset itself cannot be downloaded here).

Unless --no-roofline, the card's copy bandwidth and bf16 matmul rate are measured first, in the same run, and the
elapsed time is compared with the roofline: max(FLOP time, memory time), per GPU under tensor parallelism
(all-reduces not included). FLOP time = 2 x (layer params x (prompt + output tokens) + vocabulary-projection params
x output tokens) / matmul rate: the embedding is a gather, and only sampled rows reach the vocabulary projection.
Memory time = (forward passes x weight bytes read per pass (all but an untied embedding table, of which a pass
gathers only its tokens' rows) + KV bytes the decode passes read) / copy bandwidth. A lower bound on the passes is
max(longest output, ceil(output tokens / max_num_seqs)): one request's tokens come one pass after another, and a
pass samples at most one token for each of at most max_num_seqs sequences. A request of p prompt and o output tokens
reads the KV of p + t tokens to sample its token t, t = 1 .. o - 1 (token 0 comes from its prefill). ratio =
roofline / elapsed, so 1.0 is at the roofline.
"""

import argparse
import json
import math
import time

import numpy as np


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


def draw_workload(*, dataset: str, num_prompts: int, input_len: int, output_len: int, vocab_size: int,
                  seed: int) -> tuple[list[list[int]], list[int]]:
    """Prompt token ids and requested output lengths; `hf_baseline` draws the same ones through this function."""
    rng = np.random.default_rng(seed)
    if dataset == "sharegpt-like":
        lengths = sharegpt_like_lengths(num_prompts, seed)
    else:
        lengths = [(input_len, output_len)] * num_prompts
    prompts = [rng.integers(10, vocab_size - 10, size=i).tolist() for i, _ in lengths]
    return prompts, [o for _, o in lengths]


def make_requests(args, vocab_size: int, *, seed: int | None = None) -> tuple[list[dict], list]:
    from jaxllm import SamplingParams

    prompts, output_lens = draw_workload(dataset=args.dataset, num_prompts=args.num_prompts,
                                         input_len=args.input_len, output_len=args.output_len,
                                         vocab_size=vocab_size, seed=args.seed if seed is None else seed)
    params = [SamplingParams(temperature=1.0, top_p=1.0, ignore_eos=True, max_tokens=o) for o in output_lens]
    return [{"prompt_token_ids": p} for p in prompts], params


def describe_dataset(dataset: str, prompt_lens: list[int], output_lens: list[int]) -> str:
    text = (f"{len(prompt_lens)} requests, prompt mean {np.mean(prompt_lens):.0f} (max {max(prompt_lens)}) / output "
            f"mean {np.mean(output_lens):.0f} (max {max(output_lens)}) tokens")
    if dataset == "sharegpt-like":
        return (f"Dataset sharegpt-like: SYNTHETIC lengths (log-normal, fixed seed), not the ShareGPT dataset; "
                f"{text}")
    return f"Dataset random: {text}"


def roofline(*, layer_params: int, head_params: int, read_bytes: int, kv_bytes_per_token: int,
             prompt_lens: list[int], output_lens: list[int], max_num_seqs: int, copy_bandwidth: float,
             matmul_rate: float, tensor_parallel_size: int = 1) -> dict:
    """Lower bound on the run's time (see the module docstring), per GPU; every argument is a whole-model figure:
    `layer_params` all but the embedding and vocabulary projection, `head_params` the vocabulary projection's,
    `read_bytes` the weight bytes one forward pass reads."""
    passes = max(max(output_lens), math.ceil(sum(output_lens) / max_num_seqs))
    flops = 2 * (layer_params * (sum(prompt_lens) + sum(output_lens)) + head_params * sum(output_lens))
    flop_s = flops / (tensor_parallel_size * matmul_rate)
    # sum over t = 1 .. o - 1 of (p + t) = (o - 1) p + o (o - 1) / 2
    kv_tokens = sum((o - 1) * p + o * (o - 1) // 2 for p, o in zip(prompt_lens, output_lens))
    weight_s = passes * read_bytes / (tensor_parallel_size * copy_bandwidth)
    kv_s = kv_tokens * kv_bytes_per_token / (tensor_parallel_size * copy_bandwidth)
    return {"roofline_s": max(flop_s, weight_s + kv_s), "roofline_flop_s": flop_s, "roofline_weight_read_s": weight_s,
            "roofline_kv_read_s": kv_s, "roofline_forward_passes": passes}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--load-format", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--quantization", "-q", default=None, help="with --load-format dummy: random packed weights")
    parser.add_argument("--dataset", choices=["random", "sharegpt-like"], default="random")
    parser.add_argument("--input-len", type=int, default=1024)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--num-prompts", type=int, default=1000)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=None)
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--kv-cache-memory-bytes", type=int, default=None)
    parser.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--skip-tokenizer-init", action="store_true")
    parser.add_argument("--no-roofline", action="store_true",
                        help="skip measuring copy bandwidth and matmul rate (far too slow on a CPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args(argv)

    # Imported here, not at the top, so hf_baseline can reuse draw_workload without loading JAX next to torch.
    from benchmarks import roofline as ceilings
    from jaxllm import LLM, SamplingParams

    card = ceilings.device_name()
    print(f"card: {card}", flush=True)
    bandwidth = flops = None
    if not args.no_roofline:
        bandwidth, flops = ceilings.copy_bandwidth(), ceilings.matmul_rate()
        print(f"copy bandwidth {bandwidth / 1e12:.3g} TB/s, bf16 matmul {flops / 1e12:.3g} TFLOP/s", flush=True)

    start = time.perf_counter()
    llm = LLM(model=args.model, load_format=args.load_format, dtype=args.dtype, quantization=args.quantization,
              max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
              kv_cache_memory_bytes=args.kv_cache_memory_bytes, enforce_eager=args.enforce_eager, seed=args.seed,
              skip_tokenizer_init=args.skip_tokenizer_init, tensor_parallel_size=args.tensor_parallel_size)
    startup = time.perf_counter() - start
    vocab_size = llm.llm_engine.model_config.vocab_size
    prompts, params = make_requests(args, vocab_size)
    print(describe_dataset(args.dataset, [len(p["prompt_token_ids"]) for p in prompts],
                           [p.max_tokens for p in params]), flush=True)
    # Other prompts than the measured ones: with prefix caching on, warming up on the same ids would let the
    # measured run skip their prefill.
    warm_prompts, _ = make_requests(args, vocab_size, seed=args.seed + 1)
    warmup = min(len(warm_prompts), args.max_num_seqs)
    llm.generate(warm_prompts[:warmup], [SamplingParams(max_tokens=2, ignore_eos=True)] * warmup, use_tqdm=False)

    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    prompt_lens = [len(o.prompt_token_ids) for o in outputs]
    prompt_tokens = sum(prompt_lens)
    output_lens = [len(o.outputs[0].token_ids) for o in outputs]
    output_tokens = sum(output_lens)
    result = {"card": card, "elapsed_s": elapsed, "startup_s": startup, "requests_per_s": len(outputs) / elapsed,
              "total_tokens_per_s": (prompt_tokens + output_tokens) / elapsed,
              "output_tokens_per_s": output_tokens / elapsed, "num_requests": len(outputs),
              "prompt_tokens": prompt_tokens, "output_tokens": output_tokens,
              "synthetic_dataset": args.dataset == "sharegpt-like"}
    print(f"Start-up: {startup:.1f} s")
    print(f"Throughput: {result['requests_per_s']:.2f} requests/s, {result['total_tokens_per_s']:.2f} total tokens/s, "
          f"{result['output_tokens_per_s']:.2f} output tokens/s")
    if bandwidth is not None:
        costs = ceilings.model_costs(llm.llm_engine.runner.params, llm.llm_engine.model_config)
        bound = roofline(layer_params=costs.layer_params, head_params=costs.head_params, read_bytes=costs.read_bytes,
                         kv_bytes_per_token=costs.kv_bytes_per_token, prompt_lens=prompt_lens,
                         output_lens=output_lens, max_num_seqs=args.max_num_seqs, copy_bandwidth=bandwidth,
                         matmul_rate=flops, tensor_parallel_size=args.tensor_parallel_size)
        result.update(bound, copy_bandwidth=bandwidth, matmul_rate=flops, roofline_read_bytes=costs.read_bytes,
                      roofline_ratio=bound["roofline_s"] / elapsed)
        print(f"Roofline: {bound['roofline_s']:.2f} s (max of FLOPs {bound['roofline_flop_s']:.2f} s and memory: "
              f"weight reads {bound['roofline_weight_read_s']:.2f} s = {bound['roofline_forward_passes']} passes x "
              f"{costs.read_bytes / 1e9:.2f} GB, + KV reads {bound['roofline_kv_read_s']:.2f} s); achieved/roofline "
              f"throughput ratio {result['roofline_ratio']:.2f}")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({**vars(args), **result}, f, indent=2)
    llm.close()
    return result


if __name__ == "__main__":
    main()
