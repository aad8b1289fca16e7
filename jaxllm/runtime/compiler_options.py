"""The XLA options the model step is compiled with: CUDA-graph recording and, under tensor parallelism, the
all-reduce kernels. Read by the runner's step jit and by the all-reduce benchmark."""

from jaxllm.config import EngineConfig


def step_compiler_options(config: EngineConfig, platform: str) -> dict[str, str]:
    """XLA options for the model step on GPU (none elsewhere).

    Command buffers: XLA runs the step as a CUDA graph, which it must update whenever a buffer the graph touches
    moves, and the step's inputs, outputs and temporaries move every step; at batch 1 the host's updates and
    launches took longer than the GPU's work. "SKIP_TEMP" keeps temporaries from forcing the update
    (docs/perf-notes.md#cuda-graph-updates-and-stable-buffer-addresses). At batch 256 the temporaries still move:
    XLA holds them in place only on its VMM allocator, which it takes only from XLA_FLAGS at start
    (docs/perf-notes.md#batch-256-still-updates-its-graph).

    All-reduces under tensor parallelism (two per layer, of [T, D] activations): vLLM uses a one-shot all-reduce
    kernel of its own unless --disable-custom-all-reduce; here XLA's one-shot / two-shot collective kernels take
    that place: one GPU host (vLLM's custom all-reduce is intra-node only), more than one device, not disabled.
    Alone they cost what NCCL costs; in the engine's step they were faster at batch 1 and 64
    (docs/perf-notes.md#all-reduces-inside-the-cuda-graph). The value is the DebugOptions enum's full name:
    per-compile options are parsed by proto reflection, which rejects the short "ALL_REDUCE" that XLA_FLAGS accepts.

    XLA's command buffers leave collectives out by default, so under tensor parallelism each all-reduce split the
    step's CUDA graph, each piece updated and launched by the host. The step records collectives too (the list is
    XLA's default, `_GRAPHED`, plus COLLECTIVES; per-compile options replace the list, and take neither the "+" form
    nor short names).
    """
    if platform not in ("gpu", "cuda"):
        return {}
    options = {"xla_gpu_command_buffer_update_mode": "SKIP_TEMP"}
    if config.tensor_parallel_size > 1:
        options["xla_gpu_enable_command_buffer"] = ",".join(_GRAPHED + ("COLLECTIVES",))
        if config.nnodes == 1 and not config.disable_custom_all_reduce:
            options["xla_gpu_experimental_use_collective_kernels"] = "COLLECTIVE_KERNEL_ALL_REDUCE"
    return options


# The commands XLA (jaxlib 0.11.2) records into command buffers by default.
_GRAPHED = ("FUSION", "CUBLAS", "CUBLASLT", "CUSTOM_CALL", "CUDNN", "CONDITIONAL", "DYNAMIC_SLICE_FUSION")
