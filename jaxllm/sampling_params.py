"""SamplingParams: how one request is sampled, with vLLM's names, defaults and range checks.

Limits that depend on the deployment or the model (n <= 16, logprobs <= 20, stop-string counts, token ids inside the
vocabulary, max_model_len) are checked by `jaxllm.validation.validate_request`, the single choke point that the
engine and the server share; this class checks only what is wrong whatever the model.
"""

import copy
import dataclasses
import enum
import logging
import math
import numbers

logger = logging.getLogger(__name__)

# Below this temperature sampling is greedy (vLLM's _SAMPLING_EPS).
SAMPLING_EPS = 1e-5
# vLLM raises smaller positive temperatures to 1e-2: logits / T overflows low-precision floats to inf, then NaN.
MIN_TEMPERATURE = 1e-2


class SamplingType(enum.IntEnum):
    GREEDY = 0
    RANDOM = 1
    RANDOM_SEED = 2


class RequestOutputKind(enum.IntEnum):
    """vLLM's: what a step returns for a request. CUMULATIVE: everything so far, every step it moves; FINAL_ONLY:
    one output, when it finishes (LLM.generate asks for this: building the outputs it would drop costs host time
    each step, docs/perf-notes.md#host-work-per-step). DELTA (only the new part, vLLM's streaming form) is not
    supported here."""

    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


