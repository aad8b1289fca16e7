"""Per-request hidden states and activation steering through the engine (issue 20), against the Hugging Face
reference in research.npz: chunked prefill, a mixed batch, prefix caching, n = 2 and preemption; and `llm.model`'s
dense hidden states, inputs_embeds and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import FAMILIES, golden, rel_err
from jaxllm import SamplingParams
from jaxllm.models.state import state_dict

RTOL = 1e-4
CHUNKED = dict(max_num_batched_tokens=16)  # hs_ids' 40-token prompt takes three steps
PROMPT = 40  # hs_ids = prompt_2 (40 ids) + its 31-token greedy continuation
# llama3 fixture in float32: 2 layers x 2 kv heads x 16 tokens x 64 dims x (K, V) x 4 bytes per block.
BLOCK_BYTES = 2 * 2 * 2 * 16 * 64 * 4


def research(family: str) -> dict:
    return golden(family, "research")


def greedy(max_tokens: int, **kwargs) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **kwargs)


def hidden_request(r: dict) -> tuple[dict, SamplingParams]:
    """hs_ids' prompt, continued greedily so the model processes exactly hs_ids."""
    ids = r["hs_ids"].tolist()
    return {"prompt_token_ids": ids[:PROMPT]}, greedy(len(ids) - PROMPT + 1, return_hidden_states=True)


def steered_request(r: dict) -> tuple[dict, SamplingParams]:
    params = greedy(32, steering={int(r["steer_layer"]): r["steer_vector"]})
    return {"prompt_token_ids": r["steer_prompt"].tolist()}, params


@pytest.mark.parametrize("family", FAMILIES)
def test_engine_hidden_states_of_a_chunked_prompt_and_its_continuation_match_hf(tiny_llm, family):
    r = research(family)
    out = tiny_llm(family, **CHUNKED).generate(*hidden_request(r), use_tqdm=False)[0].outputs[0]
    assert out.token_ids[:-1] == r["hs_ids"][PROMPT:].tolist()
    assert out.hidden_states.shape == r["hidden_states"].shape and out.hidden_states.dtype == np.float32
    assert rel_err(out.hidden_states, r["hidden_states"]) <= RTOL


@pytest.mark.parametrize("family", FAMILIES)
def test_dense_hidden_states_of_llm_model_match_hf(tiny_llm, family):
    r = research(family)
    logits, hidden = tiny_llm(family).model(jnp.asarray(r["hs_ids"][None]), return_hidden_states=True)
    assert hidden.shape == (r["hidden_states"].shape[0], 1, *r["hidden_states"].shape[1:])
    assert rel_err(hidden[:, 0], r["hidden_states"]) <= RTOL


