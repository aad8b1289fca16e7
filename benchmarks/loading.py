"""Loading a real safetensors checkpoint onto the GPU: seconds and GB/s, against the card's own ceilings.

    python -m benchmarks.loading --model benchmarks/configs/llama-3.1-8b --checkpoint-dir /tmp/ckpt-8b

No checkpoint can be downloaded here, so the first run writes one: the model's config.json, a synthetic tokenizer
(benchmarks/synthetic_model.py: the directory also serves, e.g. to benchmarks.startup) and its weights in
Hugging Face names and layout ([out, in] projections, bf16), random values, in shards of at most 5 GB with
model.safetensors.index.json, as `save_pretrained` does. Then, in one process, two single-stream ceilings (every
shard read into host memory by one thread, from the page cache the write left warm; one 1 GiB device_put), and
`load_model` itself, twice (the first load also compiles the on-device transpose programs), with the device memory
in use and the largest free block after each (the KV cache is sized from them).
"""

import argparse
import json
import os
import pathlib
import struct
import time

import jax
import ml_dtypes
import numpy as np

from benchmarks.memory import snapshot
from benchmarks.synthetic_model import make_model_dir
from jaxllm.loading import load_model
from jaxllm.model_config import ModelConfig
from jaxllm.models.state import state_dict

SHARD_BYTES = 5 * 10 ** 9
GB = 1e9


def hf_tensor_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """A Llama checkpoint's tensors, in HF names and shapes (Linear weights [out, in])."""
    c = config
    d, f, q, kv = c.hidden_size, c.intermediate_size, c.q_size, c.kv_size
    shapes = {"model.embed_tokens.weight": (c.vocab_size, d), "model.norm.weight": (d,)}
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, d)
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
                   p + "self_attn.q_proj.weight": (q, d), p + "self_attn.k_proj.weight": (kv, d),
                   p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, q),
                   p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
                   p + "mlp.down_proj.weight": (d, f)}
    return shapes


def write_checkpoint(config_dir: str, out_dir: str, *, shard_bytes: int = SHARD_BYTES) -> float:
    """Random bf16 weights in safetensors shards -> the bytes written. Values repeat a 64 MiB random block."""
    out = pathlib.Path(make_model_dir(config_dir, out_dir))  # config.json and a synthetic tokenizer
    shapes = hf_tensor_shapes(ModelConfig.from_pretrained(str(out)))
    block = (np.random.default_rng(0).standard_normal(2 ** 25, np.float32) * 0.02).astype(ml_dtypes.bfloat16)
    shards, current, size = [], [], 0
    for name, shape in shapes.items():
        nbytes = int(np.prod(shape)) * 2
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((name, shape, nbytes))
        size += nbytes
    shards.append(current)
    weight_map, total = {}, 0
    for k, tensors in enumerate(shards, 1):
        file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {}, 0
        for name, shape, nbytes in tensors:
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[name] = file
        encoded = json.dumps(header).encode()
        encoded += b" " * (-len(encoded) % 8)
        with open(out / file, "wb") as f:
            f.write(struct.pack("<Q", len(encoded)) + encoded)
            for _, _, nbytes in tensors:
                left = nbytes // 2
                while left:
                    n = min(left, block.size)
                    f.write(block[:n].tobytes())
                    left -= n
        total += offset
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return total


def read_ceiling(checkpoint_dir: str) -> float:
    """Bytes per second reading every shard into host memory (the page cache, once the write left it there)."""
    files = sorted(pathlib.Path(checkpoint_dir).glob("*.safetensors"))
    start, total = time.perf_counter(), 0
    for path in files:
        total += np.fromfile(path, dtype=np.uint8).nbytes
    return total / (time.perf_counter() - start)


def host_to_device_ceiling() -> float:
    host = np.ones(2 ** 30, np.uint8)
    jax.device_put(host).block_until_ready()  # warm-up
    start = time.perf_counter()
    jax.device_put(host).block_until_ready()
    return host.nbytes / (time.perf_counter() - start)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="benchmarks/configs/llama-3.1-8b")
    parser.add_argument("--checkpoint-dir", default="/tmp/jaxllm-checkpoint")
    parser.add_argument("--loads", type=int, default=2)
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args(argv)
    report = {"device": jax.devices()[0].device_kind}
    if not os.path.isfile(os.path.join(args.checkpoint_dir, "model.safetensors.index.json")):
        start = time.perf_counter()
        report["written_gb"] = write_checkpoint(args.model, args.checkpoint_dir) / GB
        report["write_s"] = time.perf_counter() - start
        print(f"wrote {report['written_gb']:.2f} GB of random bf16 weights in {report['write_s']:.1f} s", flush=True)
    report["read_gbps"] = read_ceiling(args.checkpoint_dir) / GB
    report["h2d_gbps"] = host_to_device_ceiling() / GB
    print(f"{report['device']}: read into host memory {report['read_gbps']:.1f} GB/s, host to device "
          f"{report['h2d_gbps']:.1f} GB/s", flush=True)
    report["loads"] = []
    for _ in range(args.loads):
        start = time.perf_counter()
        params = state_dict(load_model(args.checkpoint_dir, dtype="bfloat16")[0])
        jax.block_until_ready(params)
        seconds = time.perf_counter() - start
        nbytes = sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(params))
        row = {"seconds": seconds, "gbps": nbytes / seconds / GB, "param_gb": nbytes / GB}
        print(f"load_model: {seconds:.2f} s for {row['param_gb']:.2f} GB ({row['gbps']:.1f} GB/s)", flush=True)
        report["loads"].append({**row, "memory": snapshot("after load_model", jax.devices()[:1])})
        del params
    if args.output_json:
        pathlib.Path(args.output_json).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
