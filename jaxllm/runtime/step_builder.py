"""SchedulerOutput -> StepWork: everything the runner needs for one step, built on the host.

Per scheduled sequence: its token work (run-ahead placeholders become references to the previous step's sampled
rows), its sampling row (with the request's constants, converted once per sample and cached here), and, when a
request wants prompt logprobs, the successor of every token it computes. The engine hands the StepWork to
`ModelRunner.dispatch` and never builds runner inputs itself.
"""

import dataclasses
import functools
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from jaxllm.runtime.inputs import SeqWork, fed_token
from jaxllm.runtime.sampling_metadata import RowConstants, SamplingRow
from jaxllm.sampling_params import SamplingParams
from jaxllm.scheduling.scheduler_output import ScheduledSequence, SchedulerOutput
from jaxllm.scheduling.sequence import RUN_AHEAD_TOKEN, SequenceGroup

_PADDING_ROW_PARAMS = SamplingParams(temperature=0.0)


@dataclasses.dataclass(frozen=True)
class StepWork:
    """One step's inputs, one entry per scheduled sequence (in SchedulerOutput order)."""

    work: Sequence[SeqWork]
    sampling: Sequence[SamplingRow]  # a greedy padding row where the sequence does not sample
    prompt_logprobs_k: int | None = None  # the most prompt logprobs any sequence wants; None: none does
    successors: Sequence[Sequence[int]] = ()  # with prompt_logprobs_k: the token after each computed token (or 0)
    # A sampling row has penalties or a grammar, which read its real last token: no run-ahead.
    reads_history: bool = False
    # With a constrained row: `sampling` with the grammar rows' bitmasks filled in. The runner calls it once the
    # forward is dispatched, so the host fills the masks while the device runs the model.
    fill_masks: Callable[[], Sequence[SamplingRow]] | None = None
    # Only when a sequence asks for hidden states or steering, else empty:
    params: Sequence[SamplingParams] = ()  # each sequence's request params
    steering: Sequence[dict | None] = ()  # each sequence's steering as {layer: f32[D]}, or None


def _has_penalties(params: SamplingParams) -> bool:
    """Penalties are computed from the sequence's token history."""
    return bool(params.presence_penalty or params.frequency_penalty or params.repetition_penalty != 1)


class StepBuilder:
    def __init__(self, *, vocab_size: int, eos_token_ids: Iterable[int], matchers=None):
        """`matchers`: the engine's structured.matchers.Matchers, which give constrained rows their bitmask."""
        self.vocab_size = vocab_size
        self.matchers = matchers
        self.eos_token_ids = tuple(eos_token_ids)
        padding = SamplingRow(_PADDING_ROW_PARAMS, (), (), seed=0)
        self._padding = dataclasses.replace(padding, constants=RowConstants.of(padding, vocab_size))
        self._constants: dict[tuple[str, int], RowConstants] = {}  # (request id, sample) -> sampling constants
        self._steering: dict[str, dict[int, np.ndarray]] = {}  # request id -> its steering vectors

    def build(self, batch: SchedulerOutput, previous: SchedulerOutput | None) -> StepWork:
        """`previous`: the step dispatched just before this one whose sampled ids are still on the device (run-ahead),
        or None."""
        rows = {id(s.seq): i for i, s in enumerate(previous.scheduled)} if previous else {}
        # Without a previous step there is no placeholder, and a prompt's ids are not walked one by one.
        work = [SeqWork([fed_token(rows[id(s.seq)]) if t == RUN_AHEAD_TOKEN else t for t in s.token_ids]
                        if rows else s.token_ids, s.start_pos, s.block_table) for s in batch.scheduled]
        sampling, history, research, constrained = [], False, False, []
        for i, s in enumerate(batch.scheduled):
            row = self._sampling_row(s)
            sampling.append(row)
            if s.do_sample and s.seq.group.params.structured_outputs is not None:
                constrained.append(i)
            history = history or bool(row.prompt_token_ids)
            p = s.seq.group.params  # a prefill chunk that samples nothing still computes states
            research = research or bool(p.return_hidden_states or p.steering)
        history = history or bool(constrained)
        fill = functools.partial(self._fill_masks, batch, sampling, constrained) if constrained else None
        params, steering = (), ()
        if research:
            params = [s.seq.group.params for s in batch.scheduled]
            steering = [self._steering_arrays(s.seq.group) if p.steering else None
                        for s, p in zip(batch.scheduled, params)]
        wanted = [s.seq.group.params.prompt_logprobs for s in batch.scheduled if s.needs_prompt_logprobs]
        if not wanted:
            return StepWork(work, sampling, reads_history=history, params=params, steering=steering,
                            fill_masks=fill)
        successors = [[s.seq.token_ids[p + 1] if p + 1 < s.seq.num_prompt_tokens else 0
                       for p in range(s.start_pos, s.seq_len)] for s in batch.scheduled]
        return StepWork(work, sampling, max(wanted), successors, reads_history=history, params=params,
                        steering=steering, fill_masks=fill)

    def _fill_masks(self, batch: SchedulerOutput, sampling: Sequence[SamplingRow],
                    constrained: Sequence[int]) -> list[SamplingRow]:
        rows = list(sampling)
        for i in constrained:
            seq = batch.scheduled[i].seq
            rows[i] = dataclasses.replace(rows[i], token_bitmask=self.matchers.bitmask(
                seq.request_id, seq.sample_index, seq.output_token_ids))
        return rows

    def _steering_arrays(self, group: SequenceGroup) -> dict[int, np.ndarray]:
        """The request's vectors as arrays, converted once: a [D] tuple costs ~0.1 ms per step to copy."""
        arrays = self._steering.get(group.request_id)
        if arrays is None:
            arrays = self._steering[group.request_id] = {
                layer: np.asarray(vector, np.float32) for layer, vector in group.params.steering.items()}
        return arrays

    def _sampling_row(self, s: ScheduledSequence) -> SamplingRow:
        """Token histories are copied only for the penalties that read them (so a row has them iff it reads them)."""
        if not s.do_sample:
            return self._padding
        seq = s.seq
        params = seq.group.params
        key = (seq.request_id, seq.sample_index)
        constants = self._constants.get(key)
        if constants is None:
            row = SamplingRow(params, (), (), seed=seq.group.seed, sample_index=seq.sample_index,
                              eos_token_ids=() if params.ignore_eos else self.eos_token_ids)
            constants = self._constants[key] = RowConstants.of(row, self.vocab_size)
        history = _has_penalties(params)
        return SamplingRow(params, seq.prompt_token_ids if history else (), seq.output_token_ids if history else (),
                           seed=seq.group.seed, sample_index=seq.sample_index, position=s.seq_len,
                           constants=constants, num_output_tokens=seq.num_output_tokens)

    def forget(self, group: SequenceGroup) -> None:
        """The request finished or was aborted: drop its cached constants and matchers."""
        for seq in group.seqs:
            self._constants.pop((group.request_id, seq.sample_index), None)
        self._steering.pop(group.request_id, None)
        if self.matchers is not None:
            self.matchers.forget(group.request_id)
