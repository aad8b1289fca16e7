"""LLMEngine: add_request / step / abort_request over the scheduler, the model runner and the output processor.

One step: Scheduler.schedule() -> block swaps and copies -> StepBuilder.build() -> ModelRunner.dispatch() (model +
on-device sampler) -> ModelRunner.fetch() of the sampled ids -> Scheduler.update() -> OutputProcessor (detokenize,
stop strings, logprobs) -> RequestOutputs of the requests that moved. With run-ahead, the next step is dispatched
before this one's ids are fetched, except after a step with a grammar-constrained row: its next mask needs the
token just sampled.

structured_outputs: process_request compiles the grammar (jaxllm/structured, on a worker pool within time and size
limits; an invalid one is a ValueError there); each sample's matcher follows its output tokens, and the runner fills
the step's bitmasks on the host while the device runs the forward.
"""

import hashlib
import itertools
import logging
import time
from collections.abc import Callable, Iterable
from typing import NamedTuple

from jaxllm.config import EngineConfig
from jaxllm.default_model import default_model_name, default_model_path
from jaxllm.engine_stats import EngineCounters, EngineStats
from jaxllm.gc_freeze import HeapFreeze
from jaxllm.loading import is_gguf_file, load_tokenizer, read_gguf_file
from jaxllm.outputs import RequestOutput
from jaxllm.progress import TqdmProgress
from jaxllm.runtime import kv_sizing
from jaxllm.runtime.runner import ModelRunner
from jaxllm.runtime.step_builder import StepBuilder
from jaxllm.sampling_params import RequestOutputKind, SamplingParams
from jaxllm.scheduling.block_manager import BlockManager
from jaxllm.scheduling.scheduler import Scheduler
from jaxllm.scheduling.scheduler_output import SchedulerOutput
from jaxllm.scheduling.sequence import SequenceGroup, SequenceStatus
from jaxllm.structured.compiler import GrammarCompiler
from jaxllm.structured.matchers import Matchers
from jaxllm.structured.tokenizer import ll_tokenizer
from jaxllm.text.output_processor import OutputProcessor
from jaxllm.text.prompts import parse_prompt
from jaxllm.validation import ProcessedRequest, validate_request, validate_structured_outputs

logger = logging.getLogger(__name__)

ProgressFn = Callable[[str, int, int], None]


class _InFlight(NamedTuple):
    """A dispatched step whose tokens have not been read back yet."""

    batch: SchedulerOutput
    pending: object  # ModelRunner.dispatch's handle
    reads_history: bool  # its penalties need the real last tokens: the next step waits for them


