"""ModelRunner: owns the device state (weights, KV cache) and every jit site of the engine.

One step (`dispatch` of a StepWork, runtime/step_builder.py): pack the batch into one i32 buffer and the sampler's
inputs into another (host arrays, handed to the jitted calls as they are), copy the step's into its bucket's input
buffer, run the jitted model with the KV cache donated, sample on device, and bring back only the sampled ids (and
requested logprobs).

Every buffer the model step reads or writes keeps its device address from step to step: the params, the KV cache
and the logits buffer (donated and written in place), the bucket's input buffer, the fed-back sampled ids (written
in place by the sampler). XLA runs the step as a CUDA graph and, before a launch, re-records every command whose
buffers moved; with nothing moved it only launches the graph
(docs/perf-notes.md#cuda-graph-updates-and-stable-buffer-addresses).

Tensor parallelism is the mesh: params, KV cache and kernels are sharded over its "tp" axis (jaxllm.sharding), the
step's inputs and the logits are replicated, so the sampler sees the whole vocabulary. Across hosts the leader's
runner broadcasts every device operation over jaxllm.distributed's channel and the followers' runners replay it
(runtime/follower.py).
"""

import concurrent.futures
import dataclasses
import logging
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from jaxllm import compile_cache, distributed, sharding
from jaxllm.config import DEFAULT_MAX_NUM_BATCHED_TOKENS, EngineConfig
from jaxllm.kv_cache import KVCache
from jaxllm.loading import load_model
from jaxllm.models.research import ResearchInputs
from jaxllm.models.state import ModuleLayout
from jaxllm.runtime import block_ops, inputs, kv_sizing, research, transfer
from jaxllm.runtime.buckets import BatchLayout, BucketPlan
from jaxllm.runtime.compiler_options import step_compiler_options
from jaxllm.runtime.sampler import Logprobs, SamplerOutput, SamplingMetadata, prompt_logprobs, sample
from jaxllm.runtime.step_builder import StepWork

logger = logging.getLogger(__name__)

ProgressFn = Callable[[str, int, int], None]  # (phase, done, total)
# Start-up compiles at once; more than a few buys little (XLA parallelizes inside a compile too) and each holds its
# own autotuning buffers on the device.
_COMPILE_THREADS = 4
# Below this many rows a GPU step's matmuls cost about what one row's do (reading the weights bounds them) and its
# padding rows read no KV, so its buckets can be coarse: fewer programs to compile and to load on a warm start.
_GPU_WEIGHT_BOUND_ROWS = 64


def _no_progress(phase: str, done: int, total: int) -> None:
    pass


