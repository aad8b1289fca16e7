"""On-device sampler: each feature against a numpy reference or a sampling-frequency check, with fixed seeds."""

import dataclasses

import jax
import numpy as np
import pytest

from jaxllm.runtime.sampler import _filter, process_logits, prompt_logprobs, sample
from jaxllm.runtime.sampling_metadata import SamplingMetadata, SamplingRow

_sample = jax.jit(sample)
_process = jax.jit(process_logits)


@dataclasses.dataclass
class Params:
    """Stands in for SamplingParams (SamplingRow.params): its field names and defaults, without its range checks."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    logit_bias: dict | None = None
    allowed_token_ids: list | None = None
    min_tokens: int = 0
    stop_token_ids: list | None = None
    logprobs: int | None = None


def row(seed=0, prompt=(5, 6), output=(), sample_index=0, position=None, eos=(), **params):
    return SamplingRow(Params(**params), list(prompt), list(output), seed, sample_index, position, tuple(eos))


def run(logits, rows, pad=None, vocab=None):
    logits = np.asarray(logits, np.float32)
    md = SamplingMetadata.build(rows, pad_rows_to=pad or logits.shape[0], vocab_size=vocab or logits.shape[1])
    if logits.shape[0] < md.num_rows:  # padding rows get garbage logits: they must not matter
        extra = np.random.default_rng(99).normal(size=(md.num_rows - logits.shape[0], logits.shape[1])) * 50
        logits = np.concatenate([logits, extra.astype(np.float32)])
    return _sample(logits, md), md, logits


def draws(logits_row, n, **params):
    """n independent draws from one row of logits (one seed per row of a batch)."""
    out, _, _ = run(np.tile(logits_row, (n, 1)), [row(seed=s, **params) for s in range(n)])
    return np.asarray(out.token_ids)


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_greedy_rows_take_argmax_even_beside_random_rows():
    logits = np.random.default_rng(0).normal(size=(6, 97)) * 3
    rows = [row(seed=i, temperature=0.0 if i % 2 == 0 else 1.0) for i in range(6)]
    out, md, _ = run(logits, rows, pad=8)
    assert not md.all_greedy
    tokens = np.asarray(out.token_ids)
    np.testing.assert_array_equal(tokens[[0, 2, 4]], logits[[0, 2, 4]].argmax(-1))
    out, md, _ = run(logits, [row(temperature=0.0)] * 6, pad=8)
    assert md.all_greedy
    np.testing.assert_array_equal(np.asarray(out.token_ids)[:6], logits.argmax(-1))


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_temperature_matches_softmax_frequencies(temperature):
    logits = np.random.default_rng(1).normal(size=8) * 1.5
    n = 4096
    counts = np.bincount(draws(logits, n, temperature=temperature), minlength=8)

    def chi2(t):
        expected = softmax(logits / t) * n
        return ((counts - expected) ** 2 / expected).sum()

    assert chi2(temperature) < 30  # 7 degrees of freedom: p ~ 1e-4
    assert chi2(1.0) > 100  # the draws really follow the scaled distribution, not the raw one


def test_top_k_keeps_exactly_k_and_ties_at_the_boundary():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=32)
    top5 = set(np.argsort(-logits)[:5])
    assert set(draws(logits, 2048, temperature=3.0, top_k=5)) == top5
    order = np.argsort(-logits)
    logits[order[5]] = logits[order[4]]  # a tie at the k-th place: both tied tokens stay
    assert set(draws(logits, 2048, temperature=3.0, top_k=5)) == top5 | {order[5]}


def test_top_p_keeps_the_smallest_nucleus_independent_of_token_order():
    probs = np.array([0.35, 0.25, 0.15, 0.1, 0.05, 0.04, 0.03, 0.03])
    perm = np.random.default_rng(3).permutation(8)
    logits = np.empty(8)
    logits[perm] = np.log(probs)  # token perm[i] has probability probs[i]
    # mass before each sorted token: 0, .35, .60, .75 -> top_p=0.7 keeps three, top_p=0.55 keeps two.
    assert set(draws(logits, 2048, top_p=0.7)) == set(perm[:3])
    assert set(draws(logits, 2048, top_p=0.55)) == set(perm[:2])
    tied = np.log(np.array([0.4, 0.15, 0.15, 0.1, 0.1, 0.1]))
    for order in (np.arange(6), np.array([5, 4, 3, 2, 1, 0])):
        shuffled = np.empty(6)
        shuffled[order] = tied
        # 0.4 then one 0.15 reach 0.5; its twin has the same logit and is kept too, whatever the ids.
        assert set(draws(shuffled, 2048, top_p=0.5)) == set(order[:3])


def test_top_k_with_top_p_one_and_min_p():
    logits = np.random.default_rng(4).normal(size=16)
    assert set(draws(logits, 2048, temperature=2.0, top_k=3, top_p=1.0)) == set(np.argsort(-logits)[:3])
    probs = np.array([0.5, 0.25, 0.15, 0.06, 0.04])
    logits = np.log(probs)
    # min_p=0.25 keeps p >= 0.125 at temperature 1; at temperature 2, (p / p_max) ** 0.5 >= 0.25 keeps all five.
    assert set(draws(logits, 2048, min_p=0.25)) == {0, 1, 2}
    assert set(draws(logits, 2048, min_p=0.25, temperature=2.0)) == {0, 1, 2, 3, 4}


def reference_process(logits, rows, vocab):
    """Straightforward numpy version of vLLM V1's allowed ids, min_tokens, logit_bias and penalties."""
    out = logits.astype(np.float64).copy()
    for i, r in enumerate(rows):
        p = r.params
        if p.allowed_token_ids:
            keep = np.zeros(vocab, bool)
            keep[p.allowed_token_ids] = True
            out[i, ~keep] = -np.inf
        if len(r.output_token_ids) < p.min_tokens:
            out[i, list(p.stop_token_ids or []) + list(r.eos_token_ids)] = -np.inf
        for t, b in (p.logit_bias or {}).items():
            out[i, t] += b
        counts = np.bincount(np.asarray(r.output_token_ids, int), minlength=vocab)
        seen = (counts > 0) | np.isin(np.arange(vocab), r.prompt_token_ids)
        rep = np.where(out[i] > 0, out[i] / p.repetition_penalty, out[i] * p.repetition_penalty)
        out[i] = np.where(seen, rep, out[i])
        out[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0)
    return out


