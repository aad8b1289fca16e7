"""ModelConfig from config.json dicts (both transformers 4 and 5 spellings) and the rotary frequencies."""

import json
import math
import pathlib

import numpy as np
import pytest

from jaxllm.model_config import ModelConfig, RopeScaling
from jaxllm.models.layers import rope_inv_freq

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
BASE = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5}


def hf(arch: str, **extra) -> dict:
    return {"architectures": [arch], **BASE, **extra}


def test_fixture_configs_parse_with_family_defaults():
    load = {name: ModelConfig.from_pretrained(FIXTURES / name) for name in ("llama3", "mistral", "qwen2", "qwen3")}
    assert load["llama3"].rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 64)
    assert load["llama3"].rope_theta == 500000.0 and load["llama3"].dtype == "bfloat16"
    assert load["mistral"].sliding_window == 8 and load["mistral"].layer_sliding_window(1) == 8
    q2 = load["qwen2"]
    assert (q2.attention_bias, q2.o_proj_bias, q2.tie_word_embeddings, q2.qk_norm) == (True, False, True, False)
    assert q2.head_dim == 64 and q2.sliding_window is None  # head_dim = hidden 128 / 2 heads
    assert load["qwen3"].qk_norm and not load["qwen3"].attention_bias and load["qwen3"].num_layers == 3


def test_transformers_4_and_5_rope_spellings_agree():
    scaling = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    v4 = hf("LlamaForCausalLM", rope_theta=500000.0, rope_scaling={"type": "llama3", **scaling},
            torch_dtype="bfloat16")
    v5 = hf("LlamaForCausalLM", rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, **scaling},
            dtype="bfloat16")
    assert ModelConfig.from_hf(v4) == ModelConfig.from_hf(v5)
    assert ModelConfig.from_hf(v5).rope_scaling.original_max_position_embeddings == 8192


def test_sliding_window_follows_hf_per_family():
    assert ModelConfig.from_hf(hf("MistralForCausalLM")).sliding_window == 4096  # HF's default when omitted
    assert ModelConfig.from_hf(hf("MistralForCausalLM", sliding_window=None)).sliding_window is None
    assert ModelConfig.from_hf(hf("LlamaForCausalLM", sliding_window=16)).sliding_window is None  # Llama ignores it
    assert ModelConfig.from_hf(hf("Qwen2ForCausalLM", sliding_window=16)).sliding_window is None  # needs opt-in
    qwen = ModelConfig.from_hf(hf("Qwen2ForCausalLM", sliding_window=16, use_sliding_window=True,
                                  max_window_layers=1))
    assert qwen.layer_types == ("full_attention", "sliding_attention")
    assert [qwen.layer_sliding_window(i) for i in range(2)] == [None, 16]


def test_misc_fields():
    c = ModelConfig.from_hf(hf("LlamaForCausalLM", eos_token_id=[7, 9], bos_token_id=3, attention_bias=True))
    assert c.eos_token_ids == (7, 9) and c.bos_token_id == 3
    assert c.head_dim == 16 and c.attention_bias and c.o_proj_bias  # Llama's flag covers o_proj too
    assert ModelConfig.from_hf({**BASE, "model_type": "qwen3"}).architecture == "Qwen3ForCausalLM"


@pytest.mark.parametrize("bad, match", [
    (hf("GPT2LMHeadModel"), "architectures"),
    (hf("LlamaForCausalLM", rope_scaling={"type": "yarn", "factor": 4.0}), "yarn"),
    (hf("LlamaForCausalLM", hidden_act="gelu"), "hidden_act"),
    (hf("LlamaForCausalLM", num_key_value_heads=3), "multiple of num_kv_heads"),
    (hf("LlamaForCausalLM", torch_dtype="int8"), "dtype"),
    (hf("LlamaForCausalLM", auto_map={"AutoModelForCausalLM": "modeling_x.X"}), "trust_remote_code"),
])
def test_bad_configs_are_refused_naming_the_field(bad, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_hf(bad)


def test_auto_map_with_trust_remote_code_uses_our_implementation():
    c = ModelConfig.from_hf(hf("LlamaForCausalLM", auto_map={"AutoModelForCausalLM": "x.Y"}), trust_remote_code=True)
    assert c.architecture == "LlamaForCausalLM"


def test_llama3_inv_freq_against_the_published_formula():
    """Llama 3.1's reference code (meta-llama/llama-models `apply_scaling`), one frequency at a time."""
    c = ModelConfig.from_hf(hf("LlamaForCausalLM", hidden_size=512, num_attention_heads=4, rope_theta=500000.0,
                               rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}))
    base = [1.0 / (500000.0 ** (i / 128)) for i in range(0, 128, 2)]
    expected = []
    for freq in base:
        wavelen = 2 * math.pi / freq
        if wavelen < 8192 / 4:
            expected.append(freq)
        elif wavelen > 8192 / 1:
            expected.append(freq / 8)
        else:
            smooth = (8192 / wavelen - 1) / (4 - 1)
            expected.append((1 - smooth) * freq / 8 + smooth * freq)
    got = rope_inv_freq(c)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    assert got[-1] < base[-1] / 7 and got[0] == pytest.approx(base[0])  # low frequencies scaled, high kept


def test_config_json_roundtrip_from_directory(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(hf("Qwen3ForCausalLM", head_dim=32)))
    assert ModelConfig.from_pretrained(tmp_path).head_dim == 32
    with pytest.raises(FileNotFoundError, match="config.json"):
        ModelConfig.from_pretrained(tmp_path / "nowhere")
