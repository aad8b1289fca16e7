"""LLMEngine: add_request / step / abort_request over the scheduler, the model runner and the output processor.

One step: Scheduler.schedule() -> block copies and swaps -> ModelRunner.dispatch() (model + on-device sampler) ->
ModelRunner.fetch() of the sampled ids -> Scheduler.update() -> detokenize, stop strings -> RequestOutputs of the
requests that moved. With run-ahead, the next step is dispatched before this one's ids are fetched.
"""

import dataclasses
import gc
import hashlib
import itertools
import logging
import time
from collections.abc import Callable

from jaxllm.config import EngineConfig
from jaxllm.default_model import default_model_name, default_model_path
from jaxllm.loading import is_gguf_file, load_tokenizer, read_gguf_file
from jaxllm.text.output_processor import OutputProcessor
from jaxllm.outputs import RequestOutput
from jaxllm.progress import TqdmProgress
from jaxllm.runtime.inputs import SeqWork, feed
from jaxllm.runtime.runner import ModelRunner
from jaxllm.runtime.sampling_metadata import RowConstants, SamplingRow
from jaxllm.sampling_params import RequestOutputKind, SamplingParams
from jaxllm.scheduling.block_manager import BlockManager
from jaxllm.scheduling.scheduler import Scheduler
from jaxllm.scheduling.scheduler_output import SchedulerOutput
from jaxllm.scheduling.sequence import SequenceGroup, SequenceStatus
from jaxllm.text.tokenizer import Tokenizer
from jaxllm.validation import validate_request

logger = logging.getLogger(__name__)

ProgressFn = Callable[[str, int, int], None]
_PADDING_ROW_PARAMS = SamplingParams(temperature=0.0)


@dataclasses.dataclass(frozen=True)
class ProcessedRequest:
    """A validated request, ready for the scheduler (made on any thread; added on the engine's)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float
    cache_salt: str | None = None


@dataclasses.dataclass
class _InFlight:
    """A dispatched step whose tokens have not been read back yet."""

    batch: SchedulerOutput
    pending: object  # ModelRunner.dispatch's handle
    ran_ahead: bool = False  # its sampling sequences got run-ahead placeholders and a next step was dispatched


@dataclasses.dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine's gauges and exact counters (the server's /metrics reads this)."""

    num_requests_running: int
    num_requests_waiting: int
    kv_cache_usage: float
    prompt_tokens_total: int
    generation_tokens_total: int
    num_preemptions_total: int
    prefix_cache_queries_total: int
    prefix_cache_hits_total: int
    request_success_total: dict[str, int]


