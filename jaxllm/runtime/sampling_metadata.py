"""Per-row sampling parameters as padded device arrays, and the host-side builder that packs them.

Legend: S rows (sequences that sample a token this step, padded to a bucket), V vocabulary size,
Lo / Lp output / prompt history lengths, Kb logit_bias entries, Ka allowed ids, Ks stop ids (all padded).

Padded id lists use -1 for "no entry"; the sampler drops those ids instead of letting them wrap to V - 1.
Padding rows are greedy with no penalties, bias or masks, so they cost little and never touch real rows.
"""

import dataclasses
import functools
from collections.abc import Sequence

import jax
import numpy as np

from jaxllm.sampling_params import SAMPLING_EPS, SamplingParams

# Top-logprob counts are rounded up to one of these so the compiled sampler sees few shapes; requests above the
# last bucket get their exact count. -1 (no logprobs at all) is the static value when no row asks for any.
LOGPROBS_BUCKETS = (0, 5, 20)
MIN_HISTORY_BUCKET = 16
PAD_ID = -1


@dataclasses.dataclass(frozen=True)
class SamplingRow:
    """One sequence to sample for.

    seed: the request's seed, or one the engine derives for unseeded requests (any Python int, taken mod 2**64).
    sample_index: which of the request's n samples this is. position: the position the sampled token will take;
    None means len(prompt_token_ids) + len(output_token_ids). eos_token_ids: the model's EOS ids, masked together
    with stop_token_ids while fewer than min_tokens tokens have been generated.
    """

    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    seed: int
    sample_index: int = 0
    position: int | None = None
    eos_token_ids: Sequence[int] = ()
    constants: "RowConstants | None" = None  # RowConstants.of(this row), cached by a caller that builds every step
    num_output_tokens: int | None = None  # when given, the histories are read only for rows with penalties
    token_bitmask: "np.ndarray | None" = None  # i32[ceil(V/32)]: a constrained row's allowed tokens, bit t = token t


@dataclasses.dataclass(frozen=True)
class RowConstants:
    """The part of a row that never changes during a request, converted and validated once: an engine caches it
    per sample so building a 256-row batch costs a few array copies, not thousands of attribute reads."""

    temperature: float  # 1.0 on greedy rows so nothing divides by ~0
    greedy: bool
    top_k: int  # 0 = off
    top_p: float
    min_p: float
    presence_penalty: float
    frequency_penalty: float
    repetition_penalty: float
    seed: int  # in [0, 2**64)
    sample_index: int
    stop_ids: tuple[int, ...]  # EOS + stop_token_ids, masked while fewer than min_tokens were generated
    min_tokens: int
    bias_ids: tuple[int, ...]
    bias_values: tuple[float, ...]
    allowed_ids: tuple[int, ...]
    logprobs: int  # -1: none; else the number of top logprobs wanted (vocab_size for "all")

    @classmethod
    def of(cls, row: SamplingRow, vocab_size: int) -> "RowConstants":
        p = row.params
        greedy = p.temperature < SAMPLING_EPS
        k = int(p.top_k or 0)
        stop = sorted(set(list(p.stop_token_ids or ()) + list(row.eos_token_ids)))
        _check_ids(stop, vocab_size, "stop_token_ids")
        bias = p.logit_bias or {}
        bias_ids = tuple(int(t) for t in bias)
        _check_ids(bias_ids, vocab_size, "logit_bias")
        allowed = tuple(p.allowed_token_ids or ())
        _check_ids(allowed, vocab_size, "allowed_token_ids")
        lp = p.logprobs  # vLLM reads logprobs=-1 as "the whole vocabulary"
        logprobs = -1 if lp is None else (vocab_size if int(lp) < 0 else min(int(lp), vocab_size))
        return cls(temperature=1.0 if greedy else float(p.temperature), greedy=greedy,
                   top_k=0 if k <= 0 or k >= vocab_size else k,  # vLLM: top_k -1 is off
                   top_p=float(p.top_p), min_p=float(p.min_p), presence_penalty=float(p.presence_penalty),
                   frequency_penalty=float(p.frequency_penalty), repetition_penalty=float(p.repetition_penalty),
                   seed=int(row.seed) % (1 << 64), sample_index=row.sample_index, stop_ids=tuple(stop),
                   min_tokens=int(p.min_tokens or 0), bias_ids=bias_ids,
                   bias_values=tuple(float(v) for v in bias.values()), allowed_ids=allowed, logprobs=logprobs)

    @functools.cached_property
    def scalar_row(self) -> tuple:
        """The scalar fields as one row of `_SCALARS`, in its order: a batch converts them all in one call."""
        return (self.temperature, self.greedy, self.top_k, self.top_p, self.min_p, self.presence_penalty,
                self.frequency_penalty, self.repetition_penalty, self.seed >> 32, self.seed & 0xFFFFFFFF,
                self.sample_index)


