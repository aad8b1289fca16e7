"""A QuantFormat test double: a fixture's dense weights quantized in the test to the canonical arrays of
jaxllm/quantization/linear_quant.py (int4 / int8 in groups or per channel, act-order, fp8), and the dense checkpoint
of the same dequantized weights, written from numpy as float32, for the reference.

The double stands in for a real format (AWQ, GPTQ, ...): it answers by HF module name, consumes the module's dense
`.weight` tensor (so the loader must skip it) and hands out the arrays made here.
"""

import pathlib
import shutil

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from jaxllm.loading import SafetensorsSource
from jaxllm.quantization.linear_quant import LinearQuant
from pallas_kernels.quant_pack import pack_int

FP8_MAX = 448.0  # e4m3's largest finite value
# Linears that read the same input, so an act-order checkpoint gives them one permutation.
SAME_INPUT = {"self_attn.q_proj": "qkv", "self_attn.k_proj": "qkv", "self_attn.v_proj": "qkv",
              "mlp.gate_proj": "gate_up", "mlp.up_proj": "gate_up"}


class CanonicalFormat:
    """QuantFormat over arrays made in the test."""

    def __init__(self, quants: dict[str, LinearQuant], arrays: dict[str, dict[str, np.ndarray]], *,
                 name: str = "canonical", can_dequantize: bool = False):
        self.quants, self.arrays, self.name, self.can_dequantize = quants, arrays, name, can_dequantize
        self.reads: list[str] = []

    def linear_quant(self, module: str, in_features: int, out_features: int) -> LinearQuant | None:
        return self.quants.get(module)

    def tensor_names(self, module: str) -> tuple[str, ...]:
        return (f"{module}.weight",)

    def read(self, source, module: str, quant: LinearQuant, in_features: int, out_features: int):
        assert quant == self.quants[module], (module, quant)
        assert self.arrays[module]["scales"].shape[-1] == out_features, module
        self.reads.append(module)
        return dict(self.arrays[module])


def quantize_int(w: np.ndarray, bits: int, group: int, perm: np.ndarray | None):
    """w f32 [K, N] -> (canonical arrays, the dense [K, N] they stand for): asymmetric, min/max per group of rows;
    with `perm`, row r of the arrays is input perm[r]."""
    k, n = w.shape
    rows = w if perm is None else w[perm]
    g = rows.reshape(k // group, group, n)
    lo, hi = g.min(axis=1), g.max(axis=1)
    scales = ((hi - lo) / (2**bits - 1)).astype(np.float32)
    zeros = np.round(-lo / scales).astype(np.float32)
    q = np.clip(np.round(g / scales[:, None] + zeros[:, None]), 0, 2**bits - 1)
    dense_rows = ((q.astype(np.float32) - zeros[:, None]) * scales[:, None]).reshape(k, n)
    arrays = {"qweight": pack_int(q.reshape(k, n).astype(np.uint32), bits), "scales": scales, "zeros": zeros}
    if perm is None:
        return arrays, dense_rows
    dense = np.empty_like(dense_rows)
    dense[perm] = dense_rows
    return arrays | {"perm": perm.astype(np.int32)}, dense


def quantize_fp8(w: np.ndarray):
    scales = (np.abs(w).max(axis=0, keepdims=True) / FP8_MAX).astype(np.float32)  # [1, N]
    weight = (w / scales).astype(ml_dtypes.float8_e4m3fn)
    return {"weight": weight, "scales": scales}, weight.astype(np.float32) * scales


def fixture_tensors(fixture: pathlib.Path) -> dict[str, np.ndarray]:
    source = SafetensorsSource.from_dir(str(fixture))
    return {name: source.read(name).astype(np.float32) for name in source.keys()}


def quantize_fixture(fixture: pathlib.Path, plan, *, seed: int = 0, **format_options):
    """plan(layer, module) -> None (dense) or ("int", bits, group, act_order) / ("fp8",) for each decoder linear
    ("self_attn.q_proj", ...). -> (the double, the fixture's tensors with each quantized weight dequantized)."""
    rng = np.random.default_rng(seed)
    tensors = fixture_tensors(fixture)
    quants, arrays, perms = {}, {}, {}
    for name in sorted(tensors):
        module = name.removesuffix(".weight")
        parts = module.split(".")
        if not name.endswith("_proj.weight") or parts[1] != "layers":
            continue
        layer, relative = int(parts[2]), ".".join(parts[3:])
        spec = plan(layer, relative)
        if spec is None:
            continue
        w = tensors[name].T  # HF [N, K] -> [K, N]
        k = w.shape[0]
        if spec[0] == "fp8":
            quants[module] = LinearQuant("fp8", 8, k)
            arrays[module], dense = quantize_fp8(w)
        else:
            _, bits, group, act_order = spec
            group = k if group == -1 else group
            perm = None
            if act_order:
                perm = perms.setdefault((layer, SAME_INPUT.get(relative, relative)), rng.permutation(k))
            quants[module] = LinearQuant("int", bits, group, act_order=act_order)
            arrays[module], dense = quantize_int(w, bits, group, perm)
        tensors[name] = np.ascontiguousarray(dense.T)
    return CanonicalFormat(quants, arrays, **format_options), tensors


def write_dense(directory: pathlib.Path, fixture: pathlib.Path, tensors: dict[str, np.ndarray]) -> pathlib.Path:
    """An HF directory: the fixture's config and tokenizer, `tensors` as float32 safetensors."""
    directory.mkdir(parents=True, exist_ok=True)
    for path in fixture.iterdir():
        if path.suffix != ".safetensors" and not path.name.endswith(".index.json") and path.suffix != ".npz":
            shutil.copy(path, directory / path.name)
    save_file(tensors, str(directory / "model.safetensors"))
    return directory
