"""On-device sampling: processed logits -> one token per row, plus logprobs of the raw logits when asked.

Legend: S rows (padded), V vocabulary size, T prompt tokens, k top logprobs returned.

The order follows vLLM V1's Sampler: logprobs from the raw logits; then a grammar's token bitmask (vLLM applies it
before its sampler); then allowed_token_ids, min_tokens stop masking and
logit_bias; then repetition / frequency / presence penalties; greedy rows take the argmax of that; random rows divide
by temperature, drop tokens under min-p, then apply top-k and top-p, and draw with the Gumbel-max trick using the
row's own key, fold_in(fold_in(PRNGKey(seed), sample_index), position), so a seeded request's tokens depend on
neither the batch around it nor preemption.

These functions are traced inside the runner's jitted step (all jit sites live there); the static fields of
SamplingMetadata select the compiled variant.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jaxllm.runtime.sampling_metadata import SamplingMetadata


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["token_logprob", "rank", "top_ids", "top_logprobs"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class Logprobs:
    """Logprobs of the raw logits for one chosen token per row (sampled, or the next prompt token)."""

    token_logprob: jax.Array  # f32[S]  logprob of the chosen token
    rank: jax.Array  # i32[S]           1 + number of tokens with a strictly higher logprob (1 = top)
    top_ids: jax.Array  # i32[S, k]     highest-logprob tokens, best first
    top_logprobs: jax.Array  # f32[S, k]  their logprobs, descending


@functools.partial(jax.tree_util.register_dataclass, data_fields=["token_ids", "logprobs"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class SamplerOutput:
    """What goes back to the host: token ids, and logprobs only when some row asked for them."""

    token_ids: jax.Array  # i32[S]
    logprobs: Logprobs | None = None


def _row_ids(ids: jax.Array, vocab_size: int) -> tuple[jax.Array, jax.Array]:
    """Index pair for scattering a padded [S, L] id list into [S, V]. -1 padding becomes V, which mode="drop"
    discards; left negative, JAX would wrap it onto token V - 1."""
    return jnp.arange(ids.shape[0])[:, None], jnp.where(ids < 0, vocab_size, ids)


def _id_mask(ids: jax.Array, vocab_size: int) -> jax.Array:  # bool[S, V]
    mask = jnp.zeros((ids.shape[0], vocab_size), bool)
    return mask.at[_row_ids(ids, vocab_size)].set(True, mode="drop")


def _apply_masks_and_bias(logits: jax.Array, md: SamplingMetadata) -> jax.Array:
    S, V = logits.shape
    restricted = (md.allowed_ids >= 0).any(axis=-1)  # bool[S]  an empty list means "no restriction"
    blocked = restricted[:, None] & ~_id_mask(md.allowed_ids, V)
    blocked |= md.suppress_stop[:, None] & _id_mask(md.stop_ids, V)
    bias = jnp.zeros((S, V), jnp.float32).at[_row_ids(md.bias_ids, V)].add(md.bias_values, mode="drop")
    return jnp.where(blocked, -jnp.inf, logits + bias)


def unpack_bitmask(bitmask: jax.Array, vocab_size: int) -> jax.Array:
    """Packed i32[S, ceil(V/32)] -> bool[S, V]: token t is allowed iff bit t % 32 of word t // 32 is set."""
    bits = (bitmask[:, :, None] >> jnp.arange(32, dtype=jnp.int32)) & 1  # i32[S, W, 32]
    return bits.reshape(bitmask.shape[0], -1)[:, :vocab_size] != 0


def _apply_penalties(logits: jax.Array, md: SamplingMetadata) -> jax.Array:
    """vLLM's apply_penalties: repetition over prompt + output tokens, presence / frequency over output tokens.
    Counts come from one scatter-add per history, O(S * (V + L)), no sort and no [S, L, V] one-hot."""
    S, V = logits.shape
    counts = jnp.zeros((S, V), jnp.float32).at[_row_ids(md.output_ids, V)].add(1.0, mode="drop")
    generated = counts > 0
    seen = generated | _id_mask(md.prompt_ids, V)
    rep = md.repetition_penalty[:, None]
    # Dividing positive and multiplying negative logits always moves them down (CTRL, Keskar et al. 2019).
    logits = jnp.where(seen, jnp.where(logits > 0, logits / rep, logits * rep), logits)
    return logits - md.frequency_penalty[:, None] * counts - md.presence_penalty[:, None] * generated


def process_logits(logits: jax.Array, md: SamplingMetadata) -> jax.Array:
    """Raw logits f32[S, V] -> the logits greedy rows take the argmax of (masks, bias, penalties)."""
    logits = logits.astype(jnp.float32)
    if md.any_grammar:
        logits = jnp.where(unpack_bitmask(md.token_bitmask, logits.shape[-1]), logits, -jnp.inf)
    if md.any_bias_or_mask:
        logits = _apply_masks_and_bias(logits, md)
    if md.any_penalties:
        logits = _apply_penalties(logits, md)
    return logits


