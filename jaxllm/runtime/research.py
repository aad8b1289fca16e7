"""A step's research inputs on the host: which token rows' hidden states to gather, which steering vectors to add.

Built only when a scheduled request asks (SamplingParams.return_hidden_states or .steering); otherwise the step
gets None and runs the program without the feature. Shapes are bucketed to powers of two so a few programs cover
every batch: the gathered rows R (>= 16, <= the step's tokens) and the steering table's rows U (>= 2).
"""

import dataclasses
from collections.abc import Sequence

import numpy as np

from jaxllm.models.research import ResearchInputs
from jaxllm.runtime.buckets import BatchLayout
from jaxllm.sampling_params import SamplingParams


def _bucket(n: int, low: int) -> int:
    return max(low, 1 << max(0, (n - 1).bit_length()))


@dataclasses.dataclass(frozen=True)
class HiddenPlan:
    """Where each sequence's rows are in the gathered f32[K, R, D]: (first row, rows, indices into K), or None."""

    spans: tuple[tuple[int, int, tuple[int, ...]] | None, ...]

    def split(self, gathered: np.ndarray) -> list[np.ndarray | None]:
        """-> per scheduled sequence, its f32[layers it asked, tokens, D] (None where it asked for none)."""
        return [None if span is None else gathered[list(span[2]), span[0]:span[0] + span[1]] for span in self.spans]


def build(params: Sequence[SamplingParams], steering: Sequence[dict | None], num_tokens: Sequence[int],
          layout: BatchLayout, hidden_size: int) -> tuple[ResearchInputs, HiddenPlan]:
    """`params`, `steering`, `num_tokens`: each scheduled sequence's request params, its steering vectors as
    arrays ({layer: f32[D]} or None) and its tokens this step, for a step in which some sequence asks (the step
    builder says so by filling them)."""
    starts = np.concatenate([[0], np.cumsum(num_tokens)]).astype(np.int64)
    layers = sorted({layer for p in params if p.return_hidden_states for layer in p.return_hidden_states})
    rows, spans = [], []
    for p, start, n in zip(params, starts, num_tokens):
        if not p.return_hidden_states:
            spans.append(None)
            continue
        spans.append((len(rows), n, tuple(layers.index(layer) for layer in p.return_hidden_states)))
        rows.extend(range(start, start + n))
    hidden_rows = np.zeros(min(_bucket(len(rows), 16), layout.num_tokens) if rows else 1, np.int32)
    hidden_rows[:len(rows)] = rows
    steer_layers = sorted({layer for p in params if p.steering for layer in p.steering})
    # One table row per distinct steering: a request's clones (its n samples, its engine copy) share the vectors.
    distinct: dict[tuple, int] = {}
    steerings = {}
    steer_index = np.zeros(layout.num_tokens, np.int32)
    for p, arrays, start, n in zip(params, steering, starts, num_tokens):
        if p.steering:
            key = tuple((layer, id(vector)) for layer, vector in p.steering.items())
            steerings[key] = arrays
            steer_index[start:start + n] = distinct.setdefault(key, len(distinct) + 1)
    tables = []
    for layer in steer_layers:
        table = np.zeros((_bucket(len(distinct) + 1, 2), hidden_size), np.float32)
        for key, row in distinct.items():
            vector = steerings[key].get(layer)
            if vector is not None:
                table[row] = vector
        tables.append(table)
    research = ResearchInputs(hidden_rows, steer_index, tuple(tables), hidden_layers=tuple(layers),
                              steer_layers=tuple(steer_layers))
    return research, HiddenPlan(tuple(spans))
