"""GGUF checkpoints (llama.cpp's format) as an HF-style config, tensor source and tokenizer.

The tensors are exposed under Hugging Face names and layouts ([out, in]) so the generic loader treats a GGUF file
like a safetensors directory. Quantized tensors (Q4_1, Q8_0, ...) are dequantized with the `gguf` package's numpy
code, lazily, one tensor (or one shard of rows) per `read`; nothing big is cached. `blocks` hands out the stored
bytes instead, for the linears served packed (jaxllm/quantization/gguf_format.py).
"""

import dataclasses
import math
import os
from typing import Any

import numpy as np
import tokenizers
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from jaxllm.loading.gguf_file import GGUFTensorInfo, read_gguf_file
from jaxllm.text.gguf_tokenizer import GGUFTokenizerInfo, build_gguf_tokenizer


@dataclasses.dataclass(frozen=True)
class _Architecture:
    hf_architecture: str
    model_type: str
    # llama.cpp's convert script permutes the rows of q/k for the "llama" graph only (its rope kernel pairs
    # adjacent elements, HF's rotate_half pairs the two halves of a head); qwen2/qwen3 use NeoX rope and keep HF order.
    permuted_qk: bool


_ARCHITECTURES = {
    "llama": _Architecture("LlamaForCausalLM", "llama", permuted_qk=True),
    "qwen2": _Architecture("Qwen2ForCausalLM", "qwen2", permuted_qk=False),
    "qwen3": _Architecture("Qwen3ForCausalLM", "qwen3", permuted_qk=False),
}

_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

_LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}

# Llama 3.x GGUFs carry their "llama3" rope scaling as a per-frequency factor tensor instead of metadata.
_ROPE_FREQS = "rope_freqs.weight"


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's `LlamaModel.permute` (convert_hf_to_gguf.py): HF rows of each head, the two rotary halves
    (n_head, 2, head_dim/2), interleaved into pairs (n_head, head_dim/2, 2)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of `permute_qk`: read the rows as (n_head, head_dim/2, 2) and swap back to (n_head, 2, head_dim/2)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@dataclasses.dataclass(frozen=True)
class _TensorEntry:
    tensor: GGUFTensorInfo  # raw data is a memmap view, 2-D as (rows, bytes per row) for quantized types
    shape: tuple[int, ...]  # HF layout, e.g. [out, in]
    # For un-permuted q/k: source row in the file for each HF row. Undoing the permutation as a row gather lets a
    # shard read fetch and dequantize only its own rows.
    row_order: np.ndarray | None


class GGUFTensors:
    """Tensor source protocol over a GGUF file: keys/shape/dtype/read with HF names and layouts."""

    def __init__(self, entries: dict[str, _TensorEntry]):
        self._entries = entries

    def keys(self):
        return self._entries.keys()

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name].shape

    def dtype(self, name: str) -> np.dtype:
        """float16 for F16 tensors; float32 for F32 and for everything dequantized (Q4_1, Q8_0, BF16, ...)."""
        is_f16 = self._entries[name].tensor.tensor_type == GGMLQuantizationType.F16
        return np.dtype(np.float16 if is_f16 else np.float32)

    def read(self, name: str, index: tuple[slice, ...] | None = None) -> np.ndarray:
        """The tensor, or `tensor[index]` when index is a tuple of slices (one device's shard), as a fresh array."""
        entry = self._entries[name]
        index = tuple(index or ())
        if len(index) > len(entry.shape):
            raise IndexError(f"{name}: index {index} has more dimensions than shape {entry.shape}")
        raw = _rows(entry, index[0] if index else slice(None))
        qtype = entry.tensor.tensor_type
        if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            out = np.array(raw)  # copy: never hand out views of the memmap
        else:
            out = dequantize(raw, qtype)
        return np.ascontiguousarray(out[(slice(None), *index[1:])])

    def tensor_type(self, name: str) -> GGMLQuantizationType:
        return self._entries[name].tensor.tensor_type

    def blocks(self, name: str) -> np.ndarray:
        """A block-quantized 2-D tensor as stored, uint8 [out, bytes per row], its rows in HF order (llama's q/k
        un-permuted by the same row gather as `read`), as a fresh array."""
        entry = self._entries[name]
        if entry.tensor.data.dtype != np.uint8 or entry.tensor.data.ndim != 2:  # gguf_file: blocks are uint8 rows
            raise ValueError(f"{name} is a {len(entry.shape)}-D {entry.tensor.tensor_type.name} tensor, not 2-D blocks")
        return np.array(_rows(entry, slice(None)))