class ModelRunner:
    def __init__(self, config: EngineConfig, model, *, progress: ProgressFn = _no_progress):
        """`model`: a model directory or .gguf path, or a GGUF checkpoint already read (see `load_model`)."""
        self.config = config
        distributed.initialize_from_config(config)
        if config.compile_cache:
            compile_cache.enable()
        self.mesh = sharding.make_mesh(config.tensor_parallel_size)
        self.platform = self.mesh.devices.flat[0].platform
        self._replicated = sharding.replicated(self.mesh)
        self._vocab_split = sharding.logits_sharding(self.mesh)
        # Across hosts every process must run every step: the mesh must reach each one, and the leader says what.
        self.channel = distributed.Channel() if jax.process_count() > 1 else None
        if self.channel is not None and config.tensor_parallel_size != jax.device_count():
            raise ValueError(f"tensor_parallel_size ({config.tensor_parallel_size}) must equal the number of devices "
                             f"of all {jax.process_count()} nodes ({jax.device_count()}) in a multi-node run")
        self._resident = kv_sizing.ResidentMark.take(self._local_device)
        progress("loading weights", 0, 1)
        self.model, self.model_config = load_model(
            model, dtype=config.dtype, load_format=config.load_format,
            mesh=self.mesh, trust_remote_code=config.trust_remote_code, allow_pickle=config.allow_pickle,
            kernel_backend=config.kernel_backend, quantization=config.quantization)
        self.quantization = self.model.quantization  # the format loaded (None: dense), for the log and /v1/models
        progress("loading weights", 1, 1)
        # Split once: the step is a pure function of the state ({path: array}, the module's own arrays) and rebuilds
        # the module inside its trace; `self.model` stays the live module (`LLM.model`).
        self._layout, self.params = ModuleLayout.split(self.model)
        self.max_num_batched_tokens = config.max_num_batched_tokens or max(
            DEFAULT_MAX_NUM_BATCHED_TOKENS["cpu" if self.platform == "cpu" else "gpu"], config.max_num_seqs)
        # Outputs pinned to the shardings their buffers start with, or a bucket's second step misses jit's cache
        # (docs/perf-notes.md#step-outputs-pinned-to-their-input-shardings).
        self._step = jax.jit(self._step_fn, static_argnames=("layout",), donate_argnames=("kv_cache", "logits_out"),
                             out_shardings=(sharding.kv_sharding(self.mesh), self._replicated),
                             compiler_options=step_compiler_options(config, self.platform))
        # Steps in which a row asks for hidden states or steering (runtime/research.py): a jit of its own, so the
        # programs of every other step are exactly those without the feature. The stream is replicated over tp
        # (add_rms_norm's inputs and outputs), so the gathered states are too.
        self._research_step = jax.jit(
            self._step_fn, static_argnames=("layout",), donate_argnames=("kv_cache", "logits_out"),
            out_shardings=(sharding.kv_sharding(self.mesh), self._replicated, self._replicated),
            compiler_options=step_compiler_options(config, self.platform))
        # The calls that take a step's host arrays copy them to the devices themselves, replicated (so across hosts
        # too: each process gives its own copy of the same value), in C++, cheaper than a jax.device_put first.
        self._sample = jax.jit(self._sample_fn, static_argnames=("layout", "rows"), donate_argnames=("last_tokens",),
                               in_shardings=self._replicated, out_shardings=self._replicated)
        self._prompt_logprobs = jax.jit(self._prompt_logprobs_fn, static_argnames=("k",),
                                        in_shardings=self._replicated, out_shardings=self._replicated)
        self._copy_into = jax.jit(_copy_into, donate_argnames=("held",), in_shardings=self._replicated)
        # Per bucket, the device buffer the step reads its inputs from, rewritten in place every step (`_stage`): for
        # Llama-3.1-8B's 15 GPU buckets at 131072 tokens of context, 69 MiB in all (block tables dominate).
        self._staged: dict[BatchLayout, jax.Array] = {}
        # The previous step's sampled ids, fed on device to a step dispatched ahead, and the logits of every step
        # without prompt logprobs (its first rows). Each has a row more than a step fills: an update of the whole
        # buffer, XLA would replace by the new value, at a new address, and the donation would go unused.
        rows = config.max_num_seqs + 1
        self._last_tokens = jax.device_put(np.zeros(rows, np.int32), self._replicated)
        self._logits = jax.device_put(np.zeros((rows, self.vocab_size), np.float32), self._replicated)
        self.kv_plan = self._plan_kv_cache()
        logger.info(self.kv_plan.describe())
        logger.info(kv_sizing.describe_memory(self.model, self.params, self.kv_plan, self._local_device))
        self.kv_cache = KVCache.create(
            num_layers=self.model_config.num_layers, num_blocks=self.kv_plan.num_blocks,
            block_size=config.block_size, num_kv_heads=self.kv_cache_heads, head_dim=self.model_config.head_dim,
            dtype=self.kv_dtype, sharding=sharding.kv_sharding(self.mesh))
        self.buckets = BucketPlan(
            max_num_seqs=config.max_num_seqs, max_num_batched_tokens=self.max_num_batched_tokens,
            max_blocks=kv_sizing.max_blocks_per_seq(self.kv_plan.max_model_len, config.block_size),
            coarse_below=0 if self.platform == "cpu" else _GPU_WEIGHT_BOUND_ROWS)
        self.swap_space = block_ops.HostSwapSpace()
        if not config.enforce_eager:
            self._compile_all(progress)

    @property
    def _local_device(self) -> jax.Device:
        """This process's first device of the mesh: the one whose memory sizes the KV cache."""
        return next(d for d in self.mesh.devices.flat if d.process_index == jax.process_index())

    @property
    def kv_dtype(self):
        return jnp.dtype(self.model.dtype)  # not the first param's: a quantized model's may be packed ints

    @property
    def vocab_size(self) -> int:
        return self.model_config.vocab_size

    @property
    def num_layouts_run(self) -> int:
        """How many batch layouts (buckets) have run a step so far."""
        return len(self._staged)

    @property
    def kv_cache_heads(self) -> int:
        return sharding.kv_cache_heads(self.model_config.num_kv_heads, self.config.tensor_parallel_size)

    def _step_fn(self, params, kv_cache: KVCache, buffer: jax.Array, last_tokens: jax.Array,
                 logits_out: jax.Array | None, layout: BatchLayout, research: ResearchInputs | None = None):
        """-> (kv_cache, logits): `logits_out` (donated) with the step's logits in its first rows, or, when it is
        None (steps with prompt logprobs: a row per token), the logits alone; with `research`, the gathered
        hidden states (or None) as a third entry."""
        token_ids, metadata, logits_indices = inputs.unpack(buffer, layout)
        token_ids = inputs.resolve_fed_tokens(token_ids, last_tokens)  # run-ahead placeholders
        model = self._layout.merge(params)
        hidden = ()
        if research is None:
            kv_cache, logits = model.step(kv_cache, token_ids, metadata, logits_indices=logits_indices)
        else:
            kv_cache, logits, gathered = model.step(kv_cache, token_ids, metadata, logits_indices=logits_indices,
                                                    research=research)
            hidden = (gathered,)
        # The lm_head is vocab-parallel: each device computes its slice of the vocabulary, then the logits (not the
        # lm_head, which XLA would otherwise gather on small batches) are gathered so the sampler sees them whole.
        logits = jax.lax.with_sharding_constraint(logits, self._vocab_split)
        logits = jax.lax.with_sharding_constraint(logits, self._replicated)
        if logits_out is not None:
            logits = jax.lax.dynamic_update_slice(logits_out, logits, (0, 0))
        return (kv_cache, logits, *hidden)

    @staticmethod
    def _sample_fn(logits: jax.Array, buffer: jax.Array, layout: transfer.PackedLayout, rows: int,
                   last_tokens: jax.Array):
        """Sample `logits`' first `rows` rows; the ids are also written into `last_tokens` (donated): the next
        step's fed-back tokens, at the same address every step."""
        out = sample(logits[:rows], transfer.unpack(buffer, layout))
        return out, jax.lax.dynamic_update_slice(last_tokens, out.token_ids, (0,))

    @staticmethod
    def _prompt_logprobs_fn(logits: jax.Array, rows: jax.Array, next_ids: jax.Array, k: int):
        # logits f32[T, V] of every token; rows i32[S] (each sequence's last token) feed the sampler.
        return logits[rows], prompt_logprobs(logits, next_ids, num_logprobs=k)

    def _plan_kv_cache(self) -> kv_sizing.KVPlan:
        model_max_len = self.model_config.max_position_embeddings
        device = self._local_device
        activation_bytes = 0
        if device.platform != "cpu" and self.config.kv_cache_memory_bytes is None:
            activation_bytes = self._activation_bytes(model_max_len)
        block_bytes = kv_sizing.bytes_per_block(
            num_layers=self.model_config.num_layers,
            kv_heads_per_device=self.kv_cache_heads // self.config.tensor_parallel_size,
            head_dim=self.model_config.head_dim, block_size=self.config.block_size,
            itemsize=jnp.dtype(self.kv_dtype).itemsize)
        budget = kv_sizing.kv_budget_bytes(self.config, device, activation_bytes=activation_bytes,
                                           resident=self._resident)
        if self.channel is not None:  # every host's cache must have the same shape: the tightest host decides
            budget = int(np.min(multihost_utils.process_allgather(np.int32(budget >> 10)))) << 10  # KiB: i32
        return kv_sizing.plan_kv_cache(self.config, budget_bytes=budget, block_bytes=block_bytes,
                                       model_max_len=model_max_len)

    def _activation_bytes(self, max_model_len: int) -> int:
        """Peak temporary memory of the largest step, from the compiler, with a tiny stand-in KV cache."""
        tokens = self.max_num_batched_tokens
        layout = BatchLayout(tokens, min(tokens, self.config.max_num_seqs),
                             kv_sizing.max_blocks_per_seq(max_model_len, self.config.block_size), False)
        mc = self.model_config
        page = jax.ShapeDtypeStruct((self.kv_cache_heads, 2, self.config.block_size, mc.head_dim), self.kv_dtype,
                                    sharding=sharding.kv_sharding(self.mesh))
        cache = KVCache(k=(page,) * mc.num_layers, v=(page,) * mc.num_layers)
        compiled = self.lower_step(layout, cache).compile()
        analysis = compiled.memory_analysis()
        return int(analysis.temp_size_in_bytes) + layout.num_logits * mc.vocab_size * 4 * 4 if analysis else 0

    def _compile_all(self, progress: ProgressFn) -> None:
        """Every bucket, several at a time: XLA compiles outside the GIL, and a cold start of Llama-3.1-8B has ~19
        buckets of several seconds each. The programs land in jit's cache (and the persistent one) for the steps."""
        layouts = self.buckets.layouts()
        progress("compiling buckets", 0, len(layouts))
        with concurrent.futures.ThreadPoolExecutor(max_workers=_COMPILE_THREADS) as pool:
            compiles = [pool.submit(self._compile_bucket, layout) for layout in layouts]
            for done, future in enumerate(concurrent.futures.as_completed(compiles), 1):
                future.result()
                progress("compiling buckets", done, len(layouts))

    def _compile_bucket(self, layout: BatchLayout) -> None:
        """The step and the copy into its staged inputs (`_stage`): compiled now, not at a bucket's second step."""
        self.lower_step(layout).compile()
        # `fresh` is a host array: lowered as one (no sharding), so the step's call finds this program.
        held = inputs.abstract_buffer(layout, self._replicated)
        self._copy_into.lower(held, inputs.abstract_buffer(layout)).compile()

    def lower_step(self, layout: BatchLayout, kv_cache: KVCache | None = None):
        """The model step for one layout, lowered (compile it, or read its HLO)."""
        return self._step.lower(self.params, self.kv_cache if kv_cache is None else kv_cache,
                                inputs.abstract_buffer(layout, self._replicated), self._last_tokens,
                                self._logits_out(layout), layout)

    def forward(self, buffer: jax.Array, layout: BatchLayout, research: ResearchInputs | None = None):
        """The model step alone on packed inputs (no sampling): updates the cache, returns the logits (the first
        `layout.num_logits` rows; any after them are an earlier step's); with `research`, (logits, gathered hidden
        states or None)."""
        if research is None:
            self.kv_cache, logits = self._step(self.params, self.kv_cache, buffer, self._last_tokens,
                                               self._logits_out(layout), layout)
        else:
            research = jax.device_put(research, self._replicated)
            self.kv_cache, logits, hidden = self._research_step(
                self.params, self.kv_cache, buffer, self._last_tokens, self._logits_out(layout), layout, research)
        if not layout.all_logits:
            self._logits = logits
        return logits if research is None else (logits, hidden)

    def _logits_out(self, layout: BatchLayout) -> jax.Array | None:
        return None if layout.all_logits else self._logits

    @staticmethod
    def fetch(pending) -> tuple[SamplerOutput, Logprobs | None, list | None]:
        """Wait for a dispatched step and bring its outputs to the host: the sampled ids, the prompt logprobs (or
        None) and, when a row asked, each scheduled sequence's hidden states (runtime/research.HiddenPlan.split)."""
        sampled, prompt, hidden, plan = pending
        sampled, prompt, hidden = _fetch((sampled, prompt, hidden))
        return sampled, prompt, None if hidden is None else plan.split(hidden)

    def dispatch(self, step: StepWork):
        """Start one step on the device and return at once; `fetch` gives the sampler's host-side output, one row
        per entry of step.work (rows of sequences whose logits are not needed are computed on padding and ignored by
        the caller), and, with step.prompt_logprobs_k, for every token row the logprob and rank of its successor
        with the top-k alternatives; rows the caller has no successor for are garbage it skips."""
        work = step.work
        decode_only = all(len(w.token_ids) == 1 for w in work)
        k = step.prompt_logprobs_k
        layout = self.buckets.pick(sum(len(w.token_ids) for w in work), len(work), decode_only=decode_only,
                                   all_logits=k is not None)
        step_inputs = inputs.pack(work, layout, self.config.block_size)
        rows = inputs.successor_rows(work, step.successors, layout.num_tokens, layout.num_seqs) if k is not None else ()
        research_inputs, plan = None, None
        if step.params:  # a sequence asks for hidden states or steering
            research_inputs, plan = research.build(step.params, step.steering, [len(w.token_ids) for w in work],
                                                   layout, self.model_config.hidden_size)
            assert self.channel is None, "the engine refuses research features across hosts"
        if step.fill_masks is not None and self.channel is None:
            logits, prompt, hidden = self._forward_step(layout, step_inputs, k, rows, research_inputs)
            # The device runs the forward while the host fills the grammar masks.
            _, sampling, sampling_layout = self._sampling_inputs(step.fill_masks(), layout)
            return self._sample_step(logits, sampling, sampling_layout, layout), prompt, hidden, plan
        metadata, sampling, sampling_layout = self._sampling_inputs(
            step.sampling if step.fill_masks is None else step.fill_masks(), layout)
        if research_inputs is not None:
            return self.device_step(layout, step_inputs, sampling, sampling_layout, k, rows, research_inputs, plan)
        if self.channel is not None:
            self.channel.send("step", {"layout": dataclasses.astuple(layout), "sampling": _static_fields(metadata),
                                       "leaves": sampling_layout.leaves, "k": k},
                              np.concatenate([step_inputs, sampling, *rows]))
        return self.device_step(layout, step_inputs, sampling, sampling_layout, k, rows)

    def device_step(self, layout: BatchLayout, step_inputs: np.ndarray, sampling: np.ndarray,
                    sampling_layout: transfer.PackedLayout, prompt_logprobs_k: int | None, rows,
                    research_inputs: ResearchInputs | None = None, plan: research.HiddenPlan | None = None):
        """The device half of `dispatch` (a follower runs it on what the leader sent)."""
        logits, prompt, hidden = self._forward_step(layout, step_inputs, prompt_logprobs_k, rows, research_inputs)
        return self._sample_step(logits, sampling, sampling_layout, layout), prompt, hidden, plan

    def _sampling_inputs(self, rows, layout: BatchLayout):
        """-> (SamplingMetadata, its packed buffer, the buffer's layout)."""
        metadata = SamplingMetadata.build(rows, pad_rows_to=layout.num_seqs, vocab_size=self.vocab_size)
        return (metadata, *transfer.pack(metadata))

    def _forward_step(self, layout: BatchLayout, step_inputs: np.ndarray, prompt_logprobs_k: int | None, rows,
                      research_inputs: ResearchInputs | None = None):
        """-> (the logits the sampler reads, prompt logprobs or None, gathered hidden states or None)."""
        # Two host buffers, so the model step's compiled shape depends on the bucket only (one sliced on the device
        # would cost a dispatch of its own).
        logits = self.forward(self._stage(layout, step_inputs), layout, research_inputs)
        hidden = None
        if research_inputs is not None:
            logits, hidden = logits
        prompt = None
        if prompt_logprobs_k is not None:
            logits, prompt = self._prompt_logprobs(logits, *rows, prompt_logprobs_k)
        return logits, prompt, hidden

    def _sample_step(self, logits: jax.Array, sampling: np.ndarray, sampling_layout: transfer.PackedLayout,
                     layout: BatchLayout) -> SamplerOutput:
        sampled, self._last_tokens = self._sample(logits, sampling, sampling_layout, layout.num_seqs,
                                                  self._last_tokens)
        return sampled

    def _stage(self, layout: BatchLayout, fresh: np.ndarray) -> jax.Array:
        """`fresh` (the step's host buffer) copied into this bucket's input buffer, which keeps its device address
        from step to step.

        XLA runs the step as a CUDA graph and, before each launch, updates every command whose buffers moved. The
        inputs are read by every layer (positions, slots, block tables), and a fresh transfer lands at a new address
        (docs/perf-notes.md#cuda-graph-updates-and-stable-buffer-addresses). A donated copy (one small kernel)
        writes the new inputs where the previous ones were; the step in flight still reads the old ones, as the copy
        runs after it on the device.
        """
        held = self._staged.pop(layout, None)
        if held is None:  # a bucket's first step: through the copy too, which compiles now (when not at start-up)
            held = jax.device_put(np.zeros(fresh.shape, fresh.dtype), self._replicated)
        self._staged[layout] = self._copy_into(held, fresh)
        return self._staged[layout]

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        if pairs and self.channel is not None and distributed.is_leader():
            self.channel.send("copy", {"pairs": pairs})
        self.kv_cache = block_ops.copy_blocks(self.kv_cache, pairs)

    def swap_out(self, pairs: list[tuple[int, int]]) -> None:
        self._check_swap(pairs)
        self.swap_space.swap_out(self.kv_cache, pairs)

    def swap_in(self, pairs: list[tuple[int, int]]) -> None:
        self._check_swap(pairs)
        self.kv_cache = self.swap_space.swap_in(self.kv_cache, pairs)

    def _check_swap(self, pairs) -> None:
        # Several nodes get no CPU blocks (kv_sizing.num_cpu_blocks), so preemption recomputes and this never fires.
        assert not (pairs and self.channel is not None), "KV swapping is not supported across hosts"

    def close(self) -> None:
        """Free device memory now rather than whenever the garbage collector runs."""
        if self.params is None:
            return
        if self.channel is not None and distributed.is_leader():
            self.channel.send("close")
        buffers = (self.params, self.kv_cache, list(self._staged.values()), self._logits, self._last_tokens)
        for leaf in jax.tree_util.tree_leaves(buffers):
            leaf.delete()
        self.model = self.params = self.kv_cache = self._logits = self._last_tokens = None
        self._staged = {}
        self._step = self._research_step = self._sample = None


def _copy_into(held: jax.Array, fresh: jax.Array) -> jax.Array:
    """`fresh`, written over `held` (donated by the caller), so the result lives where `held` did."""
    return jax.lax.dynamic_update_slice(held, fresh, (0,))


def _static_fields(metadata: SamplingMetadata) -> dict:
    """The metadata's static (non-array) fields: with the leaf shapes they rebuild its PackedLayout elsewhere."""
    return {f.name: getattr(metadata, f.name) for f in dataclasses.fields(metadata)
            if not isinstance(getattr(metadata, f.name), np.ndarray)}


def _fetch(tree):
    """Device -> host. Across hosts an array spans devices this process cannot read; the outputs are replicated,
    so this process's own copy is the whole value."""
    return jax.device_get(jax.tree.map(lambda a: a if a.is_fully_addressable else a.addressable_data(0), tree))
