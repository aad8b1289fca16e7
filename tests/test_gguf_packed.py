"""GGUF Q4_0 / Q4_1 / Q8_0 linears read as the canonical packed arrays (jaxllm/quantization/gguf_format.py): what
the quantized matmul's reference dequantizes them to against the gguf package's own dequantization of the same
blocks, by hand-built blocks, constant (d == 0) blocks, tiny files of both q/k orders, a file of mixed types and
the default model."""

import json

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize, quantize

from gguf_writer import FIXTURES, GGUF_LAYER, L, write_tiny_gguf
from jaxllm import LLM, SamplingParams
from jaxllm.default_model import default_model_path
from jaxllm.loading.gguf import read_gguf
from jaxllm.models.quant_linear import quantized_paths
from jaxllm.quantization.gguf_format import GROUP, decode_blocks, gguf_quant_format, packed_arrays
from jaxllm.quantization.linear_quant import LinearQuant
from pallas_kernels import quant_matmul_reference

Q4_0, Q4_1, Q8_0 = GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q8_0
BITS = {Q4_0: 4, Q4_1: 4, Q8_0: 8}
LINEARS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
F32_EPS = float(np.finfo(np.float32).eps)


def weights(arrays: dict[str, np.ndarray], bits: int, scale_dtype=np.float32) -> np.ndarray:
    """What the quantized matmul multiplies by: f32 [K, N], scales and zeros first cast as the loader casts them."""
    w = quant_matmul_reference.dequantize(arrays["qweight"], arrays["scales"].astype(scale_dtype),
                                          arrays["zeros"].astype(scale_dtype), bits)
    return np.asarray(w)


def block_fields(raw: np.ndarray, qtype) -> tuple[np.ndarray, np.ndarray]:
    """(d, m) f32 [N, B] straight from the bytes (m is 0 without one), for the tests' own preconditions."""
    blocks = raw.reshape(raw.shape[0], -1, GGML_QUANT_SIZES[qtype][1])
    d = blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
    m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32) if qtype == Q4_1 else np.zeros_like(d)
    return d, m


@pytest.mark.parametrize("qtype", [Q4_0, Q4_1, Q8_0], ids=lambda t: t.name)
def test_blocks_pack_to_what_gguf_dequantizes(qtype):
    n, k = 37, 160  # a ragged N; K is whole blocks by construction of the format
    rng = np.random.default_rng(BITS[qtype] + qtype.value)
    w = rng.standard_normal((n, k)).astype(np.float32) * 10.0 ** rng.uniform(-3, 1, (n, 1)).astype(np.float32)
    raw = quantize(w, qtype)
    arrays = packed_arrays(raw, qtype)
    quant = LinearQuant("int", BITS[qtype], GROUP)
    assert {a: v.shape for a, v in arrays.items()} == quant.shapes(k, n)
    assert (arrays["qweight"].dtype, arrays["scales"].dtype, arrays["zeros"].dtype) == (np.int32,) + (np.float32,) * 2
    ref = dequantize(raw, qtype).T  # [K, N]
    got = weights(arrays, BITS[qtype])
    half = weights(arrays, BITS[qtype], np.float16)  # a bf16 / f16 model keeps its scales and zeros in f16
    if qtype == Q4_1:  # zeros are -m / d: one f32 rounding more than d * q + m
        d, m = block_fields(raw, qtype)
        bound = 4 * F32_EPS * (np.abs(m) + 15 * d).T.repeat(GROUP, axis=0)
        assert np.all(np.abs(got - ref) <= bound)
        # In f16, a zero below 16 is rounded to 2**-8: at most 1/256 of a quantization step in w.
        assert np.abs(arrays["zeros"]).max() < 16
        assert np.all(np.abs(half - ref) <= (2.0**-8 + 8 * F32_EPS) * d.T.repeat(GROUP, axis=0) + bound)
        assert not np.array_equal(half, ref)
    else:  # d * (q - 8) and d * q are exact products of an f16 and a small integer, in f32 and with f16 scales
        np.testing.assert_array_equal(got, ref)
        np.testing.assert_array_equal(half, ref)


def f16(x: float) -> np.ndarray:
    return np.float16(x).reshape(1).view(np.uint8)


def test_block_layout_built_by_hand():
    """ggml-common.h: byte j holds element j in its low nibble and element j + 16 in its high one; f16 d first."""
    q = np.arange(32) % 16
    q[16:] = 15 - q[16:]
    nibbles = (q[:16] | (q[16:] << 4)).astype(np.uint8)
    q4_0 = np.concatenate([f16(0.25), nibbles])[None]
    q4_1 = np.concatenate([f16(0.5), f16(-1.5), nibbles])[None]
    q8 = (np.arange(32) * 7 % 255 - 127).astype(np.int8)
    q8_0 = np.concatenate([f16(-0.125), q8.view(np.uint8)])[None]
    for raw, qtype, expected in [(q4_0, Q4_0, 0.25 * (q - 8)), (q4_1, Q4_1, 0.5 * q - 1.5),
                                 (q8_0, Q8_0, -0.125 * q8.astype(np.float64))]:
        np.testing.assert_array_equal(dequantize(raw, qtype)[0], expected)  # the gguf package agrees with the spec
        np.testing.assert_array_equal(weights(packed_arrays(raw, qtype), BITS[qtype])[:, 0], expected)
    values, scales, zeros = decode_blocks(q8_0, Q8_0)
    assert values[0].tolist() == (q8.astype(int) + 128).tolist() and zeros.tolist() == [[128.0]]


