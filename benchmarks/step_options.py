"""XLA options for the model step, compared in one process: decode step time and TTFT per variant.

    python -m benchmarks.step_options --cases 1x32,1x1024,64x1024
    python -m benchmarks.step_options -tp 2 --variants engine,collectives-outside-graph,nccl

Why: the step runs as a CUDA graph whose updates cost host time, see
docs/perf-notes.md#cuda-graph-updates-and-stable-buffer-addresses. Variants: the engine's options (command buffers
whose temporary buffers do not force an update), XLA's default update mode, its profiled mode (buffers seen at a
stable address are not watched), and command buffers off (kernels launched one by one, asynchronously); gemm options
for batch 256 (docs/perf-notes.md#xla-gemm-options-tried-at-batch-256). Under tensor parallelism: the all-reduces
left outside the CUDA graph, as XLA does by default, and on NCCL.
Each variant builds its engine with `runner.step_compiler_options` extended by the variant's options (this script
only; the engine's own choice lives in that function).
"""

import argparse
import json

from benchmarks.latency import parse_cases, run_batch
from jaxllm import EngineConfig, LLMEngine
from jaxllm.runtime import runner

VARIANTS = {  # options laid over the engine's own; None removes one, so XLA's default applies
    "engine": {},
    "xla-default-update": {"xla_gpu_command_buffer_update_mode": None},
    # XLA watches the first executions and gives every buffer that kept its address (weights, the donated KV
    # cache) a fixed one, so only commands touching the moving inputs and outputs would need an update.
    "skip-profiled": {"xla_gpu_command_buffer_update_mode": "SKIP_PROFILED"},
    "no-command-buffers": {"xla_gpu_enable_command_buffer": ""},
    # Batch 256 re-captures its cuBLAS gemms every launch: Triton gemms only (no cuBLAS candidate in the
    # autotuner), or the cuBLAS calls launched outside the graph.
    "triton-gemms": {"xla_gpu_cublas_fallback": False},  # a bool: XLA rejected the string "false"
    # The autotuner's whole Triton tiling space (split-K too), for batch 256's under-filled o_proj and qkv tiles.
    "exhaustive-tiling": {"xla_gpu_exhaustive_tiling_search": True},
    # Every gemm on cuBLAS (the autotuner's choice for gate/up varies by machine).
    "cublas-gemms": {"xla_gpu_enable_triton_gemm": False},
    "cublas-outside-graph": {
        "xla_gpu_enable_command_buffer": "FUSION,CUSTOM_CALL,CUDNN,CONDITIONAL,DYNAMIC_SLICE_FUSION"},
    # Tensor parallel only: the all-reduces outside the CUDA graph (XLA's default list), each splitting it in two;
    # and the all-reduces on NCCL rather than XLA's collective kernels.
    "collectives-outside-graph": {"xla_gpu_enable_command_buffer": None},
    "nccl": {"xla_gpu_experimental_use_collective_kernels": None},
}


def measure(variant: str, cases: list[tuple[int, int]], args) -> list[dict]:
    chosen = runner.step_compiler_options

    def with_variant(config, platform):
        options = {**chosen(config, platform), **VARIANTS[variant]}
        return {key: value for key, value in options.items() if value is not None}

    runner.step_compiler_options = with_variant
    try:
        engine = LLMEngine(EngineConfig(model=args.model, load_format="dummy", dtype="bfloat16", enforce_eager=True,
                                        skip_tokenizer_init=True, max_model_len=4096,
                                        tensor_parallel_size=args.tensor_parallel_size))
    finally:
        runner.step_compiler_options = chosen
    rows = []
    try:  # a variant XLA rejects fails at its first compile, here: free its KV cache for the next variant
        for batch, context in cases:
            run_batch(engine, batch=batch, context=context, decode_steps=4, seed=1)  # compile and warm up
            row = run_batch(engine, batch=batch, context=context, decode_steps=args.decode_steps)
            rows.append({"variant": variant, **row})
            print(f"{variant:20s} batch {batch:4d} ctx {context:5d}: decode step {row['decode_step_s'] * 1e3:7.2f} "
                  f"ms  TTFT {row['ttft_s'] * 1e3:8.1f} ms", flush=True)
    finally:
        engine.close()
    return rows


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="benchmarks/configs/llama-3.1-8b")
    parser.add_argument("--cases", default="1x32,1x1024,64x1024", help="batch x context, ...")
    parser.add_argument("--variants", default="engine,xla-default-update,skip-profiled,no-command-buffers")
    parser.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args(argv)
    cases = parse_cases(args.cases)
    rows = []
    for variant in args.variants.split(","):
        try:
            rows += measure(variant, cases, args)
        except Exception as exc:  # a variant XLA rejects: say so and go on to the next
            print(f"{variant}: failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}", flush=True)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