@dataclasses.dataclass(kw_only=True, frozen=True)
class StructuredOutputsParams:
    """vLLM's constraint on the output: exactly one of a JSON schema (a dict or its JSON text), a regex, a list of
    choices, a Lark grammar, or json_object=True (any JSON object). Whether a grammar compiles is checked when the
    engine validates the request."""

    json: dict | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None

    def __post_init__(self) -> None:
        kinds = [name for name in ("json", "regex", "choice", "grammar") if getattr(self, name) is not None]
        kinds += ["json_object"] if self.json_object else []
        if len(kinds) != 1:
            raise ValueError("structured_outputs must set exactly one of json, regex, choice, grammar, json_object; "
                             f"got {kinds or 'none'}.")
        for name in ("regex", "grammar"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ValueError(f"structured_outputs.{name} must be a string.")
        if self.choice is not None:
            if (not isinstance(self.choice, list | tuple) or not self.choice
                    or not all(isinstance(c, str) for c in self.choice)):
                raise ValueError("structured_outputs.choice must be a non-empty list of strings.")
            object.__setattr__(self, "choice", list(self.choice))


@dataclasses.dataclass(kw_only=True)
class SamplingParams:
    """vLLM's SamplingParams (keyword-only here so that a positional call cannot silently shift fields).

    After construction: `stop` is a list[str], `stop_token_ids` a list[int], `seed=-1` is None, `top_k=-1` is 0,
    `logprobs=True` is 1, `logit_bias` keys are ints; a greedy request (temperature < 1e-5) has top_p=1, top_k=0,
    min_p=0. `max_tokens=None` means "up to max_model_len" and is resolved by `validate_request`.
    """

    n: int = 1
    best_of: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    # Research (issue 20): the residual stream per layer (True: every layer, or a list of indices 0..L) in
    # CompletionOutput.hidden_states, and vectors added to the stream after decoder layers (layer -> [D] values).
    return_hidden_states: bool | list[int] = False
    steering: dict[int, list[float]] | None = None
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self) -> None:
        self._normalize()
        self._verify()
        if self.temperature < SAMPLING_EPS:
            self.top_p, self.top_k, self.min_p = 1.0, 0, 0.0
        elif self.temperature < MIN_TEMPERATURE:
            logger.warning("temperature %s is below %s; raised to %s to avoid inf/NaN logits",
                           self.temperature, MIN_TEMPERATURE, MIN_TEMPERATURE)
            self.temperature = MIN_TEMPERATURE

    def _normalize(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        elif self.stop is None:
            self.stop = []
        elif isinstance(self.stop, (list, tuple)):
            self.stop = list(self.stop)
        else:
            raise ValueError(f"stop must be a string or a list of strings, got {type(self.stop).__name__}.")
        self.stop_token_ids = _int_list("stop_token_ids", self.stop_token_ids or [])
        if self.allowed_token_ids is not None:
            self.allowed_token_ids = _int_list("allowed_token_ids", self.allowed_token_ids)
        if self.seed == -1 and not isinstance(self.seed, bool):
            self.seed = None
        if self.top_k == -1 and not isinstance(self.top_k, bool):
            self.top_k = 0
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if isinstance(value, bool):  # vLLM: logprobs=True means the sampled token's logprob only
                setattr(self, name, 1 if value else None)
        if self.logit_bias is not None:
            self.logit_bias = _logit_bias(self.logit_bias)
        self.return_hidden_states = _hidden_layers(self.return_hidden_states)
        if self.steering is not None:
            self.steering = _steering(self.steering)
        if isinstance(self.structured_outputs, dict):
            self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
        elif self.structured_outputs is not None and not isinstance(self.structured_outputs,
                                                                    StructuredOutputsParams):
            raise ValueError("structured_outputs must be a StructuredOutputsParams, got "
                             f"{type(self.structured_outputs).__name__}.")
        try:
            self.output_kind = RequestOutputKind(self.output_kind)
        except ValueError:
            raise ValueError(f"output_kind must be a RequestOutputKind, got {self.output_kind!r}.") from None

    def _verify(self) -> None:
        _check_int("n", self.n, lo=1)
        if self.best_of is not None:
            _check_int("best_of", self.best_of, lo=1)
            if self.best_of != self.n:
                raise ValueError(f"best_of must equal n ({self.n}) when given, got {self.best_of}; "
                                 "best_of > n is not supported.")
        _check_float("presence_penalty", self.presence_penalty, lo=-2.0, hi=2.0)
        _check_float("frequency_penalty", self.frequency_penalty, lo=-2.0, hi=2.0)
        _check_float("repetition_penalty", self.repetition_penalty, lo=0.0, lo_open=True)
        _check_float("temperature", self.temperature, lo=0.0)
        _check_float("top_p", self.top_p, lo=0.0, hi=1.0, lo_open=True)
        _check_int("top_k", self.top_k, lo=-1)
        _check_float("min_p", self.min_p, lo=0.0, hi=1.0)
        if self.seed is not None:
            _check_int("seed", self.seed, lo=-2**63, hi=2**63 - 1)
        if self.max_tokens is not None:
            _check_int("max_tokens", self.max_tokens, lo=1)
        _check_int("min_tokens", self.min_tokens, lo=0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens must be at most max_tokens ({self.max_tokens}), got {self.min_tokens}.")
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), lo=0)
        for s in self.stop:
            if not isinstance(s, str):
                raise ValueError(f"stop must contain only strings, got {type(s).__name__}.")
            if not s:
                raise ValueError("stop cannot contain an empty string.")
        if self.allowed_token_ids is not None and not self.allowed_token_ids:
            raise ValueError("allowed_token_ids must not be empty when given.")
        if self.output_kind is RequestOutputKind.DELTA:
            raise ValueError("output_kind must be RequestOutputKind.CUMULATIVE or FINAL_ONLY (DELTA is not supported).")
        for name in ("include_stop_str_in_output", "ignore_eos", "skip_special_tokens",
                     "spaces_between_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a boolean, got {getattr(self, name)!r}.")

    @property
    def sampling_type(self) -> SamplingType:
        if self.temperature < SAMPLING_EPS:
            return SamplingType.GREEDY
        return SamplingType.RANDOM if self.seed is None else SamplingType.RANDOM_SEED

    @property
    def is_greedy(self) -> bool:
        return self.sampling_type is SamplingType.GREEDY

    @property
    def output_text_buffer_length(self) -> int:
        """Characters the detokenizer holds back while a stop string could still be completing (vLLM's rule)."""
        if self.stop and not self.include_stop_str_in_output:
            return max(len(s) for s in self.stop) - 1
        return 0

    def clone(self) -> "SamplingParams":
        # After _normalize only the lists and dicts are mutable (their items are not): copying those is a deep copy
        # at a tenth of copy.deepcopy's cost (docs/perf-notes.md#host-work-per-request).
        twin = copy.copy(self)
        for name, value in vars(self).items():
            if isinstance(value, (list, dict)):
                setattr(twin, name, copy.copy(value))
        return twin


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_int(name: str, value, *, lo: int | None = None, hi: int | None = None) -> None:
    if not _is_int(value):
        raise ValueError(f"{name} must be an integer, got {value!r}.")
    if lo is not None and hi is not None and not lo <= value <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value}.")
    if lo is not None and value < lo:
        raise ValueError(f"{name} must be at least {lo}, got {value}.")