def _rows(entry: _TensorEntry, rows: slice) -> np.ndarray:
    """The stored rows of HF rows `rows`: a view of the memmap, or a gathered copy for un-permuted q/k."""
    raw = entry.tensor.data
    return raw[entry.row_order[rows]] if entry.row_order is not None else raw[rows]


@dataclasses.dataclass(frozen=True)
class GGUFCheckpoint:
    path: str
    architecture: str  # general.architecture, e.g. "llama"
    name: str | None  # general.name
    hf_config: dict[str, Any]  # what config.json of the HF checkpoint would say
    tensors: GGUFTensors
    tokenizer: tokenizers.Tokenizer
    chat_template: str | None
    bos_token: str | None
    bos_token_id: int | None
    eos_token: str | None
    eos_token_id: int | None
    eos_token_ids: frozenset[int]  # eos plus llama.cpp's end-of-turn / end-of-message ids
    unk_token: str | None
    pad_token: str | None
    special_tokens: tuple[str, ...]
    add_bos_token: bool
    add_eos_token: bool


def read_gguf(path: str | os.PathLike) -> GGUFCheckpoint:
    path = os.fspath(path)
    metadata, tensor_infos = read_gguf_file(path)

    def get(key: str, default=None):
        return metadata.get(key, default)

    arch_name = get("general.architecture")
    arch = _ARCHITECTURES.get(arch_name)
    if arch is None:
        raise ValueError(
            f"GGUF architecture {arch_name!r} in {os.path.basename(path)} is not supported; "
            f"supported: {sorted(_ARCHITECTURES)}"
        )
    tok = build_gguf_tokenizer(get)
    raw_tensors = {t.name: t for t in tensor_infos}
    config = _hf_config(arch_name, arch, get, tok, raw_tensors)
    return GGUFCheckpoint(
        path=path,
        architecture=arch_name,
        name=get("general.name"),
        hf_config=config,
        tensors=GGUFTensors(_tensor_entries(arch, raw_tensors, config)),
        tokenizer=tok.tokenizer,
        chat_template=tok.chat_template,
        bos_token=tok.bos_token,
        bos_token_id=tok.bos_token_id,
        eos_token=tok.eos_token,
        eos_token_id=tok.eos_token_id,
        eos_token_ids=tok.eos_token_ids,
        unk_token=tok.unk_token,
        pad_token=tok.pad_token,
        special_tokens=tok.special_tokens,
        add_bos_token=tok.add_bos_token,
        add_eos_token=tok.add_eos_token,
    )


def _float32(value) -> float:
    # GGUF stores floats as f32; the shortest decimal that round-trips f32 gives back the HF value (1e-05, not
    # 9.999999747378752e-06).
    return float(str(np.float32(value)))


