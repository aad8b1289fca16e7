"""EngineConfig: every knob of the engine, with vLLM's names and defaults, validated once here."""

import dataclasses

from jaxllm.dtypes import DTYPE_CHOICES
from jaxllm.option import human_int, option, option_of
from pallas_kernels.backend import BACKENDS

LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")
# `quantization`: None takes the checkpoint's; vLLM's Marlin names are aliases (the kernels are pallas_kernels').
QUANTIZATION_METHODS = ("awq", "gptq", "compressed-tensors", "fp8", "gguf")
QUANTIZATION_ALIASES = {"awq_marlin": "awq", "gptq_marlin": "gptq"}
BLOCK_SIZES = (8, 16, 32, 64)

# On CPU there is no device memory to measure: the KV cache gets this many bytes unless configured.
DEFAULT_CPU_KV_CACHE_BYTES = 512 * 2**20
# The chunked-prefill token budget when none is given (vLLM uses 8192-16384 on 80 GB cards; the CPU is far slower).
DEFAULT_MAX_NUM_BATCHED_TOKENS = {"gpu": 8192, "cpu": 512}
_MULTI_HOST = "multi-host"


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Engine configuration; the field names are vLLM's `LLM(...)` / `jaxllm serve` arguments, and each field's
    metadata (jaxllm/option.py) is its `jaxllm serve` flag."""

    model: str | None = option(None, help="model directory or .gguf file; default: SmolLM2-135M-Instruct")
    tokenizer: str | None = option(None, help="tokenizer directory or .gguf file; default: the model's")
    dtype: str = option("auto", choices=DTYPE_CHOICES, help="weight and activation dtype; auto: the checkpoint's")
    quantization: str | None = option(None, flags=("-q",), choices=(*QUANTIZATION_METHODS, *QUANTIZATION_ALIASES),
                                      help="the checkpoint's quantization method (default: config.json's "
                                           "quantization_config, or the GGUF file's types); with --load-format dummy, "
                                           "random weights quantized so")
    tensor_parallel_size: int = option(1, flags=("-tp",), help="devices the model is sharded over")
    gpu_memory_utilization: float = option(0.9, help="fraction of device memory for weights, activations and KV")
    max_model_len: int | None = option(None, type=human_int, help="context length (4096, 4k, 32K); default: the "
                                                                  "model's")
    max_num_seqs: int = option(256, help="sequences in one batch")
    max_num_batched_tokens: int | None = option(None, help="tokens in one step (chunked prefill's budget)")
    block_size: int = option(16, help=f"tokens per KV cache block, one of {BLOCK_SIZES}")
    swap_space: float = option(4, help="GiB of host memory for swapped-out KV blocks per device")
    enforce_eager: bool = option(False, help="compile buckets on first use, not at start-up")
    seed: int = option(0)
    load_format: str = option("auto", choices=LOAD_FORMATS, help="dummy: random weights, for benchmarks")
    enable_prefix_caching: bool = option(True, help="reuse the KV blocks of shared prompt prefixes")
    trust_remote_code: bool = option(False)
    allow_pickle: bool = option(False, help="allow .bin/.pt (pickle) checkpoints; refused by default, they can run "
                                            "code on load")
    kv_cache_memory_bytes: int | None = option(None, type=human_int, help="fix the KV cache size instead of sizing "
                                                                          "it from free device memory")
    kernel_backend: str = option("auto", choices=BACKENDS, aliases=("attention_backend",),
                                 help="which implementation of the attention kernels runs; auto: from the device")
    max_logprobs: int = option(20, help="the most logprobs a request may ask for")
    max_num_queued_reqs: int | None = option(None, group="server", help="requests that may wait beyond "
                                             "--max-num-seqs before new ones get 503 + Retry-After")
    served_model_name: str | None = option(None, cli=False)  # the server's flag takes several (serving/options.py)
    async_scheduling: bool = option(True, help="dispatch step N + 1 before reading step N's tokens (off: one step "
                                               "at a time)")
    skip_tokenizer_init: bool = option(False, cli=False)  # token ids in and out, no text: the server needs text
    # Process-wide side effects of building an engine, on by default:
    compile_cache: bool = option(True, help="JAX's persistent compilation cache in a user-private directory")
    freeze_gc: bool = option(True, help="gc.freeze() what start-up (and each new batch shape's first step) left: "
                                        "no GC pauses")
    # TP on one GPU host: the step's all-reduces may use XLA's collective kernels instead of NCCL (in place of
    # vLLM's custom all-reduce); True keeps them all on NCCL (runtime/compiler_options.py)
    disable_custom_all_reduce: bool = option(False, help="with -tp > 1 on GPU, keep every all-reduce on NCCL "
                                                         "instead of XLA's collective kernels")
    # Multi-host (vLLM's multi-node flags): one model over the devices of `nnodes` hosts through jax.distributed;
    # node 0 schedules, nodes 1.. run its steps (runtime/follower.py, over jaxllm.distributed's channel);
    # tensor_parallel_size spans all hosts.
    nnodes: int = option(1, flags=("--num-nodes",), group=_MULTI_HOST, help="hosts the model spans")
    node_rank: int = option(0, group=_MULTI_HOST, help="0 serves HTTP and schedules; other ranks run node 0's steps")
    master_addr: str | None = option(None, group=_MULTI_HOST, help="node 0's address (the jax.distributed "
                                                                   "coordinator)")
    master_port: int = option(29501, group=_MULTI_HOST)

    def __post_init__(self):
        _require(self.dtype in DTYPE_CHOICES, "dtype", f"must be one of {DTYPE_CHOICES}, got {self.dtype!r}")
        _require(self.load_format in LOAD_FORMATS, "load_format",
                 f"must be one of {LOAD_FORMATS}, got {self.load_format!r}")
        quantization_method(self.quantization)
        _require(self.tensor_parallel_size >= 1, "tensor_parallel_size", "must be >= 1")
        _require(0 < self.gpu_memory_utilization <= 1, "gpu_memory_utilization", "must be in (0, 1]")
        _require(self.max_model_len is None or self.max_model_len >= 1, "max_model_len", "must be >= 1")
        _require(self.max_num_seqs >= 1, "max_num_seqs", "must be >= 1")
        _require(self.max_num_batched_tokens is None or self.max_num_batched_tokens >= self.block_size,
                 "max_num_batched_tokens", f"must be >= block_size ({self.block_size})")
        _require(self.block_size in BLOCK_SIZES, "block_size", f"must be one of {BLOCK_SIZES}")
        _require(self.swap_space >= 0, "swap_space", "must be >= 0")
        _require(self.kv_cache_memory_bytes is None or self.kv_cache_memory_bytes > 0, "kv_cache_memory_bytes",
                 "must be > 0")
        _require(self.kernel_backend in BACKENDS, "kernel_backend", f"must be one of {BACKENDS}")
        _require(0 <= self.max_logprobs <= 20, "max_logprobs", "must be in [0, 20]")
        _require(self.nnodes >= 1, "nnodes", f"must be >= 1, got {self.nnodes}")
        _require(0 <= self.node_rank < self.nnodes, "node_rank",
                 f"must be in [0, nnodes - 1] = [0, {self.nnodes - 1}], got {self.node_rank}")
        _require(self.nnodes == 1 or bool(self.master_addr), "master_addr",
                 f"is required with nnodes ({self.nnodes}) > 1: the address of node 0")
        _require(1 <= self.master_port <= 65535, "master_port", f"must be in [1, 65535], got {self.master_port}")
        _require(self.tensor_parallel_size >= self.nnodes, "tensor_parallel_size",
                 f"({self.tensor_parallel_size}) must be >= nnodes ({self.nnodes}): tensor parallelism is what "
                 f"spans the hosts")

    @classmethod
    def from_kwargs(cls, **kwargs) -> "EngineConfig":
        """The constructor, also taking the old names of ALIASES."""
        for old, new in ALIASES.items():
            if old in kwargs:
                if new in kwargs:
                    raise ValueError(f"{old} is the old name of {new}: give only one of them")
                kwargs[new] = kwargs.pop(old)
        return cls(**kwargs)


# Old option names, still accepted by LLM(...) and `jaxllm serve`.
ALIASES = {alias: f.name for f in dataclasses.fields(EngineConfig) for alias in option_of(f).aliases}


def quantization_method(quantization: str | None) -> str | None:
    """A `quantization` value with vLLM's aliases resolved: one of QUANTIZATION_METHODS, or None."""
    if quantization is not None and quantization not in (*QUANTIZATION_METHODS, *QUANTIZATION_ALIASES):
        raise ValueError(f"quantization must be one of {(*QUANTIZATION_METHODS, *QUANTIZATION_ALIASES)} or None, got "
                         f"{quantization!r}")
    return QUANTIZATION_ALIASES.get(quantization, quantization)


def _require(ok: bool, field: str, message: str):
    if not ok:
        raise ValueError(f"{field} {message}")
