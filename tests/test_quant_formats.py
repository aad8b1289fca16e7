"""The quantized checkpoint readers (AWQ, GPTQ, compressed-tensors) and detect_format.

Each reader's canonical arrays are checked against a dequantization written here from the formats' published
descriptions, one bit field at a time, which shares no code with the readers or the fixture writer's packers; that
dequantization must also equal the writer's own float32 reference exactly.
"""

import json
import pathlib

import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open

from jaxllm.loading.safetensors import SafetensorsSource
from jaxllm.quantization.detect import detect_format
from jaxllm.quantization.linear_quant import LinearQuant
from pallas_kernels.quant_matmul_reference import dequantize
from quant_fixtures import LINEARS, QuantSpec, quantization_config, quantize_linear, write_quantized_pair

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
MODULE = "model.layers.0.mlp.down_proj"
AWQ_FIELD_OF_COLUMN = (0, 4, 1, 5, 2, 6, 3, 7)  # column j of a run of 8 sits in field [0, 4, 1, ...][j]

SPECS = [
    QuantSpec("awq"), QuantSpec("awq", symmetric=True, group_size=64), QuantSpec("awq", group_size=128),
    QuantSpec("awq", group_size=-1),
    QuantSpec("gptq"), QuantSpec("gptq", gptq_v2=True), QuantSpec("gptq", symmetric=True, group_size=128),
    QuantSpec("gptq", gptq_v2=True, symmetric=True, group_size=64), QuantSpec("gptq", act_order=True),
    QuantSpec("gptq", act_order=True, gptq_v2=True, group_size=64), QuantSpec("gptq", bits=8, group_size=32),
    QuantSpec("gptq", bits=8, group_size=-1, act_order=True),
    QuantSpec("compressed-tensors"), QuantSpec("compressed-tensors", symmetric=True, group_size=128),
    QuantSpec("compressed-tensors", act_order=True, group_size=64),
    QuantSpec("compressed-tensors", bits=8, group_size=-1, symmetric=True),
    QuantSpec("compressed-tensors", bits=8, group_size=32),
    QuantSpec("compressed-tensors", ct_format="naive-quantized", bits=8, group_size=-1, symmetric=True),
    QuantSpec("compressed-tensors", ct_format="naive-quantized", bits=8, group_size=64),
    QuantSpec("compressed-tensors", ct_format="float-quantized"),
    QuantSpec("compressed-tensors", ct_format="float-quantized", fp8_per_tensor=True, dynamic_activations=True),
]
SHAPES = [(40, 384), (24, 256)]  # [N, K]: neither a multiple of the other, every group size divides K


class DictSource:
    """A TensorSource over a dict, for malformed checkpoints."""

    def __init__(self, tensors: dict[str, np.ndarray]):
        self.tensors = tensors

    def keys(self):
        return self.tensors.keys()

    def shape(self, name):
        return self.tensors[name].shape

    def dtype(self, name):
        return self.tensors[name].dtype

    def read(self, name, index=None):
        return self.tensors[name] if index is None else self.tensors[name][index]


def field(words: np.ndarray, shift: np.ndarray, bits: int) -> np.ndarray:
    return ((words.astype(np.int64) & 0xFFFFFFFF) >> shift) & (2**bits - 1)


