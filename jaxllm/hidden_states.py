"""Per-request hidden states on the host: each step's gathered rows, written by position, joined at output time.

A sample's states are written at the positions its step computed, so a recompute after preemption overwrites
(never duplicates) what it had. With n > 1 the shared prompt (every position but the last, prefilled once by the
leader before the fork) is kept once per request; each sample keeps its own positions from there on.
"""

import numpy as np

from jaxllm.scheduling.scheduler_output import SchedulerOutput
from jaxllm.scheduling.sequence import SequenceGroup


class _ByPosition:
    """Chunks f32[K, n, D] at increasing start positions; a write at p drops whatever was at p and after."""

    def __init__(self):
        self.chunks: list[tuple[int, np.ndarray]] = []
        self._joined: dict[int | None, np.ndarray] = {}  # value(end) joined, until the next write

    def write(self, start: int, states: np.ndarray) -> None:
        self._joined.clear()
        while self.chunks and self.chunks[-1][0] >= start:
            self.chunks.pop()
        if self.chunks:
            last_start, last = self.chunks[-1]
            self.chunks[-1] = (last_start, last[:, :start - last_start])
        self.chunks.append((start, states))

    def value(self, end: int | None = None) -> np.ndarray:
        """f32[K, n, D]: the chunks up to `end` (all of them with None) in one array, joined once per write: a
        streamed request reads its states every step."""
        joined = self._joined.get(end)
        if joined is None:
            parts = [c if end is None else c[:, :max(0, end - s)] for s, c in self.chunks]
            joined = self._joined[end] = np.concatenate(parts, axis=1)
        return joined


def _shared_end(group: SequenceGroup) -> int:
    """The positions before it are the prompt prefilled once for all n samples (none when n == 1)."""
    return group.num_prompt_tokens - 1 if group.params.n > 1 else 0


class HiddenStates:
    def __init__(self):
        self._store: dict[tuple[str, int], _ByPosition] = {}  # (request id, sample or -1 for the shared prompt)

    def record(self, batch: SchedulerOutput, per_row: list) -> None:
        """One step's gathered states: per_row[i] f32[K, n, D] for batch.scheduled[i], or None."""
        for s, states in zip(batch.scheduled, per_row):
            seq = s.seq
            if states is None or seq.is_finished:  # a run-ahead step past the end: beyond the output's T
                continue
            group, start = seq.group, s.start_pos
            shared_end = _shared_end(group)
            if start < shared_end:
                self._at(seq.request_id, -1).write(start, states[:, :shared_end - start])
                states, start = states[:, shared_end - start:], shared_end
            if states.shape[1]:
                self._at(seq.request_id, seq.sample_index).write(start, states)

    def _at(self, request_id: str, key: int) -> _ByPosition:
        return self._store.setdefault((request_id, key), _ByPosition())

    def get(self, group: SequenceGroup, sample_index: int) -> np.ndarray | None:
        """f32[K, T, D]: the prompt and every generated token but the last; None before any step ran."""
        shared = self._store.get((group.request_id, -1))
        own = self._store.get((group.request_id, sample_index))
        shared_end = _shared_end(group)
        parts = [part.value(end) for part, end in ((shared, shared_end), (own, None)) if part is not None]
        if not parts:
            return None
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)

    def forget(self, request_id: str, num_samples: int) -> None:
        for key in range(-1, num_samples):
            self._store.pop((request_id, key), None)
