"""Quantized linears in the models: a fixture's weights quantized in the test (int4 in groups of 32, int8 per
channel, act-order, fp8) and served through a QuantFormat test double (tests/quant_double.py) generate the greedy
tokens of the same model loaded dense from the dequantized weights; dummy quantized weights; fused parts stored
differently; the quantization option; state paths and gradients; a quantized untied head, and a tied one refused."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import FIXTURES, TINY, golden, rel_err
from jaxllm import LLM, EngineConfig, SamplingParams
from jaxllm.loading import load_model, model_loader
from jaxllm.loading.quantized import dummy_quants
from jaxllm.model_config import ModelConfig
from jaxllm.models import build_model, get_model_class
from jaxllm.models.quant_linear import QuantData, QuantLinear
from jaxllm.models.state import state_dict
from jaxllm.quantization.linear_quant import LinearQuant
from pallas_kernels.quant_pack import unpack_int
from quant_double import fixture_tensors, quantize_fixture, quantize_fp8, quantize_int, write_dense

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
MODEL_TYPES = {"llama3": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}

PLANS = {
    # act-ordered q/k/v (one permutation), int8 per-channel o_proj, int4 MLP in layer 0 and a dense one in layer 1
    "llama3": lambda layer, m: {"self_attn.o_proj": ("int", 8, -1, False)}.get(
        m, ("int", 4, 32, m.startswith("self_attn")) if m.startswith("self_attn") or layer == 0 else None),
    "qwen2": lambda layer, m: ("int", 4, 32, False),  # tied embeddings, q/k/v biases on quantized q/k/v
    "qwen3": lambda layer, m: ("int", 8, -1, False) if m.startswith("self_attn") else ("fp8",),
}


def use_format(monkeypatch, quant_format):
    """The loader's detection answers with the double, whatever config.json says; records what it was asked."""
    asked = []

    def detect(hf_config, requested):
        asked.append((hf_config.get("model_type"), requested))
        return quant_format

    monkeypatch.setattr(model_loader, "detect_format", detect)
    return asked


def prompts(family: str) -> list[dict]:
    g = golden(family)
    return [{"prompt_token_ids": g[f"prompt_{i}"].tolist()} for i in (0, 1)]


@pytest.mark.parametrize("family", sorted(PLANS))
def test_quantized_greedy_equals_the_dequantized_dense_model(family, tmp_path, monkeypatch):
    quant_format, dense = quantize_fixture(FIXTURES / family, PLANS[family])
    reference = LLM(model=str(write_dense(tmp_path / "dense", FIXTURES / family, dense)), **TINY)
    want = [o.outputs[0].token_ids for o in reference.generate(prompts(family), GREEDY, use_tqdm=False)]
    ids = jnp.asarray(golden(family)["prompt_0"])[None]
    want_logits = np.asarray(reference.model(ids))
    reference.close()

    asked = use_format(monkeypatch, quant_format)
    llm = LLM(model=str(FIXTURES / family), quantization=None, **TINY)
    try:
        got = [o.outputs[0].token_ids for o in llm.generate(prompts(family), GREEDY, use_tqdm=False)]
        assert got == want
        assert rel_err(llm.model(ids), want_logits) < 1e-5  # the dense forward runs the same quantized modules
        assert asked == [(MODEL_TYPES[family], None)]
        assert sorted(quant_format.reads) == sorted(quant_format.quants)  # each read once, by its HF name
        assert llm.model.quantization == llm.llm_engine.quantization == "canonical"
        quantized = {path for path in state_dict(llm.model) if path.rpartition(".")[0].endswith("_proj")}
        assert "layers.0.attn.qkv_proj.qweight" in quantized or "layers.0.attn.qkv_proj.scales" in quantized
    finally:
        llm.close()


def quantize_head(quant_format, dense: dict[str, np.ndarray], spec: tuple) -> LinearQuant:
    """The double serves the untied head quantized too (("int", bits, group) or ("fp8",)); `dense` gets its
    dequantized weight."""
    w = dense["lm_head.weight"].T  # [D, V]
    if spec[0] == "fp8":
        quant, (arrays, deq) = LinearQuant("fp8", 8, w.shape[0]), quantize_fp8(w)
    else:
        quant, (arrays, deq) = LinearQuant("int", spec[1], spec[2]), quantize_int(w, spec[1], spec[2], None)
    quant_format.quants["lm_head"], quant_format.arrays["lm_head"] = quant, arrays
    dense["lm_head.weight"] = np.ascontiguousarray(deq.T)
    return quant


