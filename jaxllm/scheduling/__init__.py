"""Host-side scheduling: sequences, KV block accounting and continuous batching. Plain Python; imports no jax."""

from jaxllm.scheduling.block_manager import NULL_BLOCK, BlockManager, hash_block, max_blocks_needed
from jaxllm.scheduling.scheduler import Scheduler
from jaxllm.scheduling.scheduler_output import ScheduledSequence, SchedulerOutput
from jaxllm.scheduling.sequence import Sequence, SequenceGroup, SequenceStatus

__all__ = [
    "NULL_BLOCK", "BlockManager", "hash_block", "max_blocks_needed", "Scheduler",
    "ScheduledSequence", "SchedulerOutput", "Sequence", "SequenceGroup", "SequenceStatus",
]
