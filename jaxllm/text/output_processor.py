"""Sampled tokens -> text and RequestOutputs: incremental detokenization, stop strings and logprobs, per sample,
and each request's prompt logprobs (text/logprobs.py turns the sampler's arrays into the per-token maps).

Stop strings are found here on text (the scheduler only sees token ids): a match tells the caller to finish the
sequence, and text that could still grow into a stop string is held back from the output until it cannot.
"""

import dataclasses

from jaxllm.hidden_states import HiddenStates
from jaxllm.outputs import CompletionOutput, Logprob, RequestOutput
from jaxllm.scheduling.scheduler_output import SchedulerOutput
from jaxllm.scheduling.sequence import Sequence, SequenceGroup
from jaxllm.text.detokenizer import DetokenizerState, detokenize_step
from jaxllm.text.logprobs import PromptLogprobs, row_logprobs
from jaxllm.text.stop_strings import check_stop_strings
from jaxllm.text.tokenizer import Tokenizer


@dataclasses.dataclass
class _SampleText:
    detok: DetokenizerState
    text: str = ""  # everything decoded so far
    checked: int = 0  # text[:checked] was checked against the stop strings and released
    output_text: str = ""  # what the caller sees: text[:checked], or up to the stop string once matched
    stop_matched: bool = False
    cumulative_logprob: float = 0.0
    logprobs: list[dict[int, Logprob]] | None = None


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer | None):
        self.tokenizer = tokenizer
        self._samples: dict[tuple[str, int], _SampleText] = {}
        # A request's prompt ids as its outputs carry them: one copy shared by all of them, not one per step.
        self._prompts: dict[str, list[int]] = {}
        self._prompt_logprobs = PromptLogprobs(self.logprob_entry)
        self._hidden = HiddenStates()

    def _state(self, seq: Sequence) -> _SampleText:
        key = (seq.request_id, seq.sample_index)
        state = self._samples.get(key)
        if state is None:
            params = seq.group.params
            detok = (DetokenizerState() if self.tokenizer is None else
                     DetokenizerState.start(self.tokenizer, seq.prompt_token_ids, params.skip_special_tokens))
            state = self._samples[key] = _SampleText(detok, logprobs=[] if params.logprobs is not None else None)
        return state

    def record_prompt_logprobs(self, batch: SchedulerOutput, logprobs) -> None:
        """A step's prompt logprobs (one row per token of `batch`), for the requests' outputs."""
        self._prompt_logprobs.record(batch, logprobs)

    def record_hidden_states(self, batch: SchedulerOutput, per_row: list) -> None:
        """A step's gathered hidden states (runner.fetch's third entry), for the outputs of the requests that asked."""
        self._hidden.record(batch, per_row)

    def append_sampled(self, seq: Sequence, token_id: int, logprobs, row: int) -> str | None:
        """`append` with the logprobs of row `row` of the sampler's arrays (None when no row wants any)."""
        return self.append(seq, token_id, *row_logprobs(logprobs, row, token_id, seq.group.params.logprobs))

    def append(self, seq: Sequence, token_id: int, logprobs: dict[int, float] | None = None,
               ranks: dict[int, int] | None = None) -> str | None:
        """Account for the token just appended to `seq`; returns the stop string it completed, if any (the
        caller then finishes the sequence with reason "stop")."""
        params = seq.group.params
        state = self._state(seq)
        if logprobs is not None:
            state.cumulative_logprob += logprobs[token_id]
            if state.logprobs is not None:
                state.logprobs.append(self.logprob_entry(logprobs, ranks))
        if self.tokenizer is None:  # skip_tokenizer_init: token ids only
            return None
        # As vLLM: the token that stopped the sequence (EOS or one of stop_token_ids; stop_reason is then not a
        # string) is in token_ids but not in the text, unless include_stop_str_in_output.
        stopped_by_token = (seq.finish_reason == "stop" and not isinstance(seq.stop_reason, str)
                            and not params.include_stop_str_in_output)
        state.detok, delta = detokenize_step(self.tokenizer, state.detok, [] if stopped_by_token else [token_id],
                                             skip_special_tokens=params.skip_special_tokens,
                                             finished=seq.is_finished)
        state.text += delta
        if state.stop_matched:
            return None
        if not params.stop:
            state.output_text = state.text
            return None
        send, matched = check_stop_strings(state.text, state.checked, params.stop,
                                           include_stop_str_in_output=params.include_stop_str_in_output,
                                           finished=seq.is_finished)
        state.output_text += send
        state.checked += len(send)
        state.stop_matched = matched is not None
        return matched

    def logprob_entry(self, logprobs: dict[int, float], ranks: dict[int, int]) -> dict[int, Logprob]:
        return {t: Logprob(lp, ranks.get(t), self._token_text(t)) for t, lp in logprobs.items()}

    def _token_text(self, token_id: int) -> str | None:
        return None if self.tokenizer is None else self.tokenizer.decode([token_id], skip_special_tokens=False)

    def request_output(self, group: SequenceGroup) -> RequestOutput:
        outputs = []
        for seq in sorted(group.seqs, key=lambda s: s.sample_index):
            state = self._state(seq)
            outputs.append(CompletionOutput(
                index=seq.sample_index, text=state.output_text, token_ids=seq.output_token_ids,  # a fresh list
                cumulative_logprob=state.cumulative_logprob if state.logprobs is not None else None,
                logprobs=list(state.logprobs) if state.logprobs is not None else None,
                finish_reason=seq.finish_reason, stop_reason=seq.stop_reason,
                hidden_states=self._hidden.get(group, seq.sample_index) if group.params.return_hidden_states
                else None))
        prompt_token_ids = self._prompts.get(group.request_id)
        if prompt_token_ids is None:
            prompt_token_ids = self._prompts[group.request_id] = list(group.prompt_token_ids)
        finished = group.is_finished()
        if finished:
            self.forget(group.request_id, len(group.seqs))
        prompt_logprobs = (None if group.params.prompt_logprobs is None else
                           self._prompt_logprobs.get(group.request_id, finished=finished))
        return RequestOutput(request_id=group.request_id, prompt=group.prompt, prompt_token_ids=prompt_token_ids,
                             prompt_logprobs=prompt_logprobs, outputs=outputs, finished=finished,
                             num_cached_tokens=group.num_cached_tokens, metrics=group.metrics)

    def forget(self, request_id: str, num_samples: int) -> None:
        self._prompts.pop(request_id, None)
        self._hidden.forget(request_id, num_samples)
        for i in range(num_samples):
            self._samples.pop((request_id, i), None)
