"""The finite set of step shapes. Every jitted step is compiled for one of these layouts and nothing else.

Decode-only batches (one token per sequence, T == S) get sizes from 1 up to max_num_seqs; batches with prefill
chunks get token counts from 16 up to max_num_batched_tokens, with room for min(T, max_num_seqs) sequences (a
sequence brings at least one token, so S <= T always fits). Sizes double, except below `coarse_below` rows, where
they grow 4x: on a GPU a step of fewer than ~64 rows costs what one row costs (it is bound by reading the weights,
and padding rows read no KV), so finer sizes there would only add programs to compile and load at start-up.
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


def _sizes(low: int, high: int, coarse_below: int) -> list[int]:
    """From `low` rounded up to a power of two: each size 4x the last while that stays <= coarse_below, then 2x; the
    last size is `high` itself."""
    sizes = [1 << max(0, math.ceil(math.log2(low)))]
    while sizes[-1] < high:
        sizes.append(sizes[-1] * (4 if sizes[-1] * 4 <= coarse_below else 2))
    return [s for s in sizes if s < high] + [high]


@dataclasses.dataclass(frozen=True)
class BucketPlan:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_blocks: int
    coarse_below: int = 0  # rows below which sizes grow 4x instead of 2x (0: always 2x)

    @property
    def decode_sizes(self) -> list[int]:
        return _sizes(1, self.max_num_seqs, self.coarse_below)

    @property
    def token_sizes(self) -> list[int]:
        return _sizes(16, self.max_num_batched_tokens, self.coarse_below)

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
