"""SchedulerOutput: everything the runner needs for one step, as plain host data.

The runner performs, in this order:
  1. blocks_to_swap_out  (device -> cpu) pairs, then
  2. blocks_to_swap_in   (cpu -> device) pairs, then
  3. blocks_to_copy      (device src -> device dst) pairs (copy-on-write of a shared partial block), then
  4. the model step over `scheduled`, whose K/V writes may land in blocks freed by 1.
Each list may be non-empty while `scheduled` is empty; run the copies anyway.
"""

import dataclasses
from typing import NamedTuple

from jaxllm.scheduling.sequence import Sequence


class ScheduledSequence(NamedTuple):  # a tuple, not a dataclass: one is built per sequence per step
    """One sequence's work in a step: compute `token_ids` at positions start_pos, start_pos + 1, ...

    block_table: the sequence's full device block table after this step's allocation (physical ids, block i holds
    positions [i * block_size, (i + 1) * block_size)); it covers every position up to start_pos + len(token_ids).
    do_sample: the last of token_ids is the sequence's last token, so the step computes its logits and samples the
    next token (the last chunk of a prompt, or a decode). False for a non-final prompt chunk and for the n > 1
    prefill that stops one token short of the prompt's end. Sampling settings are in seq.group.params; the request's
    seed and the sample index (seq.sample_index) identify its random stream. prompt_logprobs, if requested, need the
    logits of every position below seq.num_prompt_tokens.
    """

    seq: Sequence
    token_ids: tuple[int, ...]
    start_pos: int
    block_table: tuple[int, ...]
    do_sample: bool

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def seq_len(self) -> int:
        """Context length once this step has run (cached + new tokens)."""
        return self.start_pos + len(self.token_ids)

    @property
    def needs_prompt_logprobs(self) -> bool:
        """The request wants prompt logprobs and this step computes a prompt position that has a successor."""
        return self.seq.group.params.prompt_logprobs is not None and self.start_pos < self.seq.num_prompt_tokens - 1


@dataclasses.dataclass(frozen=True)
class SchedulerOutput:
    """One step's batch. `scheduled` holds each sequence at most once: running requests oldest first, then requests
    swapped in, then newly admitted ones.

    Pass the sampled token of every entry of `scheduled` (any value where do_sample is False) to Scheduler.update.
    """

    scheduled: tuple[ScheduledSequence, ...] = ()
    blocks_to_swap_out: tuple[tuple[int, int], ...] = ()  # (device block, cpu block)
    blocks_to_swap_in: tuple[tuple[int, int], ...] = ()  # (cpu block, device block)
    blocks_to_copy: tuple[tuple[int, int], ...] = ()  # (src device block, dst device block)
    preempted_request_ids: tuple[str, ...] = ()  # preempted this step (swapped out or sent back to recompute)
    num_batched_tokens: int = 0  # sum of len(token_ids), <= max_num_batched_tokens

    @property
    def num_seqs(self) -> int:
        return len(self.scheduled)

    @property
    def decode_only(self) -> bool:
        """Every scheduled sequence brings exactly one token (selects the decode path of the attention kernel)."""
        return bool(self.scheduled) and self.num_batched_tokens == len(self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not (self.scheduled or self.blocks_to_swap_out or self.blocks_to_swap_in or self.blocks_to_copy)
