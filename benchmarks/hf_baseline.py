"""The Hugging Face baseline: transformers `generate()` with static batches, random weights, bf16, on this card.

Random mode (one fixed shape per batch size):

    python3 -m benchmarks.hf_baseline --config benchmarks/configs/llama-3.1-8b --batch-sizes 1,32,128 \
        --input-len 512 --output-len 128

Same-workload mode: the requests of `benchmarks.throughput` (same lengths, same prompt token ids, drawn by its
`draw_workload` with the vocabulary of --config), run in request order in static batches of --batch-size:

    python3 -m benchmarks.hf_baseline --dataset sharegpt-like --num-prompts 500 --batch-size 64 [--seed 0]
    python3 -m benchmarks.throughput --dataset sharegpt-like --num-prompts 500 [--seed 0] \
        --model benchmarks/configs/llama-3.1-8b --load-format dummy --dtype bfloat16     # jaxllm's side

Each batch is left-padded to its longest prompt (with an attention mask) and generates its longest requested output
for every row (min_new_tokens = max_new_tokens, so no row stops early); only each request's own requested output
tokens count as useful. A row holds the batch's longest prompt plus its longest output (sharegpt-like: up to 1024 +
2044 tokens, 2,248 for 500 prompts in batches of 64); at 2048 tokens a row, batch 64 of Llama-3.1-8B needs ~17 GB of
KV cache, batch 256 ~69 GB. `--dataset random` draws what throughput.py draws with the
same --num-prompts / --input-len / --output-len / --seed (give them explicitly: the defaults differ).
--max-duration-s starts no batch after that many seconds; batches run in request order, so the requests done are
exactly those of `throughput.py --num-prompts <done>`, which the script prints.

Runs on the GPU machine (torch + transformers there; not a jaxllm dependency). Prints output tokens/s; the jaxllm /
HF ratio comes from running both in the same device call.
"""

import argparse
import json
import time

import numpy as np

from benchmarks.throughput import describe_dataset, draw_workload