@pytest.mark.parametrize("which", ["presence", "frequency", "repetition", "all"])
def test_penalties_match_numpy_reference(which):
    rng = np.random.default_rng(5)
    vocab, n = 50, 6
    logits = rng.normal(size=(n, vocab)) * 2
    logits[:, vocab - 1] = 4.0  # -1 padding must never reach the last token
    rows = []
    for i in range(n):
        kw = dict(presence_penalty=rng.uniform(-1, 1), frequency_penalty=rng.uniform(-1, 1),
                  repetition_penalty=rng.uniform(0.5, 2.0))
        kw = kw if which == "all" else {f"{which}_penalty": kw[f"{which}_penalty"]}
        prompt = rng.integers(0, vocab - 1, size=rng.integers(0, 20))
        output = rng.integers(0, vocab - 1, size=rng.integers(0, 30))  # repeats: frequency counts > 1
        rows.append(row(prompt=prompt, output=output, temperature=0.0, **(kw if i != 2 else {})))
    md = SamplingMetadata.build(rows, pad_rows_to=8, vocab_size=vocab)
    assert md.any_penalties and md.output_ids.shape[1] == 32
    padded = np.concatenate([logits, rng.normal(size=(2, vocab))]).astype(np.float32)
    got = np.asarray(_process(padded, md))[:n]
    want = reference_process(logits.astype(np.float32), rows, vocab)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert not np.allclose(got, logits)  # the penalties did something
    np.testing.assert_array_equal(np.asarray(_sample(padded, md).token_ids)[:n], want.argmax(-1))


def test_logit_bias_and_allowed_token_ids():
    rng = np.random.default_rng(6)
    vocab = 40
    logits = rng.normal(size=(3, vocab))
    rows = [row(temperature=0.0, logit_bias={7: 10.0, 11: -2.5}),
            row(temperature=0.0, allowed_token_ids=[3, 9, 30]),
            row(temperature=0.0)]
    md = SamplingMetadata.build(rows, pad_rows_to=4, vocab_size=vocab)
    got = np.asarray(_process(np.concatenate([logits, logits[:1]]).astype(np.float32), md))[:3]
    np.testing.assert_allclose(got, reference_process(logits.astype(np.float32), rows, vocab), rtol=1e-6)
    out, _, _ = run(logits, rows, pad=4)
    assert list(np.asarray(out.token_ids)[:3]) == [7, [3, 9, 30][int(np.argmax(logits[1, [3, 9, 30]]))],
                                                   logits[2].argmax()]
    assert set(draws(rng.normal(size=vocab), 1024, temperature=2.0, allowed_token_ids=[3, 9, 30])) == {3, 9, 30}


def test_min_tokens_masks_eos_and_stop_ids_until_reached():
    logits = np.random.default_rng(7).normal(size=(1, 20))
    logits[0, 7], logits[0, 3] = 9.0, 8.0  # EOS is the argmax, a stop id is second
    kw = dict(temperature=0.0, min_tokens=4, stop_token_ids=[3], eos=[7])
    early, _, _ = run(np.repeat(logits, 2, 0), [row(output=[1, 2], **kw), row(output=[1, 2, 5, 6], **kw)])
    assert int(early.token_ids[0]) not in (3, 7)
    assert int(early.token_ids[0]) == np.argsort(-logits[0])[2]
    assert int(early.token_ids[1]) == 7


