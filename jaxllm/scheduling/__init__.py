"""Host-side scheduling: sequences, KV block accounting and continuous batching. Plain Python; imports no jax."""

from jaxllm.scheduling.block_manager import NULL_BLOCK, BlockManager, hash_block
from jaxllm.scheduling.scheduler import RequestTooLargeError, Scheduler, SchedulerStats
from jaxllm.scheduling.scheduler_output import ScheduledSequence, SchedulerOutput
from jaxllm.scheduling.sequence import Sequence, SequenceGroup, SequenceStatus

__all__ = [
    "NULL_BLOCK", "BlockManager", "hash_block", "RequestTooLargeError", "Scheduler", "SchedulerStats",
    "ScheduledSequence", "SchedulerOutput", "Sequence", "SequenceGroup", "SequenceStatus",
]
