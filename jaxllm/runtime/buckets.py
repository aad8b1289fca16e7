"""The finite set of step shapes. Every jitted step is compiled for one of these layouts and nothing else.

Decode-only batches (one token per sequence, T == S) get power-of-two sizes up to max_num_seqs; batches with
prefill chunks get power-of-two token counts up to max_num_batched_tokens, with room for min(T, max_num_seqs)
sequences (a sequence brings at least one token, so S <= T always fits).
"""

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class BatchLayout:
    """Static shape of one step's inputs; hashable, so it keys the jit cache."""

    num_tokens: int  # T
    num_seqs: int  # S
    max_blocks: int  # M, block-table width
    decode_only: bool
    all_logits: bool = False  # logits for every token (prompt logprobs) instead of one row per sequence

    @property
    def num_logits(self) -> int:
        return self.num_tokens if self.all_logits else self.num_seqs


def _powers_of_two(low: int, high: int) -> list[int]:
    sizes = [1 << i for i in range(max(0, math.ceil(math.log2(low))), math.ceil(math.log2(high)) + 1)]
    return [s for s in sizes if s < high] + [high]


@dataclasses.dataclass(frozen=True)
class BucketPlan:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_blocks: int

    @property
    def decode_sizes(self) -> list[int]:
        return _powers_of_two(1, self.max_num_seqs)

    @property
    def token_sizes(self) -> list[int]:
        return _powers_of_two(16, self.max_num_batched_tokens)

    def layouts(self) -> list[BatchLayout]:
        """Every layout compiled at start-up."""
        decode = [self._layout(n, n, True) for n in self.decode_sizes]
        mixed = [self._layout(t, min(t, self.max_num_seqs), False) for t in self.token_sizes]
        return decode + mixed

    def pick(self, num_tokens: int, num_seqs: int, *, decode_only: bool, all_logits: bool = False) -> BatchLayout:
        assert num_seqs <= self.max_num_seqs and num_tokens <= self.max_num_batched_tokens, (num_tokens, num_seqs)
        if decode_only and not all_logits:
            size = next(s for s in self.decode_sizes if s >= num_seqs)
            return self._layout(size, size, True)
        tokens = next(t for t in self.token_sizes if t >= num_tokens)
        return self._layout(tokens, min(tokens, self.max_num_seqs), False, all_logits)

    def _layout(self, tokens, seqs, decode_only, all_logits=False) -> BatchLayout:
        return BatchLayout(tokens, seqs, self.max_blocks, decode_only, all_logits)