# The columns of RowConstants.scalar_row, and a padding row's values: greedy, no filters, no penalties, seed 0.
_SCALARS = ("temperature", "greedy", "top_k", "top_p", "min_p", "presence_penalty", "frequency_penalty",
            "repetition_penalty", "seed_hi", "seed_lo", "sample_index")
_PADDING_SCALARS = np.array([1.0, 1, 0, 1.0, 0.0, 0.0, 0.0, 1.0, 0, 0, 0], np.float64)


def _num_outputs(row: SamplingRow) -> int:
    return len(row.output_token_ids) if row.num_output_tokens is None else row.num_output_tokens


def _bucket(n: int, minimum: int = 1) -> int:
    """Next power of two >= max(n, minimum)."""
    n = max(n, minimum)
    return 1 << (n - 1).bit_length()


def _padded(lists: list[Sequence[int]], rows: int, minimum: int = 1, dtype=np.int32, fill=PAD_ID) -> np.ndarray:
    width = _bucket(max((len(x) for x in lists), default=0), minimum)
    out = np.full((rows, width), fill, dtype)
    for i, x in enumerate(lists):
        out[i, :len(x)] = x
    return out


def _check_ids(ids: Sequence[int], vocab_size: int, field: str) -> None:
    """validation.py refused out-of-vocabulary ids when the request came in."""
    assert all(0 <= t < vocab_size for t in ids), (field, [t for t in ids if not 0 <= t < vocab_size][:5])


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["temperature", "greedy", "top_k", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                 "repetition_penalty", "seed", "sample_index", "position", "suppress_stop", "stop_ids", "bias_ids",
                 "bias_values", "allowed_ids", "output_ids", "prompt_ids", "token_bitmask"],
    meta_fields=["num_logprobs", "all_greedy", "any_penalties", "any_topk_topp_minp", "any_bias_or_mask",
                 "any_grammar"],
)
@dataclasses.dataclass(frozen=True)
class SamplingMetadata:
    """Everything the on-device sampler needs, one entry per row. Built on the host by `build` (numpy leaves);
    the caller moves it to the device with the rest of the step's inputs in one transfer.

    The static flags only let the compiled sampler skip work that no row needs; a flag that is True while no row
    uses the feature gives the same tokens, only slower. Arrays a False flag makes unused are [S, 1] of padding.
    """

    temperature: jax.Array  # f32[S]   1.0 on greedy rows so nothing divides by ~0
    greedy: jax.Array  # bool[S]       temperature < SAMPLING_EPS: take the argmax of the processed logits
    top_k: jax.Array  # i32[S]         0 = off
    top_p: jax.Array  # f32[S]         1.0 = off
    min_p: jax.Array  # f32[S]         0.0 = off
    presence_penalty: jax.Array  # f32[S]
    frequency_penalty: jax.Array  # f32[S]
    repetition_penalty: jax.Array  # f32[S]  1.0 = off
    seed: jax.Array  # u32[S, 2]       (high, low) words of the 64-bit seed: the threefry key data of PRNGKey(seed)
    sample_index: jax.Array  # i32[S]  folded into the key so the n samples of one request differ
    position: jax.Array  # i32[S]      folded into the key so every position draws fresh noise
    suppress_stop: jax.Array  # bool[S]  fewer than min_tokens generated: mask stop_ids
    stop_ids: jax.Array  # i32[S, Ks]  EOS + stop_token_ids, -1 padded
    bias_ids: jax.Array  # i32[S, Kb]  logit_bias keys, -1 padded
    bias_values: jax.Array  # f32[S, Kb]  logit_bias values, 0 on padding
    allowed_ids: jax.Array  # i32[S, Ka]  allowed_token_ids, -1 padded; a row with no entry is unrestricted
    output_ids: jax.Array  # i32[S, Lo]  generated tokens so far, -1 padded (presence/frequency/repetition)
    prompt_ids: jax.Array  # i32[S, Lp]  prompt tokens, -1 padded (repetition only, as vLLM)
    # i32[S, ceil(V/32)] packed allowed-token bits (all ones on unconstrained rows); [S, 1] unless any_grammar.
    token_bitmask: jax.Array
    num_logprobs: int = -1  # static: -1 none; else top-k width returned (a LOGPROBS_BUCKETS entry or larger)
    all_greedy: bool = True  # static: no row samples at random, so no noise is drawn
    any_penalties: bool = False  # static: some row has a presence, frequency or repetition penalty
    any_topk_topp_minp: bool = False  # static: some random row filters by top-k, top-p or min-p (needs a sort)
    any_bias_or_mask: bool = False  # static: some row has logit_bias, allowed_token_ids or masked stop ids
    any_grammar: bool = False  # static: some row is constrained by a grammar (token_bitmask is full width)

    @property
    def num_rows(self) -> int:
        return self.temperature.shape[0]

    @classmethod
    def build(cls, rows: Sequence[SamplingRow], *, pad_rows_to: int, vocab_size: int) -> "SamplingMetadata":
        """Packs rows into numpy arrays padded to `pad_rows_to` rows and power-of-two list widths.

        Raises ValueError when rows exceed pad_rows_to; token ids outside [0, vocab_size) are an AssertionError
        naming the field (validation.py refuses them when a request comes in).
        """
        n = len(rows)
        if n > pad_rows_to:
            raise ValueError(f"{n} sampling rows exceed pad_rows_to={pad_rows_to}")
        S = pad_rows_to
        consts = [row.constants or RowConstants.of(row, vocab_size) for row in rows]
        scalars = np.tile(_PADDING_SCALARS, (S, 1))
        if n:
            scalars[:n] = [c.scalar_row for c in consts]
        column = {name: scalars[:, i] for i, name in enumerate(_SCALARS)}
        temperature, top_p, min_p = (column[f].astype(np.float32) for f in ("temperature", "top_p", "min_p"))
        presence, frequency, repetition = (column[f].astype(np.float32) for f in
                                           ("presence_penalty", "frequency_penalty", "repetition_penalty"))
        greedy = column["greedy"] != 0
        top_k, sample_index = column["top_k"].astype(np.int32), column["sample_index"].astype(np.int32)
        seed = scalars[:, _SCALARS.index("seed_hi"):_SCALARS.index("seed_lo") + 1].astype(np.uint32)
        position = np.zeros((S,), np.int32)
        position[:n] = [len(r.prompt_token_ids) + len(r.output_token_ids) if r.position is None else r.position
                        for r in rows]
        suppress = np.zeros((S,), bool)
        suppress[:n] = [bool(c.stop_ids) and _num_outputs(r) < c.min_tokens for r, c in zip(rows, consts)]
        stop = [c.stop_ids if suppress[i] else () for i, c in enumerate(consts)]
        bias_ids = [c.bias_ids for c in consts]
        bias_vals = [c.bias_values for c in consts]
        allowed = [c.allowed_ids for c in consts]
        max_logprobs = max((c.logprobs for c in consts), default=-1)
        random = ~greedy[:n]
        flags = dict(
            all_greedy=not random.any(),
            any_penalties=bool((presence != 0).any() or (frequency != 0).any() or (repetition != 1).any()),
            any_topk_topp_minp=bool(((top_k[:n] > 0) | (top_p[:n] < 1) | (min_p[:n] > 0))[random].any()),
            any_bias_or_mask=bool(any(bias_ids) or any(allowed) or suppress.any()),
        )
        if max_logprobs >= 0:
            max_logprobs = next((b for b in LOGPROBS_BUCKETS if b >= max_logprobs), max_logprobs)
        # Only steps with a constrained row carry the full-width mask: one more compiled variant per bucket, used by
        # any number of requests, and unconstrained batches send no [S, V/32] array.
        constrained = [i for i, r in enumerate(rows) if r.token_bitmask is not None]
        flags["any_grammar"] = bool(constrained)
        bitmask = np.full((S, (vocab_size + 31) // 32 if constrained else 1), -1, np.int32)
        for i in constrained:
            bitmask[i] = rows[i].token_bitmask
        history = flags["any_penalties"]
        masks = flags["any_bias_or_mask"]
        outputs = [r.output_token_ids for r in rows] if history else []
        prompts = [r.prompt_token_ids for r in rows] if history else []
        return cls(
            temperature=temperature, greedy=greedy, top_k=top_k, top_p=top_p, min_p=min_p,
            presence_penalty=presence, frequency_penalty=frequency, repetition_penalty=repetition,
            seed=seed, sample_index=sample_index, position=position, suppress_stop=suppress,
            stop_ids=_padded(stop if masks else [], S),
            bias_ids=_padded(bias_ids if masks else [], S),
            bias_values=_padded(bias_vals if masks else [], S, dtype=np.float32, fill=0.0),
            allowed_ids=_padded(allowed if masks else [], S),
            output_ids=_padded(outputs, S, MIN_HISTORY_BUCKET if history else 1),
            prompt_ids=_padded(prompts, S, MIN_HISTORY_BUCKET if history else 1),
            token_bitmask=bitmask, num_logprobs=max_logprobs, **flags,
        )
