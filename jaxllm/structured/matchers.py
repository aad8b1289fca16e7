"""Per-sample matcher state and the host-side bitmask fill.

A sample's matcher follows its output tokens lazily: before each mask it consumes the tokens it has not seen yet.
Preemption (recompute or swap) keeps a sequence's output tokens, so the matcher needs no event of its own, and a
run-ahead placeholder never reaches it because the engine does not run ahead of a constrained row.
"""

import llguidance
import llguidance.numpy
import numpy as np


class _Sample:
    __slots__ = ("matcher", "consumed")

    def __init__(self, matcher: llguidance.LLMatcher):
        self.matcher = matcher
        self.consumed = 0


class Matchers:
    def __init__(self, vocab_size: int, eos_token_ids):
        self.vocab_size = vocab_size
        self.width = (vocab_size + 31) // 32
        self._eos_only = np.zeros((self.width,), np.int32)
        for t in eos_token_ids:
            self._eos_only[t // 32] |= np.int32(np.uint32(1 << (t % 32)).view(np.int32))
        self._templates: dict[str, llguidance.LLMatcher] = {}  # request id -> its compiled grammar
        self._samples: dict[str, dict[int, _Sample]] = {}  # request id -> sample index -> its matcher

    def add(self, request_id: str, template: llguidance.LLMatcher) -> None:
        self._templates[request_id] = template

    def bitmask(self, request_id: str, sample_index: int, output_token_ids) -> np.ndarray:
        """int32[ceil(V/32)]: bit t set iff the grammar allows token t after `output_token_ids` (EOS only where
        the grammar may end)."""
        samples = self._samples.setdefault(request_id, {})
        sample = samples.get(sample_index)
        if sample is None:
            sample = samples[sample_index] = _Sample(self._templates[request_id].deep_copy())
        new = output_token_ids[sample.consumed:]
        if new:
            sample.matcher.consume_tokens(list(new))
            sample.consumed = len(output_token_ids)
        if sample.matcher.is_error() or sample.matcher.is_stopped():
            # Nothing more can follow (or a token the mask allowed was refused): end the sample.
            return self._eos_only.copy()
        mask = np.empty((1, self.width), np.int32)
        llguidance.numpy.fill_next_token_bitmask(sample.matcher, mask)
        return mask[0]

    def forget(self, request_id: str) -> None:
        self._templates.pop(request_id, None)
        self._samples.pop(request_id, None)