class LLMEngine:
    def __init__(self, config: EngineConfig, *, progress: ProgressFn | None = None):
        self.config = config
        model_path = config.model or default_model_path()
        self.model_name = config.served_model_name or (config.model or default_model_name())
        # A GGUF file holds both the weights and the tokenizer: read it once for both.
        model = read_gguf_file(model_path) if is_gguf_file(model_path) else model_path
        self.tokenizer = None if config.skip_tokenizer_init else load_tokenizer(model, config.tokenizer)
        self.runner = ModelRunner(config, model, progress=progress or TqdmProgress())
        self.model_config = self.runner.model_config
        self.quantization = self.runner.quantization  # the quantized format loaded, None for a dense model
        plan = self.runner.kv_plan
        self.max_model_len = plan.max_model_len
        self.block_manager = BlockManager(plan.num_blocks, config.block_size,
                                          kv_sizing.num_cpu_blocks(config, plan.bytes_per_block),
                                          enable_prefix_caching=config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, max_num_seqs=config.max_num_seqs,
                                   max_num_batched_tokens=self.runner.max_num_batched_tokens,
                                   max_model_len=self.max_model_len)
        self.outputs = OutputProcessor(self.tokenizer)
        self.eos_token_ids = frozenset(self.tokenizer.eos_token_ids if self.tokenizer else
                                       self.model_config.eos_token_ids)
        self.matchers = Matchers(self.model_config.vocab_size, self.eos_token_ids)
        self._grammar_compiler: GrammarCompiler | None = None  # built with the first constrained request
        self.step_builder = StepBuilder(vocab_size=self.model_config.vocab_size, eos_token_ids=self.eos_token_ids,
                                        matchers=self.matchers)
        self.counters = EngineCounters()
        self._limits = dict(max_model_len=self.max_model_len, vocab_size=self.model_config.vocab_size,
                            max_logprobs=config.max_logprobs, max_num_seqs=config.max_num_seqs,
                            num_kv_blocks=self.block_manager.num_usable_blocks, block_size=config.block_size,
                            num_layers=self.model_config.num_layers, hidden_size=self.model_config.hidden_size)
        self._request_counter = itertools.count()
        self._in_flight: _InFlight | None = None  # the step dispatched ahead, if any
        self._heap = HeapFreeze(config.freeze_gc, self.runner.num_layouts_run)

    def process_request(self, request_id: str, prompt, params: SamplingParams | None = None, *,
                        arrival_time: float | None = None, cache_salt: str | None = None) -> ProcessedRequest:
        """Tokenize and validate; raises ValueError (ContextLengthExceededError, RequestTooLargeError) naming the
        problem."""
        text, ids = parse_prompt(prompt, self.tokenizer)
        ids, params = validate_request(ids, SamplingParams() if params is None else params, **self._limits)
        if self.runner.channel is not None and (params.return_hidden_states or params.steering):
            raise ValueError("return_hidden_states and steering are not supported in a multi-node run.")
        grammar = validate_structured_outputs(params, None if self.tokenizer is None else self._compile_grammar)
        return ProcessedRequest(request_id, text, ids, params, time.time() if arrival_time is None else arrival_time,
                                cache_salt, grammar)

    def _compile_grammar(self, so):
        """The request waits here while its grammar compiles on the compiler's pool (within its time limit)."""
        if self._grammar_compiler is None:  # llguidance's tokenizer costs ~1 s on a large vocabulary: built once
            self._grammar_compiler = GrammarCompiler(
                ll_tokenizer(self.tokenizer, self.model_config.vocab_size, self.eos_token_ids))
        return self._grammar_compiler.compile(so)

    def add_request(self, request_id: str, prompt, params: SamplingParams | None = None, **kwargs) -> None:
        self.add_processed_request(self.process_request(request_id, prompt, params, **kwargs))

    def add_processed_request(self, request: ProcessedRequest) -> None:
        group = SequenceGroup(request.request_id, request.prompt_token_ids, request.params,
                              arrival_time=request.arrival_time, eos_token_id=tuple(self.eos_token_ids),
                              cache_salt=request.cache_salt, prompt=request.prompt)
        group.seed = self._seed_for(request.params)
        if request.grammar is not None:
            self.matchers.add(request.request_id, request.grammar)
        self.scheduler.add(group)

    def _seed_for(self, params: SamplingParams) -> int:
        """A seeded request keeps its seed; others get a distinct one derived from the engine's seed."""
        if params.seed is not None:
            return params.seed
        digest = hashlib.sha256(f"{self.config.seed}:{next(self._request_counter)}".encode()).digest()
        return int.from_bytes(digest[:8], "little")

    def abort_request(self, request_ids: str | list[str]) -> list[RequestOutput]:
        """Abort the requests wherever they are and free their blocks. Returns the final output (finished,
        finish_reason "abort") of each one that was still unfinished; unknown or finished ids are ignored."""
        aborted = []
        for request_id in [request_ids] if isinstance(request_ids, str) else request_ids:
            group = self.scheduler.abort(request_id)
            if group is not None:
                self.step_builder.forget(group)
                aborted.append(self.outputs.request_output(group))  # finished: it also forgets the request's state
        self._refreeze()
        return aborted

    def abort_all(self) -> None:
        self.abort_request(self.scheduler.request_ids())

    def has_unfinished_requests(self) -> bool:
        # A step dispatched ahead for requests that have all finished since is left for the next step() or close()
        # to collect: its results are discarded, and waiting for it would only delay the last output.
        return self.scheduler.has_unfinished()

    def get_num_unfinished_requests(self) -> int:
        return self.scheduler.num_unfinished()

    def step(self) -> list[RequestOutput]:
        """One engine step: schedule -> dispatch -> fetch -> update -> outputs. With run-ahead (the default), step
        N + 1 is scheduled and dispatched before step N's tokens are fetched, so the host's work (reading tokens,
        detokenizing, scheduling, packing) overlaps the device's (docs/perf-notes.md#run-ahead-dispatch)."""
        current = self._in_flight or self._dispatch(self.scheduler.schedule(), previous=None)
        self._in_flight = None
        if current is None:
            outputs = self._outputs(self.scheduler.take_finished())
        else:
            ran_ahead = self.config.async_scheduling and not current.reads_history
            if ran_ahead:
                self.scheduler.run_ahead(current.batch)
                self._in_flight = self._dispatch(self.scheduler.schedule(), previous=current.batch)
            sampled, prompt_logprobs, hidden = self.runner.fetch(current.pending)
            if prompt_logprobs is not None:
                self.outputs.record_prompt_logprobs(current.batch, prompt_logprobs)
            if hidden is not None:
                self.outputs.record_hidden_states(current.batch, hidden)
            tokens = [int(t) for t in sampled.token_ids[:current.batch.num_seqs]]
            updated = self.scheduler.update(current.batch, tokens, ran_ahead=ran_ahead)
            outputs = self._process_outputs(current.batch, sampled.logprobs, set(map(id, updated)))
        self._refreeze()
        return outputs

    def _dispatch(self, batch: SchedulerOutput, previous: SchedulerOutput | None) -> _InFlight | None:
        self.runner.swap_out(list(batch.blocks_to_swap_out))
        self.runner.swap_in(list(batch.blocks_to_swap_in))
        self.runner.copy_blocks(list(batch.blocks_to_copy))
        if not batch.scheduled:
            return None
        self.counters.scheduled(batch, time.time())
        step = self.step_builder.build(batch, previous)
        return _InFlight(batch, self.runner.dispatch(step), step.reads_history)

    def _process_outputs(self, batch: SchedulerOutput, logprobs, updated: set[int]) -> list[RequestOutput]:
        """`updated`: ids of the sequences that took this step's token (not aborted or stopped meanwhile)."""
        now = time.time()
        groups: dict[str, SequenceGroup] = {}
        for row, s in enumerate(batch.scheduled):
            if not s.do_sample or id(s.seq) not in updated:
                continue
            seq, group = s.seq, s.seq.group
            groups[group.request_id] = group
            self.counters.sampled(group, now)
            matched = self.outputs.append_sampled(seq, seq.token_ids[s.seq_len], logprobs, row)
            if matched is not None and not seq.is_finished:
                self.scheduler.finish(seq, SequenceStatus.FINISHED_STOPPED, stop_reason=matched)
        for group in self.scheduler.take_finished():
            groups[group.request_id] = group
        return self._outputs(groups.values(), now)

    def _outputs(self, groups: Iterable[SequenceGroup], now: float | None = None) -> list[RequestOutput]:
        results = []
        for group in groups:
            if group.is_finished():
                self.counters.finished(group, now or time.time())
                self.step_builder.forget(group)
            elif group.params.output_kind is RequestOutputKind.FINAL_ONLY:
                continue
            results.append(self.outputs.request_output(group))
        return results

    def _refreeze(self) -> None:
        self._heap.refreeze(idle=not self.scheduler.has_unfinished(), num_layouts=self.runner.num_layouts_run)

    def stats(self) -> EngineStats:
        return self.counters.snapshot(self.scheduler, self.block_manager)

    def close(self) -> None:
        if self._in_flight is not None:  # let the device finish before its buffers are freed
            self.runner.fetch(self._in_flight.pending)
            self._in_flight = None
        self.runner.close()
        if self._grammar_compiler is not None:
            self._grammar_compiler.close()
        self._heap.release()