def static_batches(prompt_lens: list[int], output_lens: list[int], batch_size: int) -> list[dict]:
    """Request-order batches: rows, padded width (longest prompt), tokens generated per row (longest output), and
    the useful output tokens (each row's own request)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    batches = []
    for start in range(0, len(prompt_lens), batch_size):
        rows = list(range(start, min(start + batch_size, len(prompt_lens))))
        batches.append({"rows": rows, "width": max(prompt_lens[r] for r in rows),
                        "new_tokens": max(output_lens[r] for r in rows),
                        "useful_tokens": sum(output_lens[r] for r in rows)})
    return batches


def left_pad(prompts: list[list[int]], width: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """input_ids i64[B, width] with the padding on the left, and attention_mask i64[B, width] (1 = real token)."""
    ids = np.full((len(prompts), width), pad_id, np.int64)
    mask = np.zeros((len(prompts), width), np.int64)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = prompt
        mask[row, width - len(prompt):] = 1
    return ids, mask


def _build_model(config_dir: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    with open(f"{config_dir}/config.json") as f:
        config = LlamaConfig(**json.load(f))
    torch.manual_seed(0)
    start = time.perf_counter()
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    print(f"HF model built in {time.perf_counter() - start:.1f} s on {torch.cuda.get_device_name()}", flush=True)
    return model, config


# No EOS: every row generates exactly max_new_tokens, as ignore_eos does on jaxllm's side.
GENERATE_KWARGS = dict(do_sample=False, pad_token_id=0, eos_token_id=None)


def run_random(args) -> dict:
    import torch

    model, config = _build_model(args.config)
    results = {}
    generator = torch.Generator(device="cuda").manual_seed(0)
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        ids = torch.randint(10, config.vocab_size - 10, (batch, args.input_len), device="cuda", generator=generator)
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=4, min_new_tokens=4, **GENERATE_KWARGS)  # warm-up
            torch.cuda.synchronize()
            start = time.perf_counter()
            out = model.generate(ids, max_new_tokens=args.output_len, min_new_tokens=args.output_len,
                                 **GENERATE_KWARGS)
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        generated = (out.shape[1] - args.input_len) * batch
        results[batch] = {"elapsed_s": elapsed, "output_tokens_per_s": generated / elapsed}
        print(f"HF generate batch {batch:4d}: {generated / elapsed:9.1f} output tok/s ({elapsed:.1f} s)", flush=True)
    return {"card": torch.cuda.get_device_name(), "mode": "random", "results": results}


def run_workload(args) -> dict:
    import torch

    model, config = _build_model(args.config)
    prompts, output_lens = draw_workload(dataset=args.dataset, num_prompts=args.num_prompts,
                                         input_len=args.input_len, output_len=args.output_len,
                                         vocab_size=config.vocab_size, seed=args.seed)
    print(describe_dataset(args.dataset, [len(p) for p in prompts], output_lens), flush=True)
    batches = static_batches([len(p) for p in prompts], output_lens, args.batch_size)

    def generate(batch: dict, new_tokens: int) -> int:
        ids, mask = left_pad([prompts[r] for r in batch["rows"]], batch["width"], pad_id=0)
        out = model.generate(torch.from_numpy(ids).cuda(), attention_mask=torch.from_numpy(mask).cuda(),
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens, **GENERATE_KWARGS)
        assert out.shape[1] == batch["width"] + new_tokens, (out.shape, batch["width"], new_tokens)
        return out.shape[0] * new_tokens

    with torch.inference_mode():
        generate(batches[0], 4)  # warm-up
        torch.cuda.synchronize()
        start = time.perf_counter()
        generated, done = 0, []
        for i, batch in enumerate(batches):
            generated += generate(batch, batch["new_tokens"])
            torch.cuda.synchronize()  # free: generate() already waits on the device every step
            done.append(batch)
            if args.verbose:
                print(f"  batch {i}: {len(batch['rows'])} rows, width {batch['width']}, {batch['new_tokens']} new "
                      f"tokens, {time.perf_counter() - start:.1f} s so far", flush=True)
            if args.max_duration_s is not None and time.perf_counter() - start > args.max_duration_s:
                break
    elapsed = time.perf_counter() - start
    rows = [r for batch in done for r in batch["rows"]]
    prompt_tokens = sum(len(prompts[r]) for r in rows)
    useful = sum(output_lens[r] for r in rows)
    result = {"card": torch.cuda.get_device_name(), "mode": "workload", "elapsed_s": elapsed,
              "num_requests": len(rows), "num_batches": len(done), "partial": len(rows) < len(prompts),
              "prompt_tokens": prompt_tokens, "output_tokens": useful, "generated_tokens": generated,
              "requests_per_s": len(rows) / elapsed, "total_tokens_per_s": (prompt_tokens + useful) / elapsed,
              "output_tokens_per_s": useful / elapsed, "synthetic_dataset": args.dataset == "sharegpt-like"}
    if result["partial"]:
        # Batches run in request order, so the requests done are exactly what `--num-prompts len(rows)` draws.
        print(f"PARTIAL: stopped after --max-duration-s with {len(rows)} of {len(prompts)} requests done; compare "
              f"with benchmarks.throughput --num-prompts {len(rows)}")
    print(f"HF generate, static batches of {args.batch_size}: {elapsed:.1f} s for {len(rows)} requests "
          f"({generated} tokens generated, {useful} of them requested)")
    print(f"Throughput: {result['requests_per_s']:.2f} requests/s, {result['total_tokens_per_s']:.2f} total tokens/s, "
          f"{result['output_tokens_per_s']:.2f} output tokens/s")
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="benchmarks/configs/llama-3.1-8b")
    parser.add_argument("--dataset", choices=["random", "sharegpt-like"], default=None,
                        help="same-workload mode: the requests benchmarks.throughput draws for these arguments")
    parser.add_argument("--num-prompts", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=64, help="same-workload mode: the static batch size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-sizes", default="1,32,128", help="random mode (no --dataset): batch sizes to time")
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--verbose", action="store_true", help="same-workload mode: a line per batch")
    parser.add_argument("--max-duration-s", type=float, default=None,
                        help="same-workload mode: start no new batch after this many seconds (for time-limited runs)")
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args(argv)

    result = run_workload(args) if args.dataset else run_random(args)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({**vars(args), **result}, f, indent=2)
    return result


if __name__ == "__main__":
    main()