def _check_float(name: str, value, *, lo: float, hi: float | None = None, lo_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}.")
    if (value <= lo if lo_open else value < lo) or (hi is not None and value > hi):
        interval = f"{'(' if lo_open else '['}{lo}, {hi}]" if hi is not None else None
        limit = f"in {interval}" if interval else f"{'greater than' if lo_open else 'at least'} {lo}"
        raise ValueError(f"{name} must be {limit}, got {value}.")


def _is_list(values) -> bool:
    """An iterable of items (a str or bytes is one value, not a list)."""
    return hasattr(values, "__iter__") and not isinstance(values, (str, bytes))


def _json_key(key):
    """JSON object keys are strings: "123" stands for 123, as OpenAI's logit_bias takes it."""
    return int(key) if isinstance(key, str) and key.strip().isdigit() else key


def _int_list(name: str, values) -> list[int]:
    if not _is_list(values):
        raise ValueError(f"{name} must be a list of token ids, got {type(values).__name__}.")
    values = list(values)
    for v in values:
        if not _is_int(v) or v < 0:
            raise ValueError(f"{name} must contain only non-negative integer token ids, got {v!r}.")
    return [int(v) for v in values]


def _logit_bias(bias) -> dict[int, float]:
    if not isinstance(bias, dict):
        raise ValueError(f"logit_bias must be a mapping of token id to bias, got {type(bias).__name__}.")
    out = {}
    for key, value in bias.items():
        key = _json_key(key)
        if not _is_int(key) or key < 0:
            raise ValueError(f"logit_bias keys must be non-negative integer token ids, got {key!r}.")
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise ValueError(f"logit_bias values must be finite numbers, got {value!r} for token {key}.")
        out[int(key)] = float(value)
    return out


def _hidden_layers(value) -> bool | list[int]:
    if isinstance(value, bool):
        return value
    if not _is_list(value):
        raise ValueError(f"return_hidden_states must be a boolean or a list of layer indices, got {value!r}.")
    layers = list(value)
    if not layers or not all(_is_int(v) for v in layers):
        raise ValueError(f"return_hidden_states must be a non-empty list of integer layer indices, got {layers!r}.")
    return [int(v) for v in layers]


def _steering(value) -> dict[int, tuple[float, ...]]:
    """layer -> vector as plain floats."""
    if not isinstance(value, dict):
        raise ValueError(f"steering must be a mapping of layer to vector, got {type(value).__name__}.")
    out = {}
    for key, vector in value.items():
        key = _json_key(key)
        if not _is_int(key):
            raise ValueError(f"steering keys must be integer layer indices, got {key!r}.")
        if not _is_list(vector):
            raise ValueError(f"steering[{key}] must be a list of numbers, got {type(vector).__name__}.")
        try:
            floats = tuple(float(v) for v in vector)
        except (TypeError, ValueError):
            raise ValueError(f"steering[{key}] must contain only numbers.") from None
        if not all(map(math.isfinite, floats)):
            raise ValueError(f"steering[{key}] must contain only finite numbers (no NaN or inf).")
        out[int(key)] = floats
    return out
