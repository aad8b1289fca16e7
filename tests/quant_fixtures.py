"""Quantized checkpoints from the tiny HF fixtures, written in numpy in each tool's on-disk layout, with the
dequantized weights beside them as a plain float32 checkpoint (the reference of the generate tests).

Layouts as the tools write them (HF [N, K] = [out, in] orientation, E = 32 // bits values per int32):
- AutoAWQ GEMM (`WQLinear_GEMM.from_linear`): qweight i32[K, N / E] and qzeros i32[K / G, N / E] packed along N,
  field i of a word holding column c*E + [0, 2, 4, 6, 1, 3, 5, 7][i]; scales f16[K / G, N].
- AutoGPTQ / GPTQModel: qweight i32[K / E, N] packed along K, qzeros i32[K / G, N / E] packed along N (v1 `gptq`
  stores zero - 1, `gptq_v2` the zero), scales f16[K / G, N], g_idx i32[K] (act-order: a permuted grouping).
- compressed-tensors (llm-compressor): pack-quantized weight_packed i32[N, K / E] packed along K of the signed
  values + 2**(bits - 1), weight_scale [N, K / G], weight_zero_point i32[N / E, K / G] (asymmetric; packed along N),
  weight_g_idx, weight_shape; naive-quantized weight int8[N, K]; float-quantized weight float8_e4m3fn[N, K].
Quantization is round-to-nearest with jittered min/max scales, so zero points and scales vary per group.
"""

import dataclasses
import json
import pathlib
import re
import shutil
import struct

import ml_dtypes
import numpy as np

from jaxllm.loading.safetensors import SafetensorsSource

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
_COPIED = ("generation_config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json")
FP8_MAX = 448.0
_SAFETENSORS_DTYPES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(ml_dtypes.bfloat16): "BF16",
                       np.dtype(ml_dtypes.float8_e4m3fn): "F8_E4M3", np.dtype(np.int64): "I64",
                       np.dtype(np.int32): "I32", np.dtype(np.int8): "I8"}


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    method: str  # "awq" | "gptq" | "compressed-tensors"
    bits: int = 4
    group_size: int = 32  # -1: per channel
    symmetric: bool = False  # awq: zero_point false; gptq: sym; ct: weights.symmetric
    act_order: bool = False  # gptq: desc_act; ct: actorder "group"
    gptq_v2: bool = False  # gptq: checkpoint_format gptq_v2 (real zeros)
    ct_format: str = "pack-quantized"  # or "naive-quantized", "float-quantized"
    fp8_per_tensor: bool = False  # float-quantized: one scale (else per channel)
    dynamic_activations: bool = False  # float-quantized: input_activations dynamic per token
    ignore: tuple[str, ...] = ("lm_head",)  # compressed-tensors' ignore list


def groups_of_rows(k: int, spec: QuantSpec, order: np.ndarray | None) -> np.ndarray:
    """g_idx [K]: k // G, or with act-order GPTQ's grouping of the rows taken in activation order `order` (the
    i-th row quantized is order[i], in group i // G)."""
    g = k if spec.group_size == -1 else spec.group_size
    if not spec.act_order or g == k:
        return np.arange(k) // g
    g_idx = np.empty(k, np.int64)
    g_idx[order] = np.arange(k) // g
    return g_idx


def quantize_int(w: np.ndarray, g_idx: np.ndarray, bits: int, symmetric: bool, scale_dtype, rng,
                 min_zero: int = 0):
    """RTN of w [N, K] by groups -> (unsigned q [N, K], integer zeros [N, groups], stored scales [N, groups],
    dequantized [N, K] float32)."""
    n, _ = w.shape
    groups = int(g_idx.max()) + 1
    qmax = 2**bits - 1
    scales = np.empty((n, groups), np.float32)
    zeros = np.empty((n, groups), np.int64)
    for g in range(groups):
        block = w[:, g_idx == g]
        jitter = rng.uniform(1.0, 1.3, n)
        if symmetric:
            scales[:, g] = np.abs(block).max(1) / (2 ** (bits - 1) - 1) * jitter
            zeros[:, g] = 2 ** (bits - 1)
        else:
            lo, hi = block.min(1), block.max(1)
            scales[:, g] = (hi - lo) / qmax * jitter
            zeros[:, g] = np.clip(np.round(-lo / scales[:, g]), min_zero, qmax)
    stored = scales.astype(scale_dtype)
    s = stored.astype(np.float32)[:, g_idx]  # [N, K]
    z = zeros[:, g_idx]
    q = np.clip(np.round(w / s) + z, 0, qmax).astype(np.int64)
    return q, zeros, stored, ((q - z) * s).astype(np.float32)