@pytest.mark.parametrize("head", [("int", 4, 32), ("fp8",)], ids=["int4-g32", "fp8"])
def test_a_quantized_untied_head_generates_the_dequantized_dense_models_tokens(head, tmp_path, monkeypatch):
    quant_format, dense = quantize_fixture(FIXTURES / "llama3", PLANS["llama3"])
    quant = quantize_head(quant_format, dense, head)
    reference = LLM(model=str(write_dense(tmp_path / "dense", FIXTURES / "llama3", dense)), **TINY)
    want = [o.outputs[0].token_ids for o in reference.generate(prompts("llama3"), GREEDY, use_tqdm=False)]
    ids = jnp.asarray(golden("llama3")["prompt_0"])[None]
    want_logits = np.asarray(reference.model(ids))
    reference.close()

    use_format(monkeypatch, quant_format)
    llm = LLM(model=str(FIXTURES / "llama3"), **TINY)
    try:
        assert [o.outputs[0].token_ids for o in llm.generate(prompts("llama3"), GREEDY, use_tqdm=False)] == want
        assert rel_err(llm.model(ids), want_logits) < 1e-5  # the dense forward through the same quantized head
        head_module = llm.model.lm_head.weight
        assert isinstance(head_module, QuantLinear) and head_module.quant == quant
        assert head_module.parallel == "column"  # vocab-parallel under tp, as the dense head
        assert "lm_head" in quant_format.reads
        state = state_dict(llm.model)
        assert {p for p in state if p.startswith("lm_head")} == {f"lm_head.weight.{a}" for a in quant.arrays()}
    finally:
        llm.close()


def test_a_tied_head_a_format_reports_quantized_is_an_error_naming_it(monkeypatch):
    quant_format, _ = quantize_fixture(FIXTURES / "qwen2", PLANS["qwen2"])
    quant_format.quants["lm_head"] = LinearQuant("int", 4, 32)
    use_format(monkeypatch, quant_format)
    with pytest.raises(ValueError, match=r"^lm_head: canonical stores it quantized, but the model ties it to the "
                                         r"embedding"):
        load_model(FIXTURES / "qwen2", dtype="float32")


