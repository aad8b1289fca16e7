"""Tiny GGUF files for tests, written with the gguf package's own writer: random HF-layout weights stored as llama.cpp
would (q/k rows permuted for the llama graph, each tensor in the storage type asked for)."""

import json
import pathlib

import gguf
import numpy as np
from gguf.quants import dequantize, quantize

FIXTURES = pathlib.Path(__file__).parent / "fixtures"

# 2 layers, hidden 64, 4 q / 2 kv heads of dim 16, FFN 96 unless asked otherwise.
H, Q, KV, D, F, L = 64, 4, 2, 16, 96, 2
GGUF_LAYER = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
              "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
              "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}  # fmt: skip
QTYPE = {"attn_q": "Q8_0", "attn_k": "F16", "ffn_up": "Q4_1", "token_embd": "Q8_0"}  # the rest F32


def llama_cpp_permute(weights: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute, verbatim in behaviour (k passes n_head_kv)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def fixture_tokenizer(family: str):
    spec = json.loads((FIXTURES / family / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    special = {t["content"] for t in spec["added_tokens"] if t["special"]}
    return tokens, merges, [3 if t in special else 1 for t in tokens]


def random_q6_k(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Q6_K blocks (the gguf package has no Q6_K quantizer): random quants and int8 sub-scales, a small positive f16
    super-scale in each block's last two bytes (block_q6_K in ggml-common.h)."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q6_K]
    blocks = rng.integers(0, 256, (shape[0], shape[1] // block_size, type_size), dtype=np.uint8)
    d = rng.uniform(1e-4, 1e-3, blocks.shape[:2]).astype(np.float16)
    blocks[..., -2:] = d[..., None].view(np.uint8)
    return blocks.reshape(shape[0], -1)


def _stored(value: np.ndarray, qtype: gguf.GGMLQuantizationType, rng: np.random.Generator) -> np.ndarray:
    if qtype == gguf.GGMLQuantizationType.Q6_K:
        return random_q6_k(value.shape, rng)
    return quantize(value, qtype)


def write_tiny_gguf(path, *, arch="llama", family="llama3", pre="gpt2", tied=False, rope_freqs=None, seed=0,
                    qtypes=None, ffn=F):
    """Random HF-layout weights stored as llama.cpp would; `qtypes` maps a tensor kind ("attn_q", "token_embd",
    ...) to its type name (QTYPE by default, F32 for the rest). Returns what reading each tensor back must give: the
    HF tensor after its storage type's quantization round trip."""
    qtypes = QTYPE if qtypes is None else qtypes
    rng = np.random.default_rng(seed)
    tokens, merges, types = fixture_tokenizer(family)
    shapes = {"attn_norm": (H,), "ffn_norm": (H,), "attn_q": (Q * D, H), "attn_k": (KV * D, H), "attn_v": (KV * D, H),
              "attn_output": (H, Q * D), "ffn_gate": (ffn, H), "ffn_up": (ffn, H), "ffn_down": (H, ffn)}  # fmt: skip
    tensors = {("token_embd", "model.embed_tokens.weight"): (len(tokens), H),
               ("output_norm", "model.norm.weight"): (H,)}
    if not tied:
        tensors[("output", "lm_head.weight")] = (len(tokens), H)
    for i in range(L):
        tensors |= {(f"blk.{i}.{g}", f"model.layers.{i}.{GGUF_LAYER[g]}.weight"): s for g, s in shapes.items()}

    w = gguf.GGUFWriter(str(path), arch=arch)
    w.add_block_count(L), w.add_context_length(256), w.add_embedding_length(H), w.add_feed_forward_length(ffn)
    w.add_head_count(Q), w.add_head_count_kv(KV), w.add_rope_freq_base(500000.0), w.add_layer_norm_rms_eps(1e-6)
    w.add_tokenizer_model("gpt2"), w.add_tokenizer_pre(pre), w.add_token_list(tokens), w.add_token_merges(merges)
    w.add_token_types(types), w.add_bos_token_id(1), w.add_eos_token_id(2), w.add_pad_token_id(0)
    w.add_add_bos_token(True)
    w.add_chat_template("{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    expected = {}
    for (gguf_name, hf_name), shape in tensors.items():
        value = rng.standard_normal(shape).astype(np.float32)
        kind = gguf_name.split(".")[-1]
        qtype = gguf.GGMLQuantizationType[qtypes.get(kind, "F32")]
        data = _stored(value, qtype, rng)  # blocks run along a row: permuting rows commutes with quantizing
        expected[hf_name] = dequantize(data, qtype).astype(np.float32)
        if arch == "llama" and kind in ("attn_q", "attn_k"):
            data = llama_cpp_permute(data, Q, KV if kind == "attn_k" else None)
        w.add_tensor(gguf_name + ".weight", data, raw_dtype=qtype if data.dtype == np.uint8 else None)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    return expected