def seeded_tokens(target, others, index, pad, logits_target, positions):
    """Tokens the target row draws at each position when placed at `index` among `others`."""
    rng = np.random.default_rng(8)
    tokens = []
    for pos in positions:
        rows = list(others)
        rows.insert(index, dataclasses.replace(target, position=pos))
        logits = rng.normal(size=(len(rows), logits_target.shape[0])) * 2
        logits[index] = logits_target
        out, _, _ = run(logits, rows, pad=pad)
        tokens.append(int(out.token_ids[index]))
    return tokens


@pytest.mark.parametrize("filters", [{}, dict(top_p=0.9, top_k=12)])
def test_seeded_row_ignores_batch_composition_padding_and_repeats(filters):
    logits = np.random.default_rng(9).normal(size=64)
    target = row(seed=1234, temperature=1.5, **filters)
    crowd = [row(seed=1, top_k=3), row(seed=2, temperature=0.0, presence_penalty=0.5, output=[4, 4]),
             row(seed=3, logit_bias={5: 3.0}, logprobs=2), row(seed=4, min_p=0.1)]
    positions = range(10, 30)
    alone = seeded_tokens(target, [], 0, 1, logits, positions)
    assert len(set(alone)) > 5  # the stream really varies with position
    assert seeded_tokens(target, crowd[:1], 1, 2, logits, positions) == alone
    assert seeded_tokens(target, crowd, 3, 16, logits, positions) == alone
    assert seeded_tokens(target, [], 0, 1, logits, positions) == alone
    assert seeded_tokens(dataclasses.replace(target, seed=1235), [], 0, 1, logits, positions) != alone


def test_sample_indices_give_different_streams_and_key_follows_the_contract():
    vocab = 64
    logits = np.random.default_rng(10).normal(size=vocab) * 0.5
    seed = 2**40 + 3  # wider than 32 bits: both halves of the key matter
    rows = [row(seed=seed, sample_index=i, position=p, temperature=0.7) for i in range(4) for p in range(16)]
    out, _, _ = run(np.tile(logits, (len(rows), 1)), rows)
    streams = np.asarray(out.token_ids).reshape(4, 16)
    assert len({tuple(s) for s in streams}) == 4
    for i, p in [(0, 0), (2, 5), (3, 15)]:
        key = jax.random.wrap_key_data(np.array([seed >> 32, seed & 0xFFFFFFFF], np.uint32), impl="threefry2x32")
        key = jax.random.fold_in(jax.random.fold_in(key, i), p)
        want = np.argmax(logits / np.float32(0.7) + np.asarray(jax.random.gumbel(key, (vocab,))))
        assert streams[i, p] == want
    small = [row(seed=7, position=p) for p in range(16)]
    out, _, _ = run(np.tile(logits, (16, 1)), small)
    want = [np.argmax(logits + np.asarray(jax.random.gumbel(
        jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(7), 0), p), (vocab,)))) for p in range(16)]
    assert list(np.asarray(out.token_ids)) == want


def test_logprobs_come_from_raw_logits_with_ranks_and_sorted_top_k():
    rng = np.random.default_rng(11)
    vocab = 30
    logits = rng.normal(size=(4, vocab)) * 2
    rows = [row(seed=1, temperature=0.3, logprobs=3, presence_penalty=1.0, output=[1, 2, 2]),
            row(seed=2, top_k=4, logit_bias={0: 5.0}, logprobs=0),
            row(seed=3, temperature=0.0, repetition_penalty=1.8, prompt=[int(logits[2].argmax())]),
            row(seed=4, temperature=2.0, logprobs=1)]
    out, md, _ = run(logits, rows, pad=8)
    assert md.num_logprobs == 5  # max requested 3, rounded up to a bucket
    lp = out.logprobs
    want = log_softmax(logits.astype(np.float32))
    tokens = np.asarray(out.token_ids)[:4]
    assert tokens[2] != logits[2].argmax()  # the penalty moved the sample, but not the logprobs
    np.testing.assert_allclose(np.asarray(lp.token_logprob)[:4], want[np.arange(4), tokens], atol=1e-5)
    ranks = 1 + (want > want[np.arange(4), tokens][:, None]).sum(-1)
    np.testing.assert_array_equal(np.asarray(lp.rank)[:4], ranks)
    np.testing.assert_array_equal(np.asarray(lp.top_ids)[:4], np.argsort(-want, axis=-1)[:, :5])
    top = np.asarray(lp.top_logprobs)[:4]
    np.testing.assert_allclose(top, -np.sort(-want, axis=-1)[:, :5], atol=1e-5)
    assert (np.diff(top, axis=-1) <= 0).all()
    none, md, _ = run(logits, [row(seed=1)] * 4)
    assert md.num_logprobs == -1 and none.logprobs is None
    only, md, _ = run(logits, [row(seed=1, logprobs=0)] * 4)
    assert md.num_logprobs == 0 and only.logprobs.top_ids.shape == (4, 0)