class LLMEngine:
    def __init__(self, config: EngineConfig, *, progress: ProgressFn | None = None):
        self.config = config
        model_path = config.model or default_model_path()
        self.model_name = config.served_model_name or (config.model or default_model_name())
        # A GGUF file holds both the weights and the tokenizer: read it once for both.
        model = read_gguf_file(model_path) if is_gguf_file(model_path) else model_path
        if config.skip_tokenizer_init:
            self.tokenizer = None
        elif config.tokenizer is None and model is not model_path:
            self.tokenizer = Tokenizer.from_gguf(model)
        else:
            self.tokenizer = load_tokenizer(model, config.tokenizer)
        self.runner = ModelRunner(config, model, progress=progress or TqdmProgress())
        self.model_config = self.runner.model_config
        self.max_model_len = self.runner.kv_plan.max_model_len
        num_cpu_blocks = int(config.swap_space * 2**30 // self.runner.kv_plan.bytes_per_block)
        self.block_manager = BlockManager(self.runner.kv_plan.num_blocks, config.block_size, num_cpu_blocks,
                                          enable_prefix_caching=config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, max_num_seqs=config.max_num_seqs,
                                   max_num_batched_tokens=self.runner.max_num_batched_tokens,
                                   max_model_len=self.max_model_len)
        self.outputs = OutputProcessor(self.tokenizer)
        self.eos_token_ids = frozenset(self.tokenizer.eos_token_ids if self.tokenizer else
                                       self.model_config.eos_token_ids)
        self._request_counter = itertools.count()
        self._prompt_tokens_total = 0
        self._generation_tokens_total = 0
        self._finished_total: dict[str, int] = {}
        self._prompt_logprobs: dict[str, list] = {}  # request id -> prompt logprobs recorded so far
        self._row_constants: dict[tuple[str, int], RowConstants] = {}  # (request id, sample) -> sampling constants
        self._in_flight: _InFlight | None = None  # the step dispatched ahead, if any
        # What start-up left (~160k objects: jax, the tokenizer, the model's tables) lives as long as the engine.
        # Left to the cyclic collector, each full collection walked all of it: a ~100 ms pause every ~150 steps at
        # 256 sequences on a 2-core CPU (0.7 ms a step on average), ~1 ms once frozen. vLLM freezes too.
        self._frozen_layouts = self.runner.num_layouts_run
        if config.freeze_gc:
            gc.collect()
            gc.freeze()

    def process_request(self, request_id: str, prompt, params: SamplingParams | None = None, *,
                        arrival_time: float | None = None, cache_salt: str | None = None) -> ProcessedRequest:
        """Tokenize and validate; raises ValueError (or its ContextLengthExceededError) naming the problem."""
        params = SamplingParams() if params is None else params
        text = None
        if isinstance(prompt, str) or (isinstance(prompt, dict) and "prompt_token_ids" not in prompt):
            if self.tokenizer is None:
                raise ValueError("this engine was started with skip_tokenizer_init: give prompt_token_ids")
        if isinstance(prompt, str):
            text, ids = prompt, self.tokenizer.encode(prompt)
        elif isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            text, ids = prompt.get("prompt"), prompt["prompt_token_ids"]
        elif isinstance(prompt, dict) and isinstance(prompt.get("prompt"), str):
            text, ids = prompt["prompt"], self.tokenizer.encode(prompt["prompt"])
        elif isinstance(prompt, (list, tuple)):
            ids = prompt
        else:
            raise ValueError(f"prompt must be text, token ids or a dict with prompt_token_ids; got "
                             f"{type(prompt).__name__}")
        ids, params = validate_request(ids, params, max_model_len=self.max_model_len,
                                       vocab_size=self.model_config.vocab_size, max_logprobs=self.config.max_logprobs)
        return ProcessedRequest(request_id, text, ids, params, time.time() if arrival_time is None else arrival_time,
                                cache_salt)

    def add_request(self, request_id: str, prompt, params: SamplingParams | None = None, **kwargs) -> None:
        self.add_processed_request(self.process_request(request_id, prompt, params, **kwargs))

    def add_processed_request(self, request: ProcessedRequest) -> None:
        group = SequenceGroup(request.request_id, request.prompt_token_ids, request.params,
                              arrival_time=request.arrival_time, eos_token_id=tuple(self.eos_token_ids),
                              cache_salt=request.cache_salt, prompt=request.prompt)
        group.seed = self._seed_for(request.params)
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
            prompt_logprobs = self._prompt_logprobs.pop(request_id, None)
            if group is not None:
                self._forget_rows(group)
                output = self.outputs.request_output(group)  # finished, so it also forgets the samples' state
                if group.params.prompt_logprobs is not None:
                    output.prompt_logprobs = prompt_logprobs
                aborted.append(output)
        self._freeze_new_programs()
        return aborted

    def abort_all(self) -> None:
        self.abort_request(self.scheduler.request_ids())

    def _forget_rows(self, group: SequenceGroup) -> None:
        for seq in group.seqs:
            self._row_constants.pop((group.request_id, seq.sample_index), None)

    def has_unfinished_requests(self) -> bool:
        # A step dispatched ahead for requests that have all finished since is left for the next step() or close()
        # to collect: its results are discarded, and waiting for it would only delay the last output.
        return self.scheduler.has_unfinished()

    def get_num_unfinished_requests(self) -> int:
        return self.scheduler.num_unfinished()

    def step(self) -> list[RequestOutput]:
        """One engine step. With run-ahead (the default), step N + 1 is scheduled and dispatched before step N's
        tokens are read back, so the host's work (reading tokens, detokenizing, scheduling, packing) overlaps the
        device's instead of leaving it idle."""
        outputs = self._step()
        self._freeze_new_programs()
        return outputs

    def _freeze_new_programs(self) -> None:
        """Once idle after a batch shape's first step, freeze the heap again: the first step of a shape traces
        its program (all of it under enforce_eager, otherwise what start-up's compile did not keep), and JAX's
        caches of it are then walked by every full collection. On an H200 one such collection, 48 ms, stalled a
        batch-256 step (RESULTS.md). Only when no request is alive: a frozen request's reference cycles
        (Sequence <-> SequenceGroup) would never be collected."""
        if (not self.config.freeze_gc or self.scheduler.has_unfinished()
                or self.runner.num_layouts_run == self._frozen_layouts):
            return
        self._frozen_layouts = self.runner.num_layouts_run
        gc.collect()
        gc.freeze()

    def _step(self) -> list[RequestOutput]:
        current = self._in_flight or self._dispatch_next(previous=None)
        self._in_flight = None
        if current is None:
            return self._finished_outputs(self.scheduler.take_finished())
        if self._can_run_ahead(current.batch):
            self.scheduler.run_ahead(current.batch)
            current.ran_ahead = True
            self._in_flight = self._dispatch_next(previous=current.batch)
        sampled, prompt_logprobs = self.runner.fetch(current.pending)
        if prompt_logprobs is not None:
            self._record_prompt_logprobs(current.batch, prompt_logprobs)
        tokens = [int(t) for t in sampled.token_ids[:current.batch.num_seqs]]
        updated = self.scheduler.update(current.batch, tokens, ran_ahead=current.ran_ahead)
        return self._process_outputs(current.batch, sampled, set(map(id, updated)))

    def _can_run_ahead(self, batch: SchedulerOutput) -> bool:
        # Penalties read the token history on the host side of the sampler, so they need the real last token.
        return self.config.async_scheduling and not any(
            s.do_sample and (s.seq.group.params.presence_penalty or s.seq.group.params.frequency_penalty
                             or s.seq.group.params.repetition_penalty != 1) for s in batch.scheduled)

    def _dispatch_next(self, previous: SchedulerOutput | None) -> "_InFlight | None":
        batch = self.scheduler.schedule()
        self.runner.swap_out(list(batch.blocks_to_swap_out))
        self.runner.swap_in(list(batch.blocks_to_swap_in))
        self.runner.copy_blocks(list(batch.blocks_to_copy))
        if not batch.scheduled:
            return None
        now = time.time()
        for s in batch.scheduled:
            if s.seq.group.metrics.first_scheduled_time is None:
                s.seq.group.metrics.first_scheduled_time = now
                s.seq.group.metrics.time_in_queue = now - s.seq.group.metrics.arrival_time
                self._prompt_tokens_total += s.seq.group.num_prompt_tokens
        return _InFlight(batch, self._dispatch(batch, previous))

    def _dispatch(self, batch: SchedulerOutput, previous: SchedulerOutput | None):
        rows = {id(s.seq): i for i, s in enumerate(previous.scheduled)} if previous else {}
        # A run-ahead placeholder (-1, the last token of a sequence that sampled in `previous`) becomes a reference
        # to that sequence's row of the previous step's device-side result; without a previous step there is none,
        # and a prompt's ids are not walked one by one (~0.05 ms for 1024 tokens).
        work = [SeqWork([feed(rows[id(s.seq)]) if t < 0 else t for t in s.token_ids] if rows else s.token_ids,
                        s.start_pos, s.block_table) for s in batch.scheduled]
        sampling = [self._sampling_row(s) for s in batch.scheduled]
        wanted = [s.seq.group.params.prompt_logprobs for s in batch.scheduled if _needs_prompt_logprobs(s)]
        if not wanted:
            return self.runner.dispatch(work, sampling)
        successors = [[s.seq.token_ids[p + 1] if p + 1 < s.seq.num_prompt_tokens else 0
                       for p in range(s.start_pos, s.seq_len)] for s in batch.scheduled]
        return self.runner.dispatch(work, sampling, prompt_logprobs_k=max(wanted), successors=successors)

    def _sampling_row(self, s) -> SamplingRow:
        seq = s.seq
        if not s.do_sample:
            return SamplingRow(_PADDING_ROW_PARAMS, (), (), seed=0)
        params = seq.group.params
        key = (seq.request_id, seq.sample_index)
        constants = self._row_constants.get(key)
        if constants is None:
            row = SamplingRow(params, (), (), seed=seq.group.seed, sample_index=seq.sample_index,
                              eos_token_ids=() if params.ignore_eos else tuple(self.eos_token_ids))
            constants = self._row_constants[key] = RowConstants.of(row, self.model_config.vocab_size)
        # Token histories are copied only for the penalties that read them.
        history = params.presence_penalty or params.frequency_penalty or params.repetition_penalty != 1
        return SamplingRow(params, seq.prompt_token_ids if history else (), seq.output_token_ids if history else (),
                           seed=seq.group.seed, sample_index=seq.sample_index, position=s.seq_len,
                           constants=constants, num_output_tokens=seq.num_output_tokens)

    def _process_outputs(self, batch: SchedulerOutput, sampled, updated: set[int]) -> list[RequestOutput]:
        """`updated`: ids of the sequences that took this step's token (not aborted or stopped meanwhile)."""
        now = time.time()
        groups: dict[str, SequenceGroup] = {}
        logprobs = sampled.logprobs
        for row, s in enumerate(batch.scheduled):
            if not s.do_sample or id(s.seq) not in updated:
                continue
            seq, group = s.seq, s.seq.group
            groups[group.request_id] = group
            if group.metrics.first_token_time is None:
                group.metrics.first_token_time = now
            group.metrics.last_token_time = now
            self._generation_tokens_total += 1
            token = seq.token_ids[s.seq_len]
            entry = self._row_logprobs(logprobs, row, token, group.params.logprobs)
            matched = self.outputs.append(seq, token, *entry)
            if matched is not None and not seq.is_finished:
                self.scheduler.finish(seq, SequenceStatus.FINISHED_STOPPED, stop_reason=matched)
        for group in self.scheduler.take_finished():
            groups[group.request_id] = group
        return self._finished_outputs(groups.values(), now)

    def _finished_outputs(self, groups, now: float | None = None) -> list[RequestOutput]:
        results = []
        for group in groups:
            finished = group.is_finished()
            if finished and group.metrics.finished_time is None:
                group.metrics.finished_time = now or time.time()
                reason = group.seqs[0].finish_reason or "abort"  # one count per request, as vLLM
                self._finished_total[reason] = self._finished_total.get(reason, 0) + 1
            if finished:
                self._forget_rows(group)
            elif group.params.output_kind is RequestOutputKind.FINAL_ONLY:
                continue
            output = self.outputs.request_output(group)
            if group.params.prompt_logprobs is not None:
                output.prompt_logprobs = self._prompt_logprobs.get(group.request_id)
                if output.finished:
                    self._prompt_logprobs.pop(group.request_id, None)
            results.append(output)
        return results

    def _record_prompt_logprobs(self, batch: SchedulerOutput, logprobs) -> None:
        """Entry p + 1 of a request's prompt logprobs comes from the logits at prompt position p; positions
        computed again after a recompute preemption are not recorded twice."""
        row = 0
        for s in batch.scheduled:
            group = s.seq.group
            if _needs_prompt_logprobs(s):
                recorded = self._prompt_logprobs.setdefault(group.request_id, [None])
                for i, p in enumerate(range(s.start_pos, s.seq_len)):
                    if p + 1 == len(recorded) and p + 1 < group.num_prompt_tokens:
                        token = group.prompt_token_ids[p + 1]
                        recorded.append(self.outputs.logprob_entry(
                            *self._row_logprobs(logprobs, row + i, token, group.params.prompt_logprobs)))
            row += s.num_tokens

    @staticmethod
    def _row_logprobs(logprobs, row: int, token: int, k: int | None = None):
        if logprobs is None:
            return None, None
        top = slice(None) if k is None else slice(k)
        values = {int(t): float(v) for t, v in zip(logprobs.top_ids[row][top], logprobs.top_logprobs[row][top])}
        ranks = {int(t): r + 1 for r, t in enumerate(logprobs.top_ids[row][top])}
        values[token] = float(logprobs.token_logprob[row])
        ranks[token] = int(logprobs.rank[row])
        return values, ranks

    def stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(
            num_requests_running=self.scheduler.num_running(), num_requests_waiting=self.scheduler.num_waiting(),
            kv_cache_usage=bm.usage, prompt_tokens_total=self._prompt_tokens_total,
            generation_tokens_total=self._generation_tokens_total,
            num_preemptions_total=self.scheduler.num_preemptions,
            prefix_cache_queries_total=bm.prefix_cache_queries, prefix_cache_hits_total=bm.prefix_cache_hits,
            request_success_total=dict(self._finished_total))

    def close(self) -> None:
        if self._in_flight is not None:  # let the device finish before its buffers are freed
            self.runner.fetch(self._in_flight.pending)
            self._in_flight = None
        self.runner.close()
        if self.config.freeze_gc:
            gc.unfreeze()  # what the engine held can be collected again (another engine's heap then is too: no harm)


def _needs_prompt_logprobs(s) -> bool:
    return s.seq.group.params.prompt_logprobs is not None and s.start_pos < s.seq.num_prompt_tokens - 1
