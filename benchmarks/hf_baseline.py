"""The Hugging Face baseline: transformers `generate()` with static batches, random weights, bf16, on this card.

    python3 -m benchmarks.hf_baseline --config benchmarks/configs/llama-3.1-8b --batch-sizes 1,32,128 \
        --input-len 512 --output-len 128

Runs on the GPU machine (torch + transformers there; not a jaxllm dependency). Prints output tokens/s per batch
size; `benchmarks/throughput.py` with the same lengths gives jaxllm's side for the ratio.
"""

import argparse
import json
import time


def main(argv=None) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="benchmarks/configs/llama-3.1-8b")
    parser.add_argument("--batch-sizes", default="1,32,128")
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args(argv)

    with open(f"{args.config}/config.json") as f:
        config = LlamaConfig(**json.load(f))
    torch.manual_seed(0)
    start = time.perf_counter()
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    print(f"HF model built in {time.perf_counter() - start:.1f} s on {torch.cuda.get_device_name()}")
    results = {}
    generator = torch.Generator(device="cuda").manual_seed(0)
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        ids = torch.randint(10, config.vocab_size - 10, (batch, args.input_len), device="cuda", generator=generator)
        kwargs = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=4, min_new_tokens=4, **kwargs)  # warm-up
            torch.cuda.synchronize()
            start = time.perf_counter()
            out = model.generate(ids, max_new_tokens=args.output_len, min_new_tokens=args.output_len, **kwargs)
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        generated = (out.shape[1] - args.input_len) * batch
        results[batch] = {"elapsed_s": elapsed, "output_tokens_per_s": generated / elapsed}
        print(f"HF generate batch {batch:4d}: {generated / elapsed:9.1f} output tok/s ({elapsed:.1f} s)", flush=True)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