@pytest.mark.parametrize("family", FAMILIES)
def test_steered_greedy_matches_hf_with_a_forward_hook(tiny_llm, family):
    r = research(family)
    out = tiny_llm(family, **CHUNKED).generate(*steered_request(r), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == r["steer_greedy"].tolist()
    assert out.hidden_states is None


def test_a_list_of_layers_gives_those_layers_in_its_order(tiny_llm):
    r = research("qwen3")
    prompt, params = hidden_request(r)
    params.return_hidden_states = [3, 0]
    out = tiny_llm("qwen3").generate(prompt, params, use_tqdm=False)[0].outputs[0]
    assert out.hidden_states.shape == (2, *r["hidden_states"].shape[1:])
    assert rel_err(out.hidden_states, r["hidden_states"][[3, 0]]) <= RTOL


def test_mixed_batch_leaves_plain_requests_bit_identical(tiny_llm):
    r = research("llama3")
    llm = tiny_llm("llama3", enable_prefix_caching=False)  # cache hits would change the second run's steps
    rng = np.random.default_rng(3)
    plain = [{"prompt_token_ids": rng.integers(5, 512, int(n)).tolist()} for n in (7, 33, 20)]
    plain_params = greedy(24, logprobs=3)
    (hidden, hidden_params), (steered, steered_params) = hidden_request(r), steered_request(r)
    prompts = [plain[0], hidden, plain[1], steered, plain[2]]
    # The same batch with the research requests made plain: the same steps, the same buckets.
    without = llm.generate(prompts, [plain_params, greedy(hidden_params.max_tokens), plain_params,
                                     greedy(steered_params.max_tokens), plain_params], use_tqdm=False)
    mixed = llm.generate(prompts, [plain_params, hidden_params, plain_params, steered_params, plain_params],
                         use_tqdm=False)
    for row in (0, 2, 4):
        assert mixed[row].outputs[0].token_ids == without[row].outputs[0].token_ids
        assert mixed[row].outputs[0].logprobs == without[row].outputs[0].logprobs  # exactly: they add zeros
        assert mixed[row].outputs[0].hidden_states is None
    assert rel_err(mixed[1].outputs[0].hidden_states, r["hidden_states"]) <= RTOL
    assert mixed[3].outputs[0].token_ids == r["steer_greedy"].tolist()
    assert without[3].outputs[0].token_ids != r["steer_greedy"].tolist()


def test_steered_prefixes_are_never_reused_unsteered(tiny_llm):
    r = research("llama3")
    engine = tiny_llm("llama3").llm_engine
    prompt, steered = steered_request(r)
    prompt = {"prompt_token_ids": prompt["prompt_token_ids"][::-1] * 2}  # 62 ids, three full blocks, not cached yet
    outputs = {}

    def run(request_id, params):
        engine.add_request(request_id, prompt, params)
        engine.step()
        blocks = set(engine.scheduler.get_group(request_id).seqs[0].block_table)
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    outputs[out.request_id] = out
        return blocks

    plain_blocks = run("plain", greedy(4))
    steered_blocks = run("steered", steered)
    assert outputs["steered"].num_cached_tokens == 0 and not plain_blocks & steered_blocks
    other = SamplingParams(**{**vars(steered), "steering": {1: [v + 1 for v in steered.steering[1]]}})
    assert run("other-vector", other) and outputs["other-vector"].num_cached_tokens == 0
    run("steered-again", steered)  # the same steering hits its own blocks
    assert outputs["steered-again"].num_cached_tokens == 48
    assert outputs["steered-again"].outputs[0].token_ids == outputs["steered"].outputs[0].token_ids


def test_hidden_states_are_complete_when_the_prefix_is_cached(tiny_llm):
    r = research("llama3")
    llm = tiny_llm("llama3")
    prompt, params = hidden_request(r)
    llm.generate(prompt, greedy(2), use_tqdm=False)  # caches the prompt's two full blocks
    hits = llm.llm_engine.stats().prefix_cache_hits_total
    out = llm.generate(prompt, params, use_tqdm=False)[0]
    assert out.num_cached_tokens == 0 and llm.llm_engine.stats().prefix_cache_hits_total == hits  # recomputed
    assert rel_err(out.outputs[0].hidden_states, r["hidden_states"]) <= RTOL


def test_n2_samples_each_get_the_whole_sequence(tiny_llm):
    r = research("llama3")
    prompt, params = hidden_request(r)
    params.n = 2
    out = tiny_llm("llama3", **CHUNKED).generate(prompt, params, use_tqdm=False)[0]
    assert len(out.outputs) == 2
    for sample in out.outputs:
        assert rel_err(sample.hidden_states, r["hidden_states"]) <= RTOL


@pytest.mark.parametrize("swap_space", [0, 2 / 1024], ids=["recompute", "swap"])
def test_preempted_requests_keep_complete_hidden_states(tiny_llm, swap_space):
    llm = tiny_llm("llama3", max_model_len=128, kv_cache_memory_bytes=9 * BLOCK_BYTES, swap_space=swap_space)
    rng = np.random.default_rng(7)
    prompts = [{"prompt_token_ids": rng.integers(5, 512, int(n)).tolist()} for n in rng.integers(10, 41, 6)]
    params = greedy(40, return_hidden_states=[0, 2])
    before = llm.llm_engine.stats().num_preemptions_total
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert llm.llm_engine.stats().num_preemptions_total > before
    model = tiny_llm("llama3").model
    for prompt, out in zip(prompts, outs):
        ids = prompt["prompt_token_ids"] + out.outputs[0].token_ids[:-1]
        _, dense = model(jnp.asarray([ids]), return_hidden_states=True)
        assert out.outputs[0].hidden_states.shape == (2, len(ids), 64)
        assert rel_err(out.outputs[0].hidden_states, np.asarray(dense)[[0, 2], 0]) <= RTOL


@pytest.mark.parametrize("bad, field", [
    (dict(steering={1: [0.0] * 3}), "steering[1] must have 64 values"),
    (dict(steering={3: [0.0] * 64}), "steering layers must be in [1, 2]"),
    (dict(steering={0: [0.0] * 64}), "steering layers must be in [1, 2]"),
    (dict(steering={1: [float("nan")] * 64}), "steering[1] must contain only finite"),
    (dict(return_hidden_states=[0, 3]), "return_hidden_states layer indices must be in [0, 2]"),
])
def test_bad_research_params_are_refused_naming_the_field(tiny_llm, bad, field):
    with pytest.raises(ValueError) as err:
        tiny_llm("llama3").generate({"prompt_token_ids": [5, 6, 7]}, SamplingParams(**bad), use_tqdm=False)
    assert field in str(err.value)


def test_inputs_embeds_give_the_logits_of_the_ids(tiny_llm):
    model = tiny_llm("qwen2").model
    ids = jnp.asarray(research("qwen2")["hs_ids"][None])
    np.testing.assert_allclose(model(inputs_embeds=model.embed(ids)), model(ids), rtol=0, atol=0)
    with pytest.raises(ValueError, match="exactly one"):
        model(ids, inputs_embeds=model.embed(ids))


@pytest.mark.parametrize("family", FAMILIES)
def test_nll_gradients_through_llm_model_match_hf(tiny_llm, family):
    r = research(family)
    llm = tiny_llm(family)
    config = llm.llm_engine.model_config
    ids, start = jnp.asarray(r["nll_ids"][None]), int(r["nll_start"])
    params = state_dict(llm.model)
    layout = type(llm.llm_engine.runner._layout)

    def nll(p):
        logits = layout.split(llm.model)[0].merge(p)(ids)[0]
        logp = jax.nn.log_softmax(logits[start - 1:-1], axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, ids[0, start:, None], axis=-1))

    loss, grads = jax.value_and_grad(nll)(params)
    assert abs(float(loss) - float(r["nll"])) <= 1e-4 * abs(float(r["nll"]))
    global_norm = np.sqrt(sum(np.sum(np.asarray(g, np.float64) ** 2) for g in grads.values()))
    assert abs(global_norm - float(r["grad_global_norm"])) <= 1e-3 * float(r["grad_global_norm"])
    def close(got, ref):
        assert np.linalg.norm(np.asarray(got) - ref) <= 1e-3 * np.linalg.norm(ref) + 1e-7
    close(grads["final_norm.weight"], r["grad/model.norm.weight"])
    close(grads["layers.0.input_norm.weight"], r["grad/model.layers.0.input_layernorm.weight"])
    q_width = config.num_q_heads * config.head_dim  # q is the first columns of the fused qkv (one tp shard)
    close(grads["layers.0.attn.qkv_proj"][:, 0, :q_width].T, r["grad/model.layers.0.self_attn.q_proj.weight"])
    rows = r["grad/embed_row_ids"]
    close(grads["embed.weight"][rows], r["grad/embed_rows"])
    if "grad/lm_head_rows" in r:
        close(grads["lm_head.weight"][:, rows].T, r["grad/lm_head_rows"])


def test_n2_requests_preempted_by_recompute_keep_complete_hidden_states(tiny_llm):
    llm = tiny_llm("llama3", max_model_len=128, kv_cache_memory_bytes=9 * BLOCK_BYTES, swap_space=0)
    rng = np.random.default_rng(11)
    prompts = [{"prompt_token_ids": rng.integers(5, 512, int(n)).tolist()} for n in (30, 21, 37)]
    params = greedy(30, return_hidden_states=[1], n=2)
    before = llm.llm_engine.stats().num_preemptions_total
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert llm.llm_engine.stats().num_preemptions_total > before
    model = tiny_llm("llama3").model
    for prompt, out in zip(prompts, outs):
        for sample in out.outputs:
            ids = prompt["prompt_token_ids"] + sample.token_ids[:-1]
            _, dense = model(jnp.asarray([ids]), return_hidden_states=True)
            assert sample.hidden_states.shape == (1, len(ids), 64)
            assert rel_err(sample.hidden_states, np.asarray(dense)[[1], 0]) <= RTOL