def pack_columns(values: np.ndarray, bits: int, order=None) -> np.ndarray:
    """[R, C] unsigned -> i32[R, C / E], each word's field i holding column c*E + order[i] (AutoAWQ's loop)."""
    e = 32 // bits
    order = range(e) if order is None else order
    words = np.zeros((values.shape[0], values.shape[1] // e), np.uint32)
    for col in range(words.shape[1]):
        for i, j in enumerate(order):
            words[:, col] |= values[:, col * e + j].astype(np.uint32) << np.uint32(i * bits)
    return words.view(np.int32)


def pack_rows(values: np.ndarray, bits: int) -> np.ndarray:
    """[R, C] unsigned -> i32[R / E, C] packed along R (AutoGPTQ's qweight loop)."""
    return np.ascontiguousarray(pack_columns(values.T, bits).T)


def quantize_linear(w: np.ndarray, spec: QuantSpec, rng: np.random.Generator, order: np.ndarray | None = None):
    """One HF linear weight [N, K] -> ({tensor suffix: stored array}, dequantized [N, K] float32). With act-order,
    `order` (default: random) is the activation order, which linears reading the same input share."""
    n, k = w.shape
    if spec.method == "compressed-tensors" and spec.ct_format == "float-quantized":
        return _quantize_fp8(w, spec, rng)
    g_idx = groups_of_rows(k, spec, rng.permutation(k) if order is None else order)
    if spec.method == "awq":
        q, zeros, scales, deq = quantize_int(w, g_idx, spec.bits, spec.symmetric, np.float16, rng)
        tensors = {"qweight": pack_columns(q.T, spec.bits, AWQ_ORDER), "scales": scales.T}
        if not spec.symmetric:
            tensors["qzeros"] = pack_columns(zeros.T, spec.bits, AWQ_ORDER)
        return tensors, deq
    if spec.method == "gptq":
        # AutoGPTQ's v1 packs zero - 1 into unsigned words, so a zero of 0 would borrow from its neighbours.
        v1 = not spec.gptq_v2
        q, zeros, scales, deq = quantize_int(w, g_idx, spec.bits, spec.symmetric, np.float16, rng,
                                             min_zero=int(v1 and not spec.symmetric))
        return {"qweight": pack_rows(q.T, spec.bits), "qzeros": pack_columns(zeros.T - int(v1), spec.bits),
                "scales": scales.T, "g_idx": g_idx.astype(np.int32)}, deq
    q, zeros, scales, deq = quantize_int(w, g_idx, spec.bits, spec.symmetric, ml_dtypes.bfloat16, rng)
    if spec.ct_format == "naive-quantized":
        offset = 2 ** (spec.bits - 1)
        tensors = {"weight": (q - offset).astype(np.int8), "weight_scale": scales}
        if not spec.symmetric:
            tensors["weight_zero_point"] = (zeros - offset).astype(np.int8)
        return tensors, deq
    tensors = {"weight_packed": pack_columns(q, spec.bits), "weight_scale": scales,
               "weight_shape": np.array([n, k], np.int64)}
    if not spec.symmetric:
        tensors["weight_zero_point"] = pack_rows(zeros, spec.bits)
    if spec.act_order:
        tensors["weight_g_idx"] = g_idx.astype(np.int32)
    return tensors, deq


def _quantize_fp8(w: np.ndarray, spec: QuantSpec, rng):
    n, _ = w.shape
    if spec.fp8_per_tensor:
        scale = np.array([np.abs(w).max() / FP8_MAX * rng.uniform(1.0, 1.3)], np.float32)
        s = scale[0]
    else:
        scale = (np.abs(w).max(1, keepdims=True) / FP8_MAX * rng.uniform(1.0, 1.3, (n, 1))).astype(ml_dtypes.bfloat16)
        s = scale.astype(np.float32)
    weight = (w / s).astype(ml_dtypes.float8_e4m3fn)
    return {"weight": weight, "weight_scale": scale}, (weight.astype(np.float32) * s).astype(np.float32)


def quantization_config(spec: QuantSpec) -> dict:
    """config.json's `quantization_config`, keyed as the tool writes it."""
    if spec.method == "awq":
        return {"quant_method": "awq", "bits": spec.bits, "group_size": spec.group_size,
                "zero_point": not spec.symmetric, "version": "gemm", "modules_to_not_convert": None}
    if spec.method == "gptq":
        return {"bits": spec.bits, "group_size": spec.group_size, "desc_act": spec.act_order, "sym": spec.symmetric,
                "damp_percent": 0.01, "true_sequential": True, "static_groups": False, "lm_head": False,
                "quant_method": "gptq", "checkpoint_format": "gptq_v2" if spec.gptq_v2 else "gptq",
                "pack_dtype": "int32"}
    if spec.ct_format == "float-quantized":
        weights = {"num_bits": 8, "type": "float", "symmetric": True,
                   "strategy": "tensor" if spec.fp8_per_tensor else "channel", "group_size": None}
        acts = ({"num_bits": 8, "type": "float", "symmetric": True, "strategy": "token", "dynamic": True,
                 "group_size": None, "observer": None} if spec.dynamic_activations else None)
    else:
        group = spec.group_size != -1
        weights = {"num_bits": spec.bits, "type": "int", "symmetric": spec.symmetric,
                   "strategy": "group" if group else "channel", "group_size": spec.group_size if group else None,
                   "actorder": "group" if spec.act_order else None}
        acts = None
    weights |= {"dynamic": False, "observer": "minmax", "observer_kwargs": {}, "block_structure": None}
    return {"quant_method": "compressed-tensors", "format": spec.ct_format, "quantization_status": "compressed",
            "ignore": list(spec.ignore), "kv_cache_scheme": None, "sparsity_config": {},
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": acts,
                                          "output_activations": None}}}