def test_constant_q4_1_blocks_are_exact():
    rng = np.random.default_rng(7)
    w = rng.standard_normal((5, 4 * GROUP)).astype(np.float32)
    w[0, :GROUP] = 0.3712  # constant: llama.cpp's quantizer writes d = 0 and every q = 0
    w[1, GROUP : 2 * GROUP] = -2.0
    # A spread of one f32 ulp: d = spread / 15 is nonzero in f32 (so q is not 0) but underflows f16 to 0.
    w[2, 2 * GROUP : 3 * GROUP] = np.float32(0.5)
    w[2, 2 * GROUP : 3 * GROUP : 2] = np.nextafter(np.float32(0.5), np.float32(1))
    raw = quantize(w, Q4_1)
    d, _ = block_fields(raw, Q4_1)
    assert (d == 0).tolist() == [[True, False, False, False], [False, True, False, False],
                                 [False, False, True, False]] + [[False] * 4] * 2
    stored_q = raw.reshape(5, 4, 20)[..., 4:]  # the nibbles of each block
    assert not stored_q[0, 0].any() and not stored_q[1, 1].any() and stored_q[2, 2].any()
    values, _, _ = decode_blocks(raw, Q4_1)
    assert not values[2, 2 * GROUP : 3 * GROUP].any()  # the underflowed block's q are dropped: w = m anyway
    ref = dequantize(raw, Q4_1).T
    assert np.unique(ref[2 * GROUP : 3 * GROUP, 2]).size == 1
    arrays = packed_arrays(raw, Q4_1)
    for dtype in (np.float32, np.float16):
        got = weights(arrays, 4, dtype)
        for row, block in [(0, 0), (1, 1), (2, 2)]:
            rows = slice(block * GROUP, (block + 1) * GROUP)
            np.testing.assert_array_equal(got[rows, row], ref[rows, row])


def _layer_linears(config: dict):
    """(module, K, N) of every linear of a tiny file's layers, and its GGUF kind."""
    hidden, ffn = config["hidden_size"], config["intermediate_size"]
    q, kv = config["num_attention_heads"] * config["head_dim"], config["num_key_value_heads"] * config["head_dim"]
    sizes = {"attn_q": (hidden, q), "attn_k": (hidden, kv), "attn_v": (hidden, kv), "attn_output": (q, hidden),
             "ffn_gate": (hidden, ffn), "ffn_up": (hidden, ffn), "ffn_down": (ffn, hidden)}  # fmt: skip
    for i in range(config["num_hidden_layers"]):
        for kind, (k, n) in sizes.items():
            yield kind, f"model.layers.{i}.{GGUF_LAYER[kind]}", k, n


@pytest.mark.parametrize("qtype", [Q4_0, Q4_1, Q8_0], ids=lambda t: t.name)
@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # llama's q/k rows are permuted in the file, qwen2's are not
def test_tiny_file_linears_read_packed(tmp_path, arch, qtype):
    expected = write_tiny_gguf(tmp_path / "t.gguf", arch=arch, seed=qtype.value,
                               qtypes={kind: qtype.name for kind in LINEARS} | {"token_embd": "Q8_0"})
    ck = read_gguf(tmp_path / "t.gguf")
    fmt = gguf_quant_format(ck)
    assert (fmt.name, fmt.can_dequantize) == ("gguf", True)
    quant = LinearQuant("int", BITS[qtype], GROUP)
    seen = 0
    for _, module, k, n in _layer_linears(ck.hf_config):
        assert fmt.linear_quant(module, k, n) == quant
        assert fmt.tensor_names(module) == (module + ".weight",)
        arrays = fmt.read(ck.tensors, module, quant, k, n)
        assert {a: v.shape for a, v in arrays.items()} == quant.shapes(k, n)
        np.testing.assert_allclose(weights(arrays, BITS[qtype]), expected[module + ".weight"].T, rtol=0,
                                   atol=8 * F32_EPS * np.abs(expected[module + ".weight"]).max(), err_msg=module)
        seen += 1
    assert seen == 7 * L
    assert fmt.linear_quant("model.embed_tokens", 64, 512) is None  # Q8_0, but gathered, not multiplied
    assert fmt.linear_quant("lm_head", 64, 512) is None  # F32


