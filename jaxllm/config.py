"""EngineConfig: every knob of the engine, with vLLM's names and defaults, validated once here."""

import dataclasses

_DTYPES = ("auto", "bfloat16", "float16", "float32", "half", "float", "bf16", "fp16", "fp32")
_LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")
_BLOCK_SIZES = (8, 16, 32, 64)

# On CPU there is no device memory to measure: the KV cache gets this many bytes unless configured.
DEFAULT_CPU_KV_CACHE_BYTES = 512 * 2**20
# The chunked-prefill token budget when none is given (vLLM uses 8192-16384 on 80 GB cards; the CPU is far slower).
DEFAULT_MAX_NUM_BATCHED_TOKENS = {"gpu": 8192, "cpu": 512}
# Old option names, still accepted by LLM(...) and `jaxllm serve`.
ALIASES = {"attention_backend": "kernel_backend"}


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Engine configuration; the field names are vLLM's `LLM(...)` / `jaxllm serve` arguments."""

    model: str | None = None  # a model directory or .gguf file; None = the default model (SmolLM2-135M-Instruct)
    tokenizer: str | None = None
    dtype: str = "auto"
    quantization: str | None = None
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    max_model_len: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    block_size: int = 16
    swap_space: float = 4  # GiB of host memory for swapped-out KV blocks per device
    enforce_eager: bool = False  # skip compiling every bucket at start-up; buckets then compile on first use
    seed: int = 0
    load_format: str = "auto"
    enable_prefix_caching: bool = True
    trust_remote_code: bool = False
    allow_pickle: bool = False  # .bin/.pt checkpoints are pickles: refused unless explicitly allowed
    kv_cache_memory_bytes: int | None = None  # fixes the KV cache size instead of measuring free device memory
    kernel_backend: str = "auto"  # auto | reference | xla | triton
    max_logprobs: int = 20
    max_num_queued_reqs: int | None = None
    served_model_name: str | None = None
    async_scheduling: bool = True  # dispatch step N + 1 before reading step N's tokens (off: one step at a time)
    skip_tokenizer_init: bool = False  # token ids in and out, no text (benchmarks on config-only dummy models)
    # Process-wide side effects of building an engine, on by default:
    compile_cache: bool = True  # JAX's persistent compilation cache in a user-private directory (compile_cache.py)
    freeze_gc: bool = True  # gc.freeze() what start-up (and each new batch shape's first step) left: no GC pauses
    # TP on one GPU host: the step's all-reduces may use XLA's collective kernels instead of NCCL (in place of
    # vLLM's custom all-reduce); True keeps them all on NCCL (runtime/compiler_options.py)
    disable_custom_all_reduce: bool = False
    # Multi-host (vLLM's multi-node flags): one model over the devices of `nnodes` hosts through jax.distributed;
    # node 0 schedules, nodes 1.. run its steps (jaxllm.distributed). tensor_parallel_size spans all hosts.
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str | None = None  # node 0's address, where jax.distributed's coordinator listens
    master_port: int = 29501

    def __post_init__(self):
        _require(self.dtype in _DTYPES, "dtype", f"must be one of {_DTYPES}, got {self.dtype!r}")
        _require(self.load_format in _LOAD_FORMATS, "load_format",
                 f"must be one of {_LOAD_FORMATS}, got {self.load_format!r}")
        _require(self.quantization in (None, "gguf"), "quantization",
                 f"{self.quantization!r} is not supported; GGUF checkpoints are dequantized on load")
        _require(self.tensor_parallel_size >= 1, "tensor_parallel_size", "must be >= 1")
        _require(0 < self.gpu_memory_utilization <= 1, "gpu_memory_utilization", "must be in (0, 1]")
        _require(self.max_model_len is None or self.max_model_len >= 1, "max_model_len", "must be >= 1")
        _require(self.max_num_seqs >= 1, "max_num_seqs", "must be >= 1")
        _require(self.max_num_batched_tokens is None or self.max_num_batched_tokens >= self.block_size,
                 "max_num_batched_tokens", f"must be >= block_size ({self.block_size})")
        _require(self.block_size in _BLOCK_SIZES, "block_size", f"must be one of {_BLOCK_SIZES}")
        _require(self.swap_space >= 0, "swap_space", "must be >= 0")
        _require(self.kv_cache_memory_bytes is None or self.kv_cache_memory_bytes > 0, "kv_cache_memory_bytes",
                 "must be > 0")
        _require(self.kernel_backend in ("auto", "reference", "xla", "triton"), "kernel_backend",
                 "must be auto, reference, xla or triton")
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


def _require(ok: bool, field: str, message: str):
    if not ok:
        raise ValueError(f"{field} {message}")