def _hf_config(arch_name: str, arch: _Architecture, get, tok: GGUFTokenizerInfo, raw_tensors: dict) -> dict:
    p = arch_name + "."

    def need(key: str) -> int:
        if get(p + key) is None:
            raise ValueError(f"GGUF metadata lacks {p + key}")
        return int(get(p + key))

    hidden = need("embedding_length")
    n_heads = need("attention.head_count")
    head_dim = int(get(p + "attention.key_length", hidden // n_heads))
    vocab = len(tok.tokenizer_tokens)
    embd_rows = int(raw_tensors["token_embd.weight"].shape[-1]) if "token_embd.weight" in raw_tensors else None
    if embd_rows != vocab:
        raise ValueError(f"GGUF token list has {vocab} tokens but token_embd.weight has {embd_rows} rows")
    config = {
        "architectures": [arch.hf_architecture],
        "model_type": arch.model_type,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": need("feed_forward_length"),
        "num_hidden_layers": need("block_count"),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(get(p + "attention.head_count_kv", n_heads)),
        "head_dim": head_dim,
        "rms_norm_eps": _float32(get(p + "attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": _float32(get(p + "rope.freq_base", 10000.0)),
        "max_position_embeddings": int(get(p + "context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in raw_tensors,
        "attention_bias": "blk.0.attn_q.bias" in raw_tensors,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "hidden_act": "silu",
        "torch_dtype": "float32",  # what `read` returns; the engine's dtype policy decides what to run in
    }
    rope_scaling = _rope_scaling(p, get, raw_tensors, config)
    if rope_scaling is not None:
        config["rope_scaling"] = rope_scaling
    return config


def _rope_scaling(p: str, get, raw_tensors: dict, config: dict) -> dict | None:
    kind = get(p + "rope.scaling.type")
    if kind == "linear":
        return {"rope_type": "linear", "factor": _float32(get(p + "rope.scaling.factor"))}
    if kind == "yarn":
        return {
            "rope_type": "yarn",
            "factor": _float32(get(p + "rope.scaling.factor")),
            "original_max_position_embeddings": int(get(p + "rope.scaling.original_context_length")),
        }
    if kind not in (None, "none"):
        raise ValueError(f"GGUF rope scaling type {kind!r} is not supported (supported: linear, yarn, llama3)")
    if _ROPE_FREQS in raw_tensors:
        return _llama3_rope_scaling(np.array(raw_tensors[_ROPE_FREQS].data, np.float32), config)
    return None


def _llama3_rope_scaling(freq_factors: np.ndarray, config: dict) -> dict:
    """Recover HF's "llama3" rope_scaling from the factors llama.cpp precomputed (convert_hf_to_gguf.py), checking
    that the usual Llama 3.1/3.2 constants reproduce them exactly rather than guessing."""
    factor = float(freq_factors.max())
    low, high, original = 1.0, 4.0, 8192
    dim = config["head_dim"]
    freqs = 1.0 / (config["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    wavelen = 2 * math.pi / freqs
    smooth = (original / wavelen - low) / (high - low)
    expected = np.where(
        wavelen < original / high, 1.0, np.where(wavelen > original / low, factor, 1 / ((1 - smooth) / factor + smooth))
    )
    if expected.shape != freq_factors.shape or not np.allclose(expected, freq_factors, rtol=1e-5):
        raise ValueError("GGUF rope_freqs do not match llama3 rope scaling (low/high freq factors 1/4, 8192 positions)")
    return {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": low,
        "high_freq_factor": high,
        "original_max_position_embeddings": original,
    }


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_TENSORS:
        return f"model.layers.{parts[1]}.{_LAYER_TENSORS[parts[2]]}"
    return None


def _tensor_entries(arch: _Architecture, raw_tensors: dict, config: dict) -> dict[str, _TensorEntry]:
    heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
    entries = {}
    for gguf_name, tensor in raw_tensors.items():
        if gguf_name == _ROPE_FREQS:
            continue  # folded into config["rope_scaling"]
        name = _hf_name(gguf_name)
        if name is None:
            raise ValueError(f"GGUF tensor {gguf_name!r} has no Hugging Face name for architecture {arch.model_type}")
        shape = tuple(int(d) for d in reversed(tensor.shape))  # ggml lists dimensions fastest-first
        row_order = None
        proj = name.rsplit(".", 2)[-2]
        if arch.permuted_qk and proj in heads:
            row_order = unpermute_qk(np.arange(shape[0]), heads[proj])
        entries[name] = _TensorEntry(tensor, shape, row_order)
    return entries
