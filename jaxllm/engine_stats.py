"""The engine's exact counters and each request's timing metrics; EngineStats is the snapshot /metrics reads."""

import dataclasses

from jaxllm.scheduling.block_manager import BlockManager
from jaxllm.scheduling.scheduler import Scheduler
from jaxllm.scheduling.scheduler_output import SchedulerOutput
from jaxllm.scheduling.sequence import SequenceGroup


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


class EngineCounters:
    """Counts tokens and finished requests and stamps RequestMetrics, as the engine's step reaches each stage."""

    def __init__(self):
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.finished_total: dict[str, int] = {}  # finish reason -> requests

    def scheduled(self, batch: SchedulerOutput, now: float) -> None:
        for s in batch.scheduled:
            metrics = s.seq.group.metrics
            if metrics.first_scheduled_time is None:
                metrics.first_scheduled_time = now
                metrics.time_in_queue = now - metrics.arrival_time
                self.prompt_tokens_total += s.seq.group.num_prompt_tokens

    def sampled(self, group: SequenceGroup, now: float) -> None:
        """One generated token of `group`."""
        if group.metrics.first_token_time is None:
            group.metrics.first_token_time = now
        group.metrics.last_token_time = now
        self.generation_tokens_total += 1

    def finished(self, group: SequenceGroup, now: float) -> None:
        if group.metrics.finished_time is None:
            group.metrics.finished_time = now
            reason = group.seqs[0].finish_reason or "abort"  # one count per request, as vLLM
            self.finished_total[reason] = self.finished_total.get(reason, 0) + 1

    def snapshot(self, scheduler: Scheduler, block_manager: BlockManager) -> EngineStats:
        bm = block_manager
        return EngineStats(
            num_requests_running=scheduler.num_running(), num_requests_waiting=scheduler.num_waiting(),
            kv_cache_usage=bm.usage, prompt_tokens_total=self.prompt_tokens_total,
            generation_tokens_total=self.generation_tokens_total, num_preemptions_total=scheduler.num_preemptions,
            prefix_cache_queries_total=bm.prefix_cache_queries, prefix_cache_hits_total=bm.prefix_cache_hits,
            request_success_total=dict(self.finished_total))