def _filter(logits: jax.Array, md: SamplingMetadata) -> jax.Array:
    """min-p, then top-k, then top-p on temperature-scaled logits (vLLM V1 runs min-p before top-k/top-p).

    Each filter keeps every token whose logit is >= a per-row boundary logit, so tokens tied at the boundary are
    all kept: the result never depends on how tokens are numbered. Top-p keeps the smallest such set whose
    probability (after min-p and top-k) reaches top_p.
    """
    V = logits.shape[-1]
    # p_i >= min_p * p_max  <=>  l_i >= l_max + log(min_p); log(0) = -inf keeps everything.
    floor = logits.max(axis=-1, keepdims=True) + jnp.log(md.min_p)[:, None]
    logits = jnp.where(logits >= floor, logits, -jnp.inf)
    desc = -jnp.sort(-logits, axis=-1)  # f32[S, V]
    k = jnp.where(md.top_k > 0, jnp.minimum(md.top_k, V), V)
    kth = jnp.take_along_axis(desc, (k - 1)[:, None], axis=-1)  # f32[S, 1]
    desc = jnp.where(desc >= kth, desc, -jnp.inf)
    probs = jax.nn.softmax(desc, axis=-1)
    # Token i is in the nucleus iff the mass strictly ahead of it is < top_p, i.e. the mass from it to the end is
    # > 1 - top_p. Summing from the tail (smallest first, as vLLM does) keeps f32 from rounding the head's running
    # sum up to 1.0 and dropping the tail when top_p == 1; the explicit >= 1 keeps that case exact anyway.
    tail = jnp.flip(jnp.cumsum(jnp.flip(probs, -1), axis=-1), -1)
    in_nucleus = (tail > 1.0 - md.top_p[:, None]) | (md.top_p[:, None] >= 1.0)
    last = jnp.maximum(in_nucleus.sum(axis=-1) - 1, 0)  # prefix length - 1: `tail` never increases
    # Never below the top-k boundary: with top_p == 1 the "nucleus" runs into the -inf tail.
    boundary = jnp.maximum(jnp.take_along_axis(desc, last[:, None], axis=-1), kth)
    return jnp.where(logits >= boundary, logits, -jnp.inf)


def row_keys(md: SamplingMetadata) -> jax.Array:
    """key[S]: fold_in(fold_in(PRNGKey(seed), sample_index), position) per row."""
    keys = jax.random.wrap_key_data(md.seed, impl="threefry2x32")
    keys = jax.vmap(jax.random.fold_in)(keys, md.sample_index)
    return jax.vmap(jax.random.fold_in)(keys, md.position)


def compute_logprobs(logits: jax.Array, token_ids: jax.Array, num_logprobs: int) -> Logprobs:
    """log_softmax of logits f32[N, V]; the chosen token_ids i32[N] (clipped into range: pad rows are ignored by
    the caller) get their logprob and rank, plus the top num_logprobs tokens."""
    logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    ids = jnp.clip(token_ids, 0, logits.shape[-1] - 1)
    chosen = jnp.take_along_axis(logprobs, ids[:, None], axis=-1)  # f32[N, 1]
    rank = 1 + (logprobs > chosen).sum(axis=-1, dtype=jnp.int32)
    if num_logprobs > 0:
        top_logprobs, top_ids = jax.lax.top_k(logprobs, num_logprobs)
    else:
        top_logprobs = jnp.zeros((logits.shape[0], 0), jnp.float32)
        top_ids = jnp.zeros((logits.shape[0], 0), jnp.int32)
    return Logprobs(token_logprob=chosen[:, 0], rank=rank, top_ids=top_ids.astype(jnp.int32),
                    top_logprobs=top_logprobs)


def prompt_logprobs(logits: jax.Array, next_token_ids: jax.Array, *, num_logprobs: int) -> Logprobs:
    """Prompt logprobs for a block of positions: logits f32[T, V] predict next_token_ids i32[T].

    Like vLLM, from the raw logits; the caller chunks T so that [T, V] f32 fits in memory.
    """
    if num_logprobs < 0:
        raise ValueError(f"num_logprobs must be >= 0, got {num_logprobs}")
    return compute_logprobs(logits, next_token_ids, num_logprobs)


def sample(logits: jax.Array, md: SamplingMetadata) -> SamplerOutput:
    """logits f32[S, V] (any float dtype) -> SamplerOutput with token_ids i32[S]."""
    processed = process_logits(logits, md)
    token_ids = jnp.argmax(processed, axis=-1).astype(jnp.int32)
    if not md.all_greedy:
        scaled = processed / md.temperature[:, None]
        if md.any_topk_topp_minp:
            scaled = _filter(scaled, md)
        # Gumbel-max: argmax(l + g), g ~ Gumbel(0, 1), is a draw from softmax(l); one noise vector per row key.
        noise = jax.vmap(lambda key: jax.random.gumbel(key, scaled.shape[-1:], jnp.float32))(row_keys(md))
        drawn = jnp.argmax(scaled + noise, axis=-1).astype(jnp.int32)
        token_ids = jnp.where(md.greedy, token_ids, drawn)
    logprobs = None
    if md.num_logprobs >= 0:
        logprobs = compute_logprobs(logits, token_ids, md.num_logprobs)
    return SamplerOutput(token_ids=token_ids, logprobs=logprobs)
