"""Batch -> padded step inputs: one int32 buffer on the host, one transfer, unpacked by static slices on device."""

import dataclasses
import itertools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.kv_cache import NULL_BLOCK, AttentionMetadata
from jaxllm.runtime.buckets import BatchLayout

assert NULL_BLOCK == 0, "pack pads block tables by leaving the buffer's zeros"


def fed_token(row: int) -> int:
    """The token id that stands for "the token the previous step sampled in `row`": how a run-ahead placeholder
    (scheduling.sequence.RUN_AHEAD_TOKEN) is sent, so step N + 1 is dispatched while step N still runs."""
    return -(row + 1)


def resolve_fed_tokens(token_ids: jax.Array, last_tokens: jax.Array) -> jax.Array:
    """Inside the jitted step: each `fed_token(r)` replaced by last_tokens[r], the previous step's sampled ids."""
    fed = last_tokens[jnp.clip(-token_ids - 1, 0, last_tokens.shape[0] - 1)]
    return jnp.where(token_ids < 0, fed, token_ids)


@dataclasses.dataclass(frozen=True)
class SeqWork:
    """One sequence's share of a step: the tokens it computes now and where its KV lives."""

    token_ids: Sequence[int]  # the tokens computed this step
    start_pos: int  # position of token_ids[0] in the sequence
    block_table: Sequence[int]  # physical blocks covering positions [0, start_pos + len(token_ids))


def _sections(layout: BatchLayout) -> list[tuple[str, tuple[int, ...]]]:
    t, s, m = layout.num_tokens, layout.num_seqs, layout.max_blocks
    return [("token_ids", (t,)), ("positions", (t,)), ("slot_mapping", (t,)), ("block_tables", (s, m)),
            ("seq_lens", (s,)), ("query_start_loc", (s + 1,)), ("logits_indices", (layout.num_logits,))]


def pack(work: Sequence[SeqWork], layout: BatchLayout, block_size: int) -> np.ndarray:
    """Lay the batch out in one i32 buffer. Padding tokens write to the null block and belong to no sequence.

    Vectorised over tokens, and the sections are views of the one zeroed buffer (no copy to join them; zero is the
    null block the block tables are padded with): docs/perf-notes.md#host-work-per-step."""
    buffer = np.zeros(buffer_size(layout), np.int32)
    arrays, offset = {}, 0
    for name, shape in _sections(layout):
        size = math.prod(shape)  # not np.prod, slow on a tuple (docs/perf-notes.md#host-work-per-step)
        arrays[name] = buffer[offset:offset + size].reshape(shape)
        offset += size
    lengths = np.fromiter((len(w.token_ids) for w in work), np.int32, len(work))
    num_seqs, num_real = len(work), int(lengths.sum())
    ends = np.cumsum(lengths, dtype=np.int32)
    tables = arrays["block_tables"]
    for s, w in enumerate(work):
        tables[s, :len(w.block_table)] = w.block_table
    seq = np.repeat(np.arange(num_seqs, dtype=np.int32), lengths)  # [real tokens]
    starts = np.fromiter((w.start_pos for w in work), np.int32, num_seqs)
    positions = starts[seq] + np.arange(num_real, dtype=np.int32) - (ends - lengths)[seq]
    arrays["token_ids"][:num_real] = np.fromiter(itertools.chain.from_iterable(w.token_ids for w in work), np.int32,
                                                 num_real)
    arrays["positions"][:num_real] = positions
    arrays["slot_mapping"][:] = NULL_BLOCK * block_size
    arrays["slot_mapping"][:num_real] = tables[seq, positions // block_size] * block_size + positions % block_size
    arrays["seq_lens"][:num_seqs] = starts + lengths
    arrays["query_start_loc"][1:num_seqs + 1] = ends
    arrays["query_start_loc"][num_seqs + 1:] = num_real
    if layout.all_logits:
        arrays["logits_indices"][:] = np.arange(layout.num_tokens)
    else:
        arrays["logits_indices"][:num_seqs] = ends - 1
    return buffer


def successor_rows(work: Sequence[SeqWork], successors: Sequence[Sequence[int]], num_tokens: int,
                   num_seqs: int) -> tuple[np.ndarray, np.ndarray]:
    """Each sequence's last token row, and every token row's successor id laid out like the step's tokens."""
    last_rows = np.zeros(num_seqs, np.int32)
    next_ids = np.zeros(num_tokens, np.int32)
    start = 0
    for s, (w, following) in enumerate(zip(work, successors)):
        n = len(w.token_ids)
        next_ids[start:start + n] = following
        last_rows[s] = start + n - 1
        start += n
    return last_rows, next_ids


def unpack(buffer: jax.Array, layout: BatchLayout) -> tuple[jax.Array, AttentionMetadata, jax.Array]:
    """Inside the jitted step: split the buffer back into (token_ids, metadata, logits_indices)."""
    arrays, offset = {}, 0  # the step's sections come first in the buffer; anything after them is not ours
    for name, shape in _sections(layout):
        size = math.prod(shape)
        arrays[name] = jax.lax.slice(buffer, (offset,), (offset + size,)).reshape(shape)
        offset += size
    metadata = AttentionMetadata(
        positions=arrays["positions"], slot_mapping=arrays["slot_mapping"], block_tables=arrays["block_tables"],
        seq_lens=arrays["seq_lens"], query_start_loc=arrays["query_start_loc"], decode_only=layout.decode_only)
    return arrays["token_ids"], metadata, arrays["logits_indices"]


def buffer_size(layout: BatchLayout) -> int:
    return sum(math.prod(shape) for _, shape in _sections(layout))


def abstract_buffer(layout: BatchLayout, sharding: jax.sharding.Sharding | None = None) -> jax.ShapeDtypeStruct:
    """The step's input buffer as jit sees it; no sharding: the host array `pack` makes. The sharding must be the
    real buffer's: it is part of the program's identity, and a start-up compile for any other would be a different
    program that no step ever runs."""
    return jax.ShapeDtypeStruct((buffer_size(layout),), jnp.int32, sharding=sharding)