def spec_dequantize(t: dict[str, np.ndarray], spec: QuantSpec, n: int, k: int) -> np.ndarray:
    """The HF weight [N, K] from the stored tensors, element by element as the formats define them."""
    b = spec.bits
    e = 32 // b
    kk, nn = np.meshgrid(np.arange(k), np.arange(n))  # [N, K] index grids
    if spec.method == "compressed-tensors" and spec.ct_format == "float-quantized":
        return t["weight"].astype(np.float32) * t["weight_scale"].astype(np.float32).reshape(-1, 1)
    if spec.method == "awq":
        g = kk // (k if spec.group_size == -1 else spec.group_size)
        shift = b * np.take(AWQ_FIELD_OF_COLUMN, nn % 8)
        q = field(t["qweight"][kk, nn // 8], shift, b)
        z = field(t["qzeros"][g, nn // 8], shift, b) if "qzeros" in t else 8
        return ((q - z) * t["scales"].astype(np.float32)[g, nn]).astype(np.float32)
    if spec.method == "gptq":
        g = t["g_idx"][kk]
        q = field(t["qweight"][kk // e, nn], b * (kk % e), b)
        z = field(t["qzeros"][g, nn // e], b * (nn % e), b) + (0 if spec.gptq_v2 else 1)
        return ((q - z) * t["scales"].astype(np.float32)[g, nn]).astype(np.float32)
    groups = t["weight_scale"].shape[1]
    g = t["weight_g_idx"][kk] if "weight_g_idx" in t else kk // (k // groups)
    offset = 2 ** (b - 1)
    if spec.ct_format == "naive-quantized":
        q = t["weight"].astype(np.int64)
        zp = t["weight_zero_point"].astype(np.int64)[nn, g] if "weight_zero_point" in t else 0
    else:
        q = field(t["weight_packed"][nn, kk // e], b * (kk % e), b) - offset
        zp = field(t["weight_zero_point"][nn // e, g], b * (nn % e), b) - offset if "weight_zero_point" in t else 0
    return ((q - zp) * t["weight_scale"].astype(np.float32)[nn, g]).astype(np.float32)


def canonical_to_hf(arrays: dict[str, np.ndarray], quant: LinearQuant) -> np.ndarray:
    """A reader's arrays -> the HF weight [N, K] they stand for (row r of the kernel's matrix is input perm[r])."""
    if quant.kind == "fp8":
        return (arrays["weight"].astype(np.float32) * arrays["scales"]).T
    w = np.asarray(dequantize(arrays["qweight"], arrays["scales"], arrays["zeros"], quant.bits))
    if quant.act_order:
        unpermuted = np.empty_like(w)
        unpermuted[arrays["perm"]] = w
        w = unpermuted
    return w.T


def read_one(spec: QuantSpec, tensors: dict[str, np.ndarray], n: int, k: int):
    fmt = detect_format({"quantization_config": quantization_config(spec)}, None)
    quant = fmt.linear_quant(MODULE, k, n)
    source = DictSource({f"{MODULE}.{s}": v for s, v in tensors.items()})
    arrays = fmt.read(source, MODULE, quant, k, n)
    assert {a: v.shape for a, v in arrays.items()} == quant.shapes(k, n)
    assert set(source.keys()) <= set(fmt.tensor_names(MODULE))
    return quant, arrays


@pytest.mark.parametrize("spec", SPECS, ids=repr)
@pytest.mark.parametrize("n, k", SHAPES)
def test_reader_matches_the_published_dequantization(spec, n, k):
    rng = np.random.default_rng(n * k)
    w = rng.normal(0, 0.2, (n, k)).astype(np.float32)
    tensors, reference = quantize_linear(w, spec, rng)
    expected = spec_dequantize(tensors, spec, n, k)
    np.testing.assert_array_equal(expected, reference)
    assert np.abs(expected - w).max() < 0.2 * (0.25 if spec.bits == 8 else 1)  # a quantization of w, not noise
    quant, arrays = read_one(spec, tensors, n, k)
    np.testing.assert_array_equal(canonical_to_hf(arrays, quant), expected)
    if quant.kind == "int":
        zeros = arrays["zeros"]
        assert (np.unique(zeros).size == 1) == spec.symmetric
        assert quant.act_order == (spec.act_order and spec.group_size != -1)
        if quant.act_order:
            assert not np.array_equal(arrays["perm"], np.arange(k))
    else:
        assert quant.dynamic_activations == spec.dynamic_activations


def test_asymmetric_zero_points_vary_and_symmetric_ones_sit_mid_range():
    rng = np.random.default_rng(1)
    w = rng.normal(0, 0.2, (16, 128)).astype(np.float32)
    for method in ("awq", "gptq", "compressed-tensors"):
        _, arrays = read_one(QuantSpec(method), quantize_linear(w, QuantSpec(method), rng)[0], 16, 128)
        assert np.unique(arrays["zeros"]).size > 3, method
        _, arrays = read_one(QuantSpec(method, symmetric=True),
                             quantize_linear(w, QuantSpec(method, symmetric=True), rng)[0], 16, 128)
        assert np.all(arrays["zeros"] == 8), method


def test_written_checkpoint_pair_round_trips(tmp_path):
    """A whole model: every linear read back equals its float32 twin; every other tensor is the same in both; the
    files are valid safetensors for the package's own reader."""
    spec = QuantSpec("gptq", act_order=True)
    quant_dir, ref_dir = write_quantized_pair(FIXTURES / "qwen2", tmp_path, spec)
    config = json.loads((quant_dir / "config.json").read_text())
    assert config["quantization_config"]["desc_act"] is True
    assert "quantization_config" not in json.loads((ref_dir / "config.json").read_text())
    assert (quant_dir / "tokenizer.json").exists()
    fmt = detect_format(config, "gptq_marlin")
    src, ref = SafetensorsSource.from_dir(str(quant_dir)), SafetensorsSource.from_dir(str(ref_dir))
    with safe_open(str(quant_dir / "model.safetensors"), framework="flax") as f:
        assert set(f.keys()) == set(src.keys())
        np.testing.assert_array_equal(np.asarray(f.get_tensor(f"{MODULE}.qweight")), src.read(f"{MODULE}.qweight"))
    modules = [f"model.layers.{i}.{lin}" for i in range(config["num_hidden_layers"]) for lin in LINEARS]
    consumed = {t for m in modules for t in fmt.tensor_names(m)}
    perms = {}
    for m in modules:
        n, k = ref.shape(f"{m}.weight")
        quant = fmt.linear_quant(m, k, n)
        arrays = fmt.read(src, m, quant, k, n)
        np.testing.assert_array_equal(canonical_to_hf(arrays, quant), ref.read(f"{m}.weight"))
        perms[m] = arrays["perm"]
    for i in range(config["num_hidden_layers"]):  # one fused matmul per input needs one order of its columns
        p = f"model.layers.{i}."
        for a, b in (("self_attn.q_proj", "self_attn.k_proj"), ("self_attn.q_proj", "self_attn.v_proj"),
                     ("mlp.gate_proj", "mlp.up_proj")):
            np.testing.assert_array_equal(perms[p + a], perms[p + b])
        assert not np.array_equal(perms[p + "self_attn.q_proj"], perms[p + "self_attn.o_proj"])
    rest = set(src.keys()) - consumed
    assert rest == set(ref.keys()) - {f"{m}.weight" for m in modules}
    assert any(name.endswith("q_proj.bias") for name in rest)  # qwen2's biases stay plain tensors
    for name in rest:
        np.testing.assert_array_equal(src.read(name).astype(np.float32), ref.read(name))
    assert fmt.linear_quant("lm_head", 128, 512) is None


def test_detect_format_reads_the_checkpoint_and_checks_the_request():
    awq = {"quantization_config": quantization_config(QuantSpec("awq"))}
    gptq = {"quantization_config": quantization_config(QuantSpec("gptq"))}
    ct = {"quantization_config": quantization_config(QuantSpec("compressed-tensors"))}
    assert detect_format({}, None) is None
    assert detect_format(awq, None).name == "awq"
    assert detect_format(awq, "awq_marlin").name == "awq"
    assert detect_format(gptq, "gptq_marlin").name == "gptq"
    assert detect_format(ct, "compressed-tensors").name == "compressed-tensors"
    with pytest.raises(ValueError, match=r"'gptq'.*'awq'"):
        detect_format(awq, "gptq")
    with pytest.raises(ValueError, match=r"'awq_marlin'.*'gptq'"):
        detect_format(gptq, "awq_marlin")
    with pytest.raises(ValueError, match="'awq'.*no quantization_config"):
        detect_format({}, "awq")
    with pytest.raises(ValueError, match="gguf"):
        detect_format({}, "gguf")
    with pytest.raises(ValueError, match="quant_method = 'bitsandbytes'"):
        detect_format({"quantization_config": {"quant_method": "bitsandbytes"}}, None)


@pytest.mark.parametrize("config, field", [
    ({"quant_method": "awq", "bits": 4, "group_size": 32, "version": "gemv"}, "version"),
    ({"quant_method": "awq", "bits": 3, "group_size": 32, "version": "gemm"}, "bits"),
    ({"quant_method": "gptq", "bits": 3, "group_size": 128}, "bits"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "checkpoint_format": "marlin"}, "checkpoint_format"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "dynamic": {r".*down": {"bits": 3}}}, "dynamic"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "dynamic": {r".*down": {"damp": 0.1}}}, "dynamic"),
    (quantization_config(QuantSpec("compressed-tensors")) | {"format": "int-quantized"}, "format"),
    (quantization_config(QuantSpec("compressed-tensors")) | {"config_groups": {"group_0": {
        "targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "strategy": "block"}}}}, "strategy"),
    (quantization_config(QuantSpec("compressed-tensors")) | {"config_groups": {"group_0": {
        "targets": ["Linear"], "weights": {"num_bits": 3, "type": "int", "strategy": "channel"}}}}, "num_bits"),
    (quantization_config(QuantSpec("compressed-tensors", ct_format="float-quantized")) | {"config_groups": {
        "group_0": {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "float", "strategy": "channel"},
                    "input_activations": {"dynamic": False, "strategy": "tensor"}}}}, "input_activations"),
])
def test_unsupported_configs_name_the_field(config, field):
    with pytest.raises(ValueError, match=field):
        detect_format({"quantization_config": config}, None)


@pytest.mark.parametrize("method", ["awq", "gptq", "compressed-tensors"])
def test_group_size_that_does_not_divide_k_names_the_field(method):
    fmt = detect_format({"quantization_config": quantization_config(QuantSpec(method, group_size=128))}, None)
    with pytest.raises(ValueError, match=f"group_size = 128 does not divide {MODULE}'s 192"):
        fmt.linear_quant(MODULE, 192, 64)


@pytest.mark.parametrize("spec, missing", [
    (QuantSpec("awq"), "qzeros"), (QuantSpec("awq"), "scales"), (QuantSpec("gptq"), "qzeros"),
    (QuantSpec("gptq", act_order=True), "g_idx"), (QuantSpec("compressed-tensors"), "weight_zero_point"),
    (QuantSpec("compressed-tensors"), "weight_scale"),
    (QuantSpec("compressed-tensors", act_order=True), "weight_g_idx"),
    (QuantSpec("compressed-tensors", ct_format="float-quantized"), "weight_scale"),
])
def test_missing_tensor_is_named(spec, missing):
    tensors, _ = quantize_linear(np.random.default_rng(2).normal(0, 0.2, (16, 64)).astype(np.float32), spec,
                                 np.random.default_rng(3))
    del tensors[missing]
    with pytest.raises(ValueError, match=f"{MODULE}.{missing}' is missing"):
        read_one(spec, tensors, 16, 64)


@pytest.mark.parametrize("spec, name, bad", [
    (QuantSpec("awq"), "scales", np.ones((3, 16), np.float16)),
    (QuantSpec("gptq"), "qweight", np.ones((16, 16), np.int32)),  # [K / 4, N]: packed as if 8 bits
    (QuantSpec("gptq"), "qweight", np.ones((8, 16), np.float32)),  # right shape, not int32
    (QuantSpec("compressed-tensors"), "weight_packed", np.ones((16, 7), np.int32)),
    (QuantSpec("compressed-tensors"), "weight_shape", np.array([16, 32], np.int64)),
    (QuantSpec("compressed-tensors", ct_format="float-quantized"), "weight", np.ones((16, 64), np.float32)),
])
def test_misshapen_tensor_is_named(spec, name, bad):
    tensors, _ = quantize_linear(np.random.default_rng(4).normal(0, 0.2, (16, 64)).astype(np.float32), spec,
                                 np.random.default_rng(5))
    tensors[name] = bad
    with pytest.raises(ValueError, match=f"{MODULE}.{name}'"):
        read_one(spec, tensors, 16, 64)


def test_gptq_g_idx_must_fit_desc_act():
    rng = np.random.default_rng(6)
    w = rng.normal(0, 0.2, (16, 64)).astype(np.float32)
    tensors, _ = quantize_linear(w, QuantSpec("gptq", act_order=True), rng)
    with pytest.raises(ValueError, match="g_idx' is not k // group_size"):
        read_one(QuantSpec("gptq"), tensors, 16, 64)  # permuted groups but desc_act false
    tensors["g_idx"] = np.sort(tensors["g_idx"])[::-1].copy()
    tensors["g_idx"][0] = 0  # group 1 now has 31 rows, group 0 has 33
    with pytest.raises(ValueError, match="g_idx' does not give every group 32 rows"):
        read_one(QuantSpec("gptq", act_order=True), tensors, 16, 64)


def test_monotonic_g_idx_without_desc_act_needs_no_perm():
    rng = np.random.default_rng(7)
    tensors, reference = quantize_linear(rng.normal(0, 0.2, (16, 64)).astype(np.float32), QuantSpec("gptq"), rng)
    quant, arrays = read_one(QuantSpec("gptq"), tensors, 16, 64)
    assert not quant.act_order and "perm" not in arrays
    np.testing.assert_array_equal(canonical_to_hf(arrays, quant), reference)


def test_which_modules_are_quantized():
    ct = detect_format({"quantization_config": quantization_config(QuantSpec(
        "compressed-tensors", ignore=("re:.*lm_head", "model.layers.0.mlp.down_proj")))}, None)
    assert ct.linear_quant("lm_head", 64, 512) is None and ct.tensor_names("lm_head") == ()
    assert ct.linear_quant("model.layers.0.mlp.down_proj", 128, 64) is None
    assert ct.linear_quant("model.layers.1.mlp.down_proj", 128, 64) == LinearQuant("int", 4, 32)
    head = detect_format({"quantization_config": quantization_config(QuantSpec("compressed-tensors", ignore=()))}, None)
    assert head.linear_quant("lm_head", 64, 512) == LinearQuant("int", 4, 32)
    # A config group naming a module beats one targeting every Linear.
    config = quantization_config(QuantSpec("compressed-tensors"))
    config["config_groups"]["group_1"] = {"targets": ["re:.*down_proj"], "weights": {
        "num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"}}
    mixed = detect_format({"quantization_config": config}, None)
    assert mixed.linear_quant("model.layers.1.mlp.down_proj", 128, 64) == LinearQuant("int", 8, 128)
    assert mixed.linear_quant("model.layers.1.mlp.up_proj", 64, 128) == LinearQuant("int", 4, 32)
    awq_config = quantization_config(QuantSpec("awq")) | {"modules_to_not_convert": ["mlp.down_proj"]}
    awq = detect_format({"quantization_config": awq_config}, None)
    assert awq.linear_quant("model.layers.1.mlp.down_proj", 128, 64) is None
    assert awq.linear_quant("lm_head", 64, 512) is None
    gptq = detect_format({"quantization_config": quantization_config(QuantSpec("gptq"))}, None)
    assert gptq.linear_quant("lm_head", 64, 512) is None
    assert gptq.linear_quant(MODULE, 128, 64) == LinearQuant("int", 4, 32)
    # GPTQModel's per-module overrides: the first matching pattern wins; "-:" leaves a module dense.
    dynamic = {r"-:model\.layers\.0\.": {}, r"+:.*down_proj": {"bits": 8, "group_size": 64, "desc_act": True},
               r".*proj": {"group_size": -1}}
    gptq = detect_format({"quantization_config": quantization_config(QuantSpec("gptq")) | {"dynamic": dynamic}},
                         None)
    assert gptq.linear_quant(MODULE, 128, 64) is None
    assert gptq.linear_quant("model.layers.1.mlp.down_proj", 128, 64) == LinearQuant("int", 8, 64, act_order=True)
    assert gptq.linear_quant("model.layers.1.mlp.up_proj", 128, 256) == LinearQuant("int", 4, 128)  # per channel
    assert gptq.linear_quant("model.layers.1.self_attn.q_proj", 64, 256) == LinearQuant("int", 4, 64)


def test_fp8_scales_broadcast_per_tensor():
    spec = QuantSpec("compressed-tensors", ct_format="float-quantized", fp8_per_tensor=True)
    tensors, _ = quantize_linear(np.random.default_rng(8).normal(0, 0.2, (24, 64)).astype(np.float32), spec,
                                 np.random.default_rng(9))
    assert tensors["weight"].dtype == ml_dtypes.float8_e4m3fn and tensors["weight_scale"].shape == (1,)
    quant, arrays = read_one(spec, tensors, 24, 64)
    assert quant == LinearQuant("fp8", 8, 64) and arrays["weight"].shape == (64, 24)
    assert np.all(arrays["scales"] == tensors["weight_scale"][0])