def test_prompt_logprobs_for_a_block_of_positions():
    rng = np.random.default_rng(12)
    logits = (rng.normal(size=(7, 40)) * 3).astype(np.float32)
    next_ids = rng.integers(0, 40, size=7)
    got = jax.jit(prompt_logprobs, static_argnames="num_logprobs")(logits, next_ids, num_logprobs=4)
    want = log_softmax(logits)
    np.testing.assert_allclose(np.asarray(got.token_logprob), want[np.arange(7), next_ids], atol=1e-5)
    np.testing.assert_array_equal(np.asarray(got.rank), 1 + (want > want[np.arange(7), next_ids][:, None]).sum(-1))
    np.testing.assert_array_equal(np.asarray(got.top_ids), np.argsort(-want, axis=-1)[:, :4])


def test_padding_rows_never_change_real_rows():
    rng = np.random.default_rng(13)
    logits = rng.normal(size=(3, 50)) * 2
    rows = [row(seed=5, top_p=0.8, logprobs=2, output=[1, 1, 3], frequency_penalty=0.4),
            row(seed=6, temperature=0.0, allowed_token_ids=[4, 8]), row(seed=7, min_tokens=2, eos=[0])]
    small, _, _ = run(logits, rows, pad=4)
    large, _, _ = run(logits, rows, pad=32)
    for a, b in zip(jax.tree.leaves(small), jax.tree.leaves(large)):
        np.testing.assert_array_equal(np.asarray(a)[:3], np.asarray(b)[:3])


def test_build_pads_to_buckets_sets_flags_and_validates():
    rows = [row(prompt=range(3), output=range(20), repetition_penalty=1.2), row(top_k=5, logit_bias={2: 1.0})]
    md = SamplingMetadata.build(rows, pad_rows_to=8, vocab_size=100)
    assert md.num_rows == 8 and md.output_ids.shape == (8, 32) and md.prompt_ids.shape == (8, 16)
    assert md.bias_ids.shape == (8, 1) and list(md.bias_ids[:2, 0]) == [-1, 2]
    assert (md.any_penalties, md.any_topk_topp_minp, md.any_bias_or_mask, md.all_greedy) == (True, True, True, False)
    assert md.greedy[2:].all() and (md.output_ids[2:] == -1).all()
    plain = SamplingMetadata.build([row(top_k=5, temperature=0.0)], pad_rows_to=2, vocab_size=100)
    assert (plain.any_penalties, plain.any_topk_topp_minp, plain.any_bias_or_mask) == (False, False, False)
    assert plain.output_ids.shape == (2, 1)  # unused history is not shipped
    assert SamplingMetadata.build([row(logprobs=-1)], pad_rows_to=1, vocab_size=100).num_logprobs == 100
    assert list(SamplingMetadata.build([row(seed=-1)], pad_rows_to=1, vocab_size=9).seed[0]) == [2**32 - 1] * 2
    # Requests are validated in validation.py; ids outside the vocabulary reaching the sampler are a bug.
    with pytest.raises(AssertionError, match="logit_bias"):
        SamplingMetadata.build([row(logit_bias={100: 1.0})], pad_rows_to=1, vocab_size=100)
    with pytest.raises(AssertionError, match="allowed_token_ids"):
        SamplingMetadata.build([row(allowed_token_ids=[-2])], pad_rows_to=1, vocab_size=100)
    with pytest.raises(ValueError, match="pad_rows_to"):
        SamplingMetadata.build([row(), row()], pad_rows_to=1, vocab_size=100)


def test_top_p_one_keeps_every_token_of_a_large_vocabulary():
    # f32 running sums over 32k probabilities reach 1.0 early; a top_p=1 row must still lose nothing when
    # another row's filters force the filtering path.
    logits = (np.random.default_rng(14).normal(size=(2, 32000)) * 5).astype(np.float32)
    md = SamplingMetadata.build([row(top_p=1.0), row(top_k=3)], pad_rows_to=2, vocab_size=32000)
    assert md.any_topk_topp_minp
    out = np.asarray(jax.jit(_filter)(logits, md))
    np.testing.assert_array_equal(out[0], logits[0])
    assert np.isfinite(out[1]).sum() == 3
