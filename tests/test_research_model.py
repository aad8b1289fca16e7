"""`llm.model`: the engine's nnx module, its live weights; `llm.model(ids)` (the dense causal forward) against the
Hugging Face golden logits, and gradients through it against finite differences."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import FAMILIES, golden, rel_err
from jaxllm.models.state import ModuleLayout, state_dict

FP32_RTOL = 1e-4


def right_padded(prompts: list[np.ndarray]) -> np.ndarray:
    ids = np.zeros((len(prompts), max(map(len, prompts))), np.int32)
    for row, prompt in enumerate(prompts):
        ids[row, :len(prompt)] = prompt
    return ids


@pytest.mark.parametrize("family", FAMILIES)
def test_dense_forward_of_a_right_padded_batch_matches_hf(tiny_llm, family):
    g = golden(family)
    short, long = g["prompt_0"], g["prompt_1"]
    assert len(short) < len(long)
    logits = np.asarray(tiny_llm(family).model(jnp.asarray(right_padded([short, long]))))
    assert logits.shape == (2, len(long), g["logits_0"].shape[-1]) and logits.dtype == np.float32
    assert rel_err(logits[0, :len(short)], g["logits_0"]) <= FP32_RTOL
    assert rel_err(logits[1], g["logits_1"]) <= FP32_RTOL


def test_llm_model_holds_the_arrays_the_engine_steps_with(tiny_llm):
    llm = tiny_llm("qwen3")
    runner = llm.llm_engine.runner
    assert isinstance(llm.model, nnx.Module) and llm.model is runner.model
    params = state_dict(llm.model)
    assert params.keys() == runner.params.keys()
    assert all(params[path] is runner.params[path] for path in params)


def test_grad_of_a_token_log_probability_matches_finite_differences(tiny_llm):
    llm = tiny_llm("llama3")
    g = golden("llama3")
    ids = jnp.asarray(g["prompt_1"][None, :12])
    target = int(g["prompt_1"][12])

    def log_prob(model) -> jax.Array:  # of the prompt's 13th token after its first 12
        return jax.nn.log_softmax(model(ids)[0, -1])[target]

    grads = nnx.grad(log_prob)(llm.model)  # an nnx.State shaped like the model's; eager, so XLA fuses differently
    layout, params = ModuleLayout.split(llm.model)
    as_dict = jax.jit(jax.grad(lambda p: log_prob(layout.merge(p))))(params)
    path = "layers.1.mlp.down_proj"
    np.testing.assert_allclose(grads["layers"][1]["mlp"]["down_proj"][...], as_dict[path], rtol=1e-3, atol=1e-6)
    entry = np.unravel_index(np.argmax(np.abs(as_dict[path])), as_dict[path].shape)
    eps = 1e-2
    f = jax.jit(lambda p: log_prob(layout.merge(p)))
    plus = f({**params, path: params[path].at[entry].add(eps)})
    minus = f({**params, path: params[path].at[entry].add(-eps)})
    numeric = (plus - minus) / (2 * eps)
    assert abs(float(as_dict[path][entry])) > 1e-3
    np.testing.assert_allclose(float(as_dict[path][entry]), float(numeric), rtol=2e-2)