def test_mixed_file_reports_the_other_types_as_dense(tmp_path):
    """A Q4_1 file with a Q6_K down projection and F16 / F32 attention projections, as llama.cpp's mixes store."""
    qtypes = {"attn_q": "Q4_1", "attn_k": "Q4_1", "attn_v": "F16", "ffn_gate": "Q4_1", "ffn_up": "Q4_1",
              "ffn_down": "Q6_K", "token_embd": "Q8_0"}  # attn_output F32
    expected = write_tiny_gguf(tmp_path / "m.gguf", qtypes=qtypes, ffn=256, seed=11)  # Q6_K blocks are 256 long
    ck = read_gguf(tmp_path / "m.gguf")
    fmt = gguf_quant_format(ck)
    for kind, module, k, n in _layer_linears(ck.hf_config):
        quant = fmt.linear_quant(module, k, n)
        if qtypes.get(kind) == "Q4_1":
            assert quant == LinearQuant("int", 4, GROUP), module
        else:
            assert quant is None, module
            # Read densely through the source, as before: the Q6_K blocks dequantized by the gguf package.
            np.testing.assert_array_equal(ck.tensors.read(module + ".weight"), expected[module + ".weight"])
    assert ck.tensors.tensor_type("model.layers.1.mlp.down_proj.weight") == GGMLQuantizationType.Q6_K


def test_a_file_with_no_packed_linear_has_no_format(tmp_path):
    write_tiny_gguf(tmp_path / "f.gguf", qtypes={"token_embd": "Q8_0", "attn_k": "F16", "ffn_down": "Q6_K"}, ffn=256)
    assert gguf_quant_format(read_gguf(tmp_path / "f.gguf")) is None


def test_misread_linears_are_value_errors(tmp_path):
    write_tiny_gguf(tmp_path / "t.gguf", qtypes={"attn_q": "Q8_0", "attn_v": "Q4_0"})
    ck = read_gguf(tmp_path / "t.gguf")
    fmt = gguf_quant_format(ck)
    q = "model.layers.0.self_attn.q_proj"
    with pytest.raises(ValueError, match=r"self_attn.q_proj.weight has shape \(64, 64\).*\(32, 64\)"):
        fmt.linear_quant(q, 64, 32)
    with pytest.raises(ValueError, match="stored as Q8_0"):
        fmt.read(ck.tensors, q, LinearQuant("int", 4, GROUP), 64, 64)
    with pytest.raises(ValueError, match="stored as F32"):
        fmt.read(ck.tensors, "model.layers.0.self_attn.o_proj", LinearQuant("int", 4, GROUP), 64, 64)
    with pytest.raises(ValueError, match="no tensor model.layers.5"):
        fmt.read(ck.tensors, "model.layers.5.self_attn.q_proj", LinearQuant("int", 8, GROUP), 64, 64)
    with pytest.raises(ValueError, match="Q6_K is not served packed"):
        decode_blocks(np.zeros((1, 210), np.uint8), GGMLQuantizationType.Q6_K)


@pytest.fixture(scope="module")
def smollm2():
    return read_gguf(default_model_path())


def test_default_model_linears_are_q4_1_read_packed(smollm2):
    """Every linear of SmolLM2-135M-Instruct.Q4_1.gguf is Q4_1 (its embedding Q8_0, its norms F32), and packed it is
    the dequantized path's weight within f32 rounding, q/k un-permuted."""
    types = {smollm2.tensors.tensor_type(name).name for name in smollm2.tensors.keys()}
    assert types == {"Q4_1", "Q8_0", "F32"}
    fmt = gguf_quant_format(smollm2)
    linears = list(_layer_linears(smollm2.hf_config))
    assert len(linears) == 30 * 7
    assert all(fmt.linear_quant(module, k, n) == LinearQuant("int", 4, GROUP) for _, module, k, n in linears)
    assert fmt.linear_quant("model.embed_tokens", 576, 49152) is None
    for _, module, k, n in linears[:7] + linears[-7:]:
        dense = smollm2.tensors.read(module + ".weight").T
        got = weights(fmt.read(smollm2.tensors, module, LinearQuant("int", 4, GROUP), k, n), 4)
        np.testing.assert_allclose(got, dense, rtol=0, atol=8 * F32_EPS * np.abs(dense).max(), err_msg=module)


def test_default_model_served_packed_generates_todays_greedy_text():
    ref = json.loads((FIXTURES / "smollm2_gguf.json").read_text())
    with LLM(model=default_model_path(), dtype="float32", enforce_eager=True, max_model_len=256,
             kv_cache_memory_bytes=1 << 24, max_num_seqs=4) as llm:
        assert llm.llm_engine.quantization == "gguf"
        # Every projection packed, fused as the model runs them (q/k/v and gate/up are one matmul each).
        packed = quantized_paths(llm.model)
        assert packed == {f"layers.{i}.{p}" for i in range(30)
                          for p in ("attn.qkv_proj", "attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")}
        params = SamplingParams(temperature=0, max_tokens=len(ref["greedy_new_ids"]), ignore_eos=True)
        out = llm.generate({"prompt_token_ids": ref["chat_prompt_ids"]}, params, use_tqdm=False)[0].outputs[0]
    # The dequantized path's greedy ids (tests/test_models_gguf.py checks it against transformers).
    assert out.token_ids == ref["greedy_new_ids"]
