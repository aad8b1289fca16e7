"""The grammar bitmask in the on-device sampler against a numpy reference, and the metadata that carries it."""

import jax
import numpy as np
import pytest

from jaxllm.runtime.sampler import sample, unpack_bitmask
from jaxllm.runtime.sampling_metadata import SamplingMetadata, SamplingRow
from jaxllm.sampling_params import SamplingParams

V = 173  # not a multiple of 32: the last word is partial


def _pack(allowed: np.ndarray) -> np.ndarray:
    """bool[S, V] -> i32[S, ceil(V/32)], the layout llguidance writes (bit t % 32 of word t // 32)."""
    S, n = allowed.shape
    padded = np.zeros((S, -(-n // 32) * 32), bool)
    padded[:, :n] = allowed
    words = (padded.reshape(S, -1, 32).astype(np.uint64) << np.arange(32, dtype=np.uint64)).sum(-1)
    return words.astype(np.uint32).view(np.int32)


def test_unpack_bitmask_matches_numpy():
    rng = np.random.default_rng(0)
    allowed = rng.random((5, V)) < 0.3
    got = np.asarray(jax.jit(unpack_bitmask, static_argnums=1)(_pack(allowed), V))
    np.testing.assert_array_equal(got, allowed)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_sampled_tokens_are_allowed_and_unconstrained_rows_unchanged(temperature):
    rng = np.random.default_rng(1)
    S = 6
    logits = rng.normal(size=(S, V)).astype(np.float32) * 3
    allowed = rng.random((S, V)) < 0.05
    allowed[np.arange(S), rng.integers(0, V, S)] = True  # at least one token per row
    constrained = [0, 2, 3]
    params = SamplingParams(temperature=temperature, top_k=20, top_p=0.9)
    rows = [SamplingRow(params, (), (), seed=10 + i, token_bitmask=_pack(allowed[i:i + 1])[0] if i in constrained
                        else None) for i in range(S)]
    md = SamplingMetadata.build(rows, pad_rows_to=8, vocab_size=V)
    assert md.any_grammar and md.token_bitmask.shape == (8, (V + 31) // 32)
    assert (md.token_bitmask[[1, 4, 5, 6, 7]] == -1).all(), "unconstrained rows are all ones"
    free = SamplingMetadata.build([SamplingRow(params, (), (), seed=10 + i) for i in range(S)], pad_rows_to=8,
                                  vocab_size=V)
    assert not free.any_grammar and free.token_bitmask.shape == (8, 1)
    padded = np.zeros((8, V), np.float32)
    padded[:S] = logits
    got = np.asarray(jax.jit(sample)(padded, md).token_ids)[:S]
    base = np.asarray(jax.jit(sample)(padded, free).token_ids)[:S]
    for i in range(S):
        if i in constrained:
            assert allowed[i, got[i]], (i, got[i])
        else:
            assert got[i] == base[i]
    if temperature == 0:  # greedy: the argmax of the masked logits, the numpy reference
        masked = np.where(allowed, logits, -np.inf)
        np.testing.assert_array_equal(got[constrained], masked[constrained].argmax(-1))