def _quantized(name: str, spec: QuantSpec) -> bool:
    module = name.removesuffix(".weight")
    if not name.endswith(".weight"):
        return False
    if module == "lm_head":
        return spec.method == "compressed-tensors" and "lm_head" not in spec.ignore
    return module.endswith(LINEARS)


def write_quantized_pair(src: pathlib.Path, dst: pathlib.Path, spec: QuantSpec,
                         seed: int = 0) -> tuple[pathlib.Path, pathlib.Path]:
    """Quantize every linear of the HF checkpoint `src` -> (dst / "quant", dst / "ref"): the quantized checkpoint
    and the same model with the dequantized weights in float32 (other tensors unchanged, float32 there)."""
    rng = np.random.default_rng(seed)
    source = SafetensorsSource.from_dir(str(src))
    quant, ref, orders = {}, {}, {}
    for name in sorted(source.keys()):
        value = source.read(name)
        if _quantized(name, spec):
            # GPTQ's act-order sorts by the input's Hessian, so linears of one input (q/k/v, gate/up) share it.
            shared = re.sub(r"(q|k|v)_proj|(gate|up)_proj", lambda m: "qkv" if m[1] else "gate_up", name)
            order = orders.setdefault(shared, rng.permutation(value.shape[1]))
            stored, deq = quantize_linear(value.astype(np.float32), spec, rng, order)
            module = name.removesuffix(".weight")
            quant |= {f"{module}.{suffix}": array for suffix, array in stored.items()}
            ref[name] = deq
        else:
            quant[name] = value
            ref[name] = value.astype(np.float32)
    config = json.loads((src / "config.json").read_text())
    dirs = dst / "quant", dst / "ref"
    for directory, tensors, cfg in ((dirs[0], quant, config | {"quantization_config": quantization_config(spec)}),
                                    (dirs[1], ref, config)):
        directory.mkdir(parents=True)
        (directory / "config.json").write_text(json.dumps(cfg, indent=2))
        for f in _COPIED:
            if (src / f).exists():
                shutil.copy(src / f, directory / f)
        write_safetensors(directory / "model.safetensors", tensors)
    return dirs


def write_safetensors(path: pathlib.Path, tensors: dict[str, np.ndarray]) -> None:
    """The safetensors layout (8-byte header length, JSON header, raw data) written directly: the package's numpy
    API has no bfloat16 or float8, and its flax API narrows int64 to int32."""
    header, blobs, offset = {}, [], 0
    for name, value in tensors.items():
        blob = np.ascontiguousarray(value).tobytes()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[value.dtype], "shape": list(value.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))
