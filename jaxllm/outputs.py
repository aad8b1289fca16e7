"""What generation returns: RequestOutput, CompletionOutput, Logprob and RequestMetrics, with vLLM's field names."""

import dataclasses


@dataclasses.dataclass
class Logprob:
    """One token's log-probability (computed before temperature and penalties, as vLLM V1) and its rank (1 = best)."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# One dict per generated token: token id -> Logprob for the sampled token plus the top-k alternatives.
SampleLogprobs = list[dict[int, Logprob]]
# One entry per prompt token; the first is None (nothing predicts the first token).
PromptLogprobs = list[dict[int, Logprob] | None]


@dataclasses.dataclass
class CompletionOutput:
    """One of a request's n samples. finish_reason is "stop", "length" or "abort" once finished, else None.

    stop_reason is the stop string or stop token id that ended the sample; None for EOS, length or abort.
    """

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: SampleLogprobs | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    # SamplingParams.return_hidden_states: numpy float32 [layers, T, D], T = the prompt and every generated token
    # but the last (what the model processed); typed loosely, as this module imports no numpy.
    hidden_states: object = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclasses.dataclass
class RequestMetrics:
    """Wall-clock times (time.time()) of one request's life; None until the event happened."""

    arrival_time: float
    last_token_time: float | None = None
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    time_in_queue: float | None = None
    finished_time: float | None = None


@dataclasses.dataclass
class RequestOutput:
    """The state of one request: a delta or the cumulative result, per the caller's choice.

    num_cached_tokens is how many prompt tokens came from the prefix cache when the request was first scheduled.
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: PromptLogprobs | None
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int | None = None
    metrics: RequestMetrics | None = None
