"""The sampler's logprob arrays -> per-token {id: logprob} and {id: rank} maps, and a request's prompt logprobs.

Legend (the sampler's Logprobs, on the host): R rows (one per sampling sequence, or per token for prompt
logprobs), K top ids kept. top_ids i32[R, K], top_logprobs f32[R, K], token_logprob f32[R], rank i32[R].
"""

from jaxllm.outputs import Logprob
from jaxllm.scheduling.scheduler_output import SchedulerOutput


def row_logprobs(logprobs, row: int, token: int, k: int | None = None):
    """(values, ranks) of row `row`: its first k top ids (all with k None) and `token`; (None, None) without
    logprobs."""
    if logprobs is None:
        return None, None
    top = slice(None) if k is None else slice(k)
    values = {int(t): float(v) for t, v in zip(logprobs.top_ids[row][top], logprobs.top_logprobs[row][top])}
    ranks = {int(t): r + 1 for r, t in enumerate(logprobs.top_ids[row][top])}
    values[token] = float(logprobs.token_logprob[row])
    ranks[token] = int(logprobs.rank[row])
    return values, ranks


class PromptLogprobs:
    """Each request's prompt logprobs recorded so far: entry 0 is None (the first token has no context), entry p + 1
    comes from the logits at prompt position p. `entry(values, ranks)` makes one position's {id: Logprob}."""

    def __init__(self, entry):
        self._entry = entry
        self._recorded: dict[str, list[dict[int, Logprob] | None]] = {}

    def record(self, batch: SchedulerOutput, logprobs) -> None:
        """`logprobs` has one row per token of `batch`; positions computed again after a recompute preemption are
        not recorded twice."""
        row = 0
        for s in batch.scheduled:
            group = s.seq.group
            if s.needs_prompt_logprobs:
                recorded = self._recorded.setdefault(group.request_id, [None])
                for i, p in enumerate(range(s.start_pos, s.seq_len)):
                    if p + 1 == len(recorded) and p + 1 < group.num_prompt_tokens:
                        token = group.prompt_token_ids[p + 1]
                        recorded.append(self._entry(*row_logprobs(logprobs, row + i, token,
                                                                  group.params.prompt_logprobs)))
            row += s.num_tokens

    def get(self, request_id: str, *, finished: bool) -> list | None:
        """What `request_id` has so far; a finished request's are forgotten."""
        return self._recorded.pop(request_id, None) if finished else self._recorded.get(request_id)
