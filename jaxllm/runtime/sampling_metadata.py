"""Per-row sampling parameters as padded device arrays, and the host-side builder that packs them.

Legend: S rows (sequences that sample a token this step, padded to a bucket), V vocabulary size,
Lo / Lp output / prompt history lengths, Kb logit_bias entries, Ka allowed ids, Ks stop ids (all padded).

Padded id lists use -1 for "no entry"; the sampler drops those ids instead of letting them wrap to V - 1.
Padding rows are greedy with no penalties, bias or masks, so they cost little and never touch real rows.
"""

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

# vLLM's _SAMPLING_EPS: a temperature below this means greedy.
GREEDY_EPS = 1e-5
# Top-logprob counts are rounded up to one of these so the compiled sampler sees few shapes; requests above the
# last bucket get their exact count. -1 (no logprobs at all) is the static value when no row asks for any.
LOGPROBS_BUCKETS = (0, 5, 20)
MIN_HISTORY_BUCKET = 16
PAD_ID = -1


@dataclasses.dataclass(frozen=True)
class SamplingRow:
    """One sequence to sample for. `params` is duck-typed on vLLM's SamplingParams field names.

    seed: the request's seed, or one the engine derives for unseeded requests (any Python int, taken mod 2**64).
    sample_index: which of the request's n samples this is. position: the position the sampled token will take;
    None means len(prompt_token_ids) + len(output_token_ids). eos_token_ids: the model's EOS ids, masked together
    with stop_token_ids while fewer than min_tokens tokens have been generated.
    """

    params: Any
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    seed: int
    sample_index: int = 0
    position: int | None = None
    eos_token_ids: Sequence[int] = ()


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
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"{field} contains token ids outside the vocabulary [0, {vocab_size}): {bad[:5]}")


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["temperature", "greedy", "top_k", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                 "repetition_penalty", "seed", "sample_index", "position", "suppress_stop", "stop_ids", "bias_ids",
                 "bias_values", "allowed_ids", "output_ids", "prompt_ids"],
    meta_fields=["num_logprobs", "all_greedy", "any_penalties", "any_topk_topp_minp", "any_bias_or_mask"],
)
@dataclasses.dataclass(frozen=True)
class SamplingMetadata:
    """Everything the on-device sampler needs, one entry per row. Built on the host by `build` (numpy leaves);
    the caller moves it to the device with the rest of the step's inputs in one transfer.

    The static flags only let the compiled sampler skip work that no row needs; a flag that is True while no row
    uses the feature gives the same tokens, only slower. Arrays a False flag makes unused are [S, 1] of padding.
    """

    temperature: jax.Array  # f32[S]   1.0 on greedy rows so nothing divides by ~0
    greedy: jax.Array  # bool[S]       temperature < GREEDY_EPS: take the argmax of the processed logits
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
    num_logprobs: int = -1  # static: -1 none; else top-k width returned (a LOGPROBS_BUCKETS entry or larger)
    all_greedy: bool = True  # static: no row samples at random, so no noise is drawn
    any_penalties: bool = False  # static: some row has a presence, frequency or repetition penalty
    any_topk_topp_minp: bool = False  # static: some random row filters by top-k, top-p or min-p (needs a sort)
    any_bias_or_mask: bool = False  # static: some row has logit_bias, allowed_token_ids or masked stop ids

    @property
    def num_rows(self) -> int:
        return self.temperature.shape[0]

    @classmethod
    def build(cls, rows: Sequence[SamplingRow], *, pad_rows_to: int, vocab_size: int,
              specialize: bool = True) -> "SamplingMetadata":
        """Packs rows into numpy arrays padded to `pad_rows_to` rows and power-of-two list widths.

        specialize=False turns every static flag on (and logprobs to the last bucket if any row wants them), so a
        runner that compiles ahead of time can trade some speed for fewer compiled variants.
        Raises ValueError naming the field when a token id is outside [0, vocab_size) or rows exceed pad_rows_to.
        """
        n = len(rows)
        if n > pad_rows_to:
            raise ValueError(f"{n} sampling rows exceed pad_rows_to={pad_rows_to}")
        S = pad_rows_to
        f32 = lambda fill: np.full((S,), fill, np.float32)
        temperature, top_p, min_p = f32(1.0), f32(1.0), f32(0.0)
        presence, frequency, repetition = f32(0.0), f32(0.0), f32(1.0)
        greedy = np.ones((S,), bool)
        suppress = np.zeros((S,), bool)
        top_k, sample_index, position = (np.zeros((S,), np.int32) for _ in range(3))
        seed = np.zeros((S, 2), np.uint32)
        stop, bias_ids, bias_vals, allowed, outputs, prompts = [], [], [], [], [], []
        max_logprobs = -1
        for i, row in enumerate(rows):
            p = row.params
            t = float(getattr(p, "temperature", 1.0))
            greedy[i] = t < GREEDY_EPS
            temperature[i] = 1.0 if greedy[i] else t
            k = int(getattr(p, "top_k", 0) or 0)
            top_k[i] = 0 if k <= 0 or k >= vocab_size else k  # vLLM accepts -1 for "off" too
            top_p[i] = float(getattr(p, "top_p", 1.0))
            min_p[i] = float(getattr(p, "min_p", 0.0))
            presence[i] = float(getattr(p, "presence_penalty", 0.0))
            frequency[i] = float(getattr(p, "frequency_penalty", 0.0))
            repetition[i] = float(getattr(p, "repetition_penalty", 1.0))
            s = int(row.seed) % (1 << 64)
            seed[i] = (s >> 32, s & 0xFFFFFFFF)
            sample_index[i] = row.sample_index
            position[i] = (len(row.prompt_token_ids) + len(row.output_token_ids)
                           if row.position is None else row.position)
            ids = list(getattr(p, "stop_token_ids", None) or ()) + list(row.eos_token_ids)
            _check_ids(ids, vocab_size, "stop_token_ids")
            suppress[i] = bool(ids) and len(row.output_token_ids) < int(getattr(p, "min_tokens", 0) or 0)
            stop.append(sorted(set(ids)) if suppress[i] else [])
            bias = getattr(p, "logit_bias", None) or {}
            bias_ids.append([int(t) for t in bias])
            bias_vals.append([float(v) for v in bias.values()])
            _check_ids(bias_ids[-1], vocab_size, "logit_bias")
            allowed.append(list(getattr(p, "allowed_token_ids", None) or ()))
            _check_ids(allowed[-1], vocab_size, "allowed_token_ids")
            outputs.append(row.output_token_ids)
            prompts.append(row.prompt_token_ids)
            lp = getattr(p, "logprobs", None)
            if lp is not None:  # vLLM reads logprobs=-1 as "the whole vocabulary"
                max_logprobs = max(max_logprobs, vocab_size if int(lp) < 0 else min(int(lp), vocab_size))
        random = ~greedy[:n]
        flags = dict(
            all_greedy=not random.any(),
            any_penalties=bool((presence != 0).any() or (frequency != 0).any() or (repetition != 1).any()),
            any_topk_topp_minp=bool(((top_k[:n] > 0) | (top_p[:n] < 1) | (min_p[:n] > 0))[random].any()),
            any_bias_or_mask=bool(any(bias_ids) or any(allowed) or suppress.any()),
        )
        if not specialize:
            flags = {k: k != "all_greedy" for k in flags}
        if max_logprobs >= 0:
            buckets = LOGPROBS_BUCKETS if specialize else LOGPROBS_BUCKETS[-1:]
            max_logprobs = next((b for b in buckets if b >= max_logprobs), max_logprobs)
        history = flags["any_penalties"]
        masks = flags["any_bias_or_mask"]
        return cls(
            temperature=temperature, greedy=greedy, top_k=top_k, top_p=top_p, min_p=min_p,
            presence_penalty=presence, frequency_penalty=frequency, repetition_penalty=repetition,
            seed=seed, sample_index=sample_index, position=position, suppress_stop=suppress,
            stop_ids=_padded(stop if masks else [], S),
            bias_ids=_padded(bias_ids if masks else [], S),
            bias_values=_padded(bias_vals if masks else [], S, dtype=np.float32, fill=0.0),
            allowed_ids=_padded(allowed if masks else [], S),
            output_ids=_padded(outputs if history else [], S, MIN_HISTORY_BUCKET if history else 1),
            prompt_ids=_padded(prompts if history else [], S, MIN_HISTORY_BUCKET if history else 1),
            num_logprobs=max_logprobs, **flags,
        )