def test_state_paths_and_grad_over_the_scales(monkeypatch):
    quant_format, _ = quantize_fixture(FIXTURES / "llama3", PLANS["llama3"], seed=1)
    use_format(monkeypatch, quant_format)
    model, _ = load_model(FIXTURES / "llama3", dtype="float32")
    state = state_dict(model)
    attn = {p.removeprefix("layers.0.attn.") for p in state if p.startswith("layers.0.attn.")}
    assert attn == {"qkv_proj.qweight", "qkv_proj.scales", "qkv_proj.zeros", "qkv_proj.perm", "o_proj.qweight",
                    "o_proj.scales", "o_proj.zeros"}
    # fused layout: [K / E, S, W] words, [K / G, S, W] groups, one [K] permutation; o_proj per-channel int8
    assert state["layers.0.attn.qkv_proj.qweight"].shape == (64 // 8, 1, 256 + 2 * 128)
    assert state["layers.0.attn.qkv_proj.scales"].shape == (2, 1, 512)
    assert state["layers.0.attn.qkv_proj.perm"].shape == (64,)
    assert state["layers.0.attn.o_proj.qweight"].shape == (256 // 4, 64)
    assert state["layers.0.attn.o_proj.scales"].shape == (1, 64)
    assert state["layers.1.mlp.gate_up_proj"].shape == (64, 1, 256)  # layer 1's MLP is dense
    assert isinstance(model.layers[0].attn.qkv_proj.qweight, QuantData)
    assert not isinstance(model.layers[0].attn.qkv_proj.qweight, nnx.Param)

    ids = jnp.asarray(golden("llama3")["prompt_0"])[None]

    def loss(m):  # cross-entropy of the prompt's own next tokens: smooth in the scales
        logprobs = jax.nn.log_softmax(m(ids))[0, :-1]
        return -jnp.mean(jnp.take_along_axis(logprobs, ids[0, 1:, None], axis=-1))

    grads = nnx.to_flat_state(nnx.grad(loss)(model))
    paths = {".".join(map(str, p)) for p, _ in grads}
    assert "layers.0.attn.qkv_proj.scales" in paths and "layers.0.mlp.gate_up_proj.zeros" in paths
    assert not any(p.endswith((".qweight", ".perm")) for p in paths)
    g = dict((".".join(map(str, p)), v.get_value()) for p, v in grads)["layers.0.attn.o_proj.scales"]
    # against a central difference along the gradient
    direction = np.asarray(g) / np.linalg.norm(g)
    scales = model.layers[0].attn.o_proj.scales
    base, sides = scales.get_value(), []
    eps = 1e-2 * float(jnp.abs(base).mean())  # a small step relative to the scales
    for sign in (1, -1):
        scales.set_value(base + sign * eps * direction)
        sides.append(float(loss(model)))
    scales.set_value(base)
    assert abs((sides[0] - sides[1]) / (2 * eps) - np.linalg.norm(g)) < 2e-2 * np.linalg.norm(g)


def test_fused_parts_stored_differently_are_read_dense_or_refused(monkeypatch, tmp_path):
    def plan(layer, module):  # k_proj of layer 1 int8, its q/v int4: one fused matmul cannot run both
        return ("int", 8, -1, False) if (layer, module) == (1, "self_attn.k_proj") else ("int", 4, 32, False)

    refusing, _ = quantize_fixture(FIXTURES / "llama3", plan)
    use_format(monkeypatch, refusing)
    with pytest.raises(ValueError, match=r"layers\.1\.attn\.qkv_proj: its parts are stored differently"):
        load_model(FIXTURES / "llama3", dtype="float32")

    dequantizing, dense = quantize_fixture(FIXTURES / "llama3", plan, can_dequantize=True)
    use_format(monkeypatch, dequantizing)
    model, _ = load_model(FIXTURES / "llama3", dtype="float32")
    assert not isinstance(model.layers[1].attn.qkv_proj, QuantLinear)  # read dense from the HF ".weight" names
    assert isinstance(model.layers[1].attn.o_proj, QuantLinear) and isinstance(model.layers[0].attn.qkv_proj,
                                                                               QuantLinear)
    original = fixture_tensors(FIXTURES / "llama3")
    for part in ("q_proj", "k_proj", "v_proj"):  # the source's own weights, not dequantized ones
        name = f"model.layers.1.self_attn.{part}.weight"
        dense[name] = original[name]
    use_format(monkeypatch, None)
    want, _ = load_model(write_dense(tmp_path / "dense", FIXTURES / "llama3", dense), dtype="float32")
    ids = jnp.asarray(golden("llama3")["prompt_1"])[None]
    assert rel_err(model(ids), np.asarray(want(ids))) < 1e-5


def test_act_order_parts_must_share_one_permutation(monkeypatch):
    quant_format, _ = quantize_fixture(FIXTURES / "llama3", lambda layer, m: ("int", 4, 32, True))
    arrays = quant_format.arrays["model.layers.0.mlp.up_proj"]
    arrays["perm"] = arrays["perm"][::-1].copy()
    use_format(monkeypatch, quant_format)
    with pytest.raises(ValueError, match=r"layers\.0\.mlp\.gate_up_proj: its parts are act-ordered differently"):
        load_model(FIXTURES / "llama3", dtype="float32")


def dequantized(linear: QuantLinear) -> np.ndarray:
    """An independent numpy dequantization of a quantized module: [K, N]."""
    if linear.quant.kind == "fp8":
        return np.asarray(linear.weight.get_value().astype(np.float32)).reshape(linear.weight.shape[0], -1) * \
            np.asarray(linear.scales.get_value()).reshape(1, -1)
    q = np.asarray(unpack_int(linear.qweight.get_value().reshape(linear.qweight.shape[0], -1), linear.quant.bits))
    scales = np.asarray(linear.scales.get_value(), np.float32).reshape(linear.scales.shape[0], -1)
    zeros = np.asarray(linear.zeros.get_value(), np.float32).reshape(scales.shape)
    g = q.shape[0] // scales.shape[0]
    return (q - np.repeat(zeros, g, axis=0)) * np.repeat(scales, g, axis=0)


@pytest.mark.parametrize("quantization, method, bits", [("awq_marlin", "awq", 4), ("fp8", "fp8", 8)])
def test_dummy_quantized_weights_generate_the_dense_forwards_greedy_tokens(quantization, method, bits):
    llm = LLM(model=str(FIXTURES / "qwen3"), load_format="dummy", quantization=quantization, **TINY)
    try:
        model = llm.model
        assert model.quantization == llm.llm_engine.quantization == method
        qkv, down = model.layers[0].attn.qkv_proj, model.layers[2].mlp.down_proj
        assert isinstance(qkv, QuantLinear) and qkv.quant.bits == bits
        if method != "fp8":  # K = 64 for q/k/v: per-channel where 128 does not divide
            assert qkv.quant.group_size == 64
            assert qkv.qweight.shape == (64 // 8, 1, 512) and qkv.qweight.get_value().dtype == jnp.int32
        for linear in (qkv, down):
            w = dequantized(linear)
            assert 0.01 < w.std() < 0.04 and abs(w.mean()) < 0.005, (w.std(), w.mean())
        ids = golden("qwen3")["prompt_0"].tolist()
        out = llm.generate([{"prompt_token_ids": ids}], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
                           use_tqdm=False)[0].outputs[0].token_ids
        graphdef, state = nnx.split(model)
        forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))  # one program: right-padded to one length
        want = []
        for _ in range(4):
            padded = np.zeros((1, len(ids) + 4), np.int32)
            padded[0, :len(ids) + len(want)] = ids + want
            want.append(int(np.argmax(np.asarray(forward(state, padded))[0, len(ids) + len(want) - 1])))
        assert list(out) == want
    finally:
        llm.close()


def test_quantization_option_names_aliases_and_errors(monkeypatch):
    for value in (None, "awq", "gptq", "compressed-tensors", "fp8", "gguf", "awq_marlin", "gptq_marlin"):
        assert EngineConfig(quantization=value).quantization == value
    with pytest.raises(ValueError, match=r"quantization must be one of .*'awq_marlin'.* got 'bitsandbytes'"):
        EngineConfig(quantization="bitsandbytes")
    with pytest.raises(ValueError, match="got 'int4'"):
        load_model(FIXTURES / "llama3", quantization="int4")
    # the user's value reaches detection as given (it names it in its errors); a dense answer loads dense
    asked = use_format(monkeypatch, None)
    model, _ = load_model(FIXTURES / "llama3", dtype="float32", quantization="gptq_marlin")
    assert asked == [("llama", "gptq_marlin")] and model.quantization is None
    gguf = types.SimpleNamespace(hf_config={}, path="/m/model-Q4_1.gguf")  # a read GGUF checkpoint, in its place
    with pytest.raises(ValueError, match=r"quantization 'awq' was asked for, but /m/model-Q4_1.gguf is a GGUF file"):
        load_model(gguf, quantization="awq")


def test_dummy_quants_follow_each_methods_usual_layout():
    config = ModelConfig.from_pretrained(FIXTURES / "llama3")  # K: 64 (q/k/v, gate/up), 256 (o), 128 (down)
    cls = get_model_class(config.architecture)
    gguf, gptq, fp8 = (dummy_quants(cls, config, m) for m in ("gguf", "gptq_marlin", "fp8"))
    assert len(gguf) == len(gptq) == len(fp8) == 7 * config.num_layers
    assert {q.group_size for q in gguf.values()} == {32}
    assert gptq["layers.1.attn.o_proj"] == LinearQuant("int", 4, 128)
    assert gptq["layers.1.mlp.down_proj"] == LinearQuant("int", 4, 128)
    assert gptq["layers.0.attn.q_proj"] == LinearQuant("int", 4, 64)  # per-channel: 128 does not divide K
    assert set(fp8.values()) == {LinearQuant("fp8", 8, 64), LinearQuant("fp8", 8, 128), LinearQuant("fp8", 8, 256)}


def test_checkpoint_shapes_list_each_quantized_linears_arrays():
    config = ModelConfig.from_pretrained(FIXTURES / "llama3")
    quants = {"layers.0.attn.o_proj": LinearQuant("int", 4, 64, act_order=True),
              "layers.1.mlp.down_proj": LinearQuant("fp8", 8, 128)}
    shapes = build_model(config, dtype=jnp.bfloat16, quants=quants).checkpoint_shapes()
    o = {p.removeprefix("layers.0.attn.o_proj."): (s.shape, s.dtype) for p, s in shapes.items()
         if p.startswith("layers.0.attn.o_proj")}
    assert o == {"qweight": ((32, 64), jnp.int32), "scales": ((4, 64), jnp.float16), "zeros": ((4, 64), jnp.float16),
                 "perm": ((256,), jnp.int32)}
    assert shapes["layers.1.mlp.down_proj.weight"].dtype == jnp.float8_e4m3fn
    assert shapes["layers.1.mlp.down_proj.scales"].shape == (1, 64)
    assert shapes["layers.0.mlp.down_proj"].shape == (128, 64)  # the others stay dense
    assert "layers.0.attn.o_proj" not in shapes
