"""Device mesh and the PartitionSpecs of the weights and the KV cache, declared as data.

One mesh axis, "tp" (tensor parallel). Megatron layout: q/k/v/gate/up are column-parallel (output features split),
o/down row-parallel (input features split, so each device's partial sum needs one all-reduce), embed and lm_head
vocab-parallel, norms replicated. With a one-device mesh every spec degenerates to "whole array on that device".

Heads, as vLLM splits them: the N q-heads must divide over tp. K kv-heads >= tp must divide over tp too; K < tp
kv-heads are replicated, tp // K devices per kv-head (tp % K == 0), so every device holds exactly the one kv-head
its N / tp q-heads attend with. The KV cache then has tp head slots, slot d holding kv-head d // (tp // K)
(`kv_cache_heads`); the loaded k/v projections stay whole on every device, and fusing them into qkv_proj
(models/fusion.py) gives each device the columns of exactly its slot's kv-head.
"""

import re

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

TP = "tp"

# Keyed by a param's state path, "{i}" standing for a layer index (models/llama.py's state tree); the checkpoint
# layout's q/k/v and gate/up parts exist only while loading (models/fusion.py).
PARAM_SPECS: dict[str, P] = {
    "embed.weight": P(TP, None),  # [V, D]
    "lm_head.weight": P(None, TP),  # [D, V]
    "final_norm.weight": P(),
    "layers.{i}.input_norm.weight": P(), "layers.{i}.post_norm.weight": P(),
    "layers.{i}.attn.q_proj": P(None, TP), "layers.{i}.attn.k_proj": P(None, TP),  # [D, N*H], [D, K*H]
    "layers.{i}.attn.v_proj": P(None, TP),
    "layers.{i}.attn.q_bias": P(TP), "layers.{i}.attn.k_bias": P(TP), "layers.{i}.attn.v_bias": P(TP),
    "layers.{i}.attn.o_proj": P(TP, None),  # [N*H, D]
    "layers.{i}.attn.o_bias": P(),
    "layers.{i}.attn.q_norm.weight": P(), "layers.{i}.attn.k_norm.weight": P(),
    "layers.{i}.mlp.gate_proj": P(None, TP), "layers.{i}.mlp.up_proj": P(None, TP),  # [D, F]
    "layers.{i}.mlp.gate_bias": P(TP), "layers.{i}.mlp.up_bias": P(TP),
    "layers.{i}.mlp.down_proj": P(TP, None),  # [F, D]
    "layers.{i}.mlp.down_bias": P(),
    # The fused layout the forward runs on (models/fusion.py): [D, S, W] / [S, W], S = tp shards of whole columns.
    "layers.{i}.attn.qkv_proj": P(None, TP, None), "layers.{i}.mlp.gate_up_proj": P(None, TP, None),
    "layers.{i}.attn.qkv_bias": P(TP, None), "layers.{i}.mlp.gate_up_bias": P(TP, None),
}
# A quantized linear (models/quant_linear.py) holds these arrays in place of its dense weight, at "<weight>.<array>":
# packed words and fp8 weights split as the weight does; scales and zeros too, and along K (row-parallel) in whole
# groups (a single group, per-channel, is replicated); the act-order permutation is replicated.
QUANT_ARRAYS = ("qweight", "scales", "zeros", "perm", "weight")
_LAYER_INDEX = re.compile(r"(?<=^layers\.)\d+(?=\.)")
# Params split over kv-heads: whole (replicated) when the kv-heads are fewer than the devices.
KV_HEAD_PARAMS = frozenset({"k_proj", "v_proj", "k_bias", "v_bias"})


def make_mesh(tensor_parallel_size: int = 1, devices=None) -> Mesh:
    """A 1-D mesh over the first `tensor_parallel_size` devices (default: every device of the default backend,
    all hosts' devices once jax.distributed is initialized)."""
    devices = list(jax.devices() if devices is None else devices)
    if tensor_parallel_size < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {tensor_parallel_size}")
    if tensor_parallel_size > len(devices):
        kind = devices[0].platform.upper() if devices else "device"
        raise ValueError(f"tensor_parallel_size ({tensor_parallel_size}) is larger than the number of available "
                         f"{kind} devices ({len(devices)})")
    return Mesh(np.array(devices[:tensor_parallel_size]), (TP,))


def check_tensor_parallel(num_q_heads: int, num_kv_heads: int, tensor_parallel_size: int) -> None:
    """vLLM's rules: q-heads divide over tp; kv-heads divide over tp, or tp over kv-heads when they are fewer."""
    tp = tensor_parallel_size
    if num_q_heads % tp:
        raise ValueError(f"the model's number of attention heads ({num_q_heads}) must be divisible by "
                         f"tensor_parallel_size ({tp})")
    if num_kv_heads >= tp and num_kv_heads % tp:
        raise ValueError(f"the model's number of kv heads ({num_kv_heads}) must be divisible by "
                         f"tensor_parallel_size ({tp})")
    if num_kv_heads < tp and tp % num_kv_heads:
        raise ValueError(f"tensor_parallel_size ({tp}) must be a multiple of the model's number of kv heads "
                         f"({num_kv_heads}) when it is larger, so each kv head is replicated evenly")


def kv_cache_heads(num_kv_heads: int, tensor_parallel_size: int) -> int:
    """Head slots of the KV cache: the kv-heads, or one slot per device when kv-heads are replicated."""
    return max(num_kv_heads, tensor_parallel_size)


def tp_size(mesh: Mesh | None) -> int:
    return 1 if mesh is None else mesh.shape[TP]


def param_spec(path: str, shape: tuple[int, ...], mesh: Mesh, config=None) -> P:
    """The spec of one param, by its dotted state path ("layers.3.attn.qkv_proj").

    With the model's `config` (a ModelConfig) the heads are checked against the mesh (ValueError naming both) and
    k/v projections are replicated when kv-heads are fewer than devices. Any other axis the mesh does not divide
    evenly (a vocabulary or MLP size) stays replicated rather than fail.
    """
    key = _LAYER_INDEX.sub("{i}", path)
    weight, _, array = key.rpartition(".")
    quantized = key not in PARAM_SPECS and array in QUANT_ARRAYS
    spec = PARAM_SPECS[weight if quantized else key]
    name = (weight if quantized else key).rsplit(".", 1)[-1]
    tp = mesh.shape[TP]
    if config is not None:
        check_tensor_parallel(config.num_q_heads, config.num_kv_heads, tp)
        if name in KV_HEAD_PARAMS and config.num_kv_heads < tp:
            return P()
    if quantized:
        spec = _quant_spec(path.rpartition(".")[0], array, spec, shape, tp)
    assert len(spec) <= len(shape), (path, spec, shape)
    return P(*(axis if axis is None or shape[d] % mesh.shape[axis] == 0 else None for d, axis in enumerate(spec)))


def _quant_spec(linear: str, array: str, weight_spec: P, shape: tuple[int, ...], tp: int) -> P:
    """The spec of a quantized linear's array from its dense weight's; ValueError naming the layer where a
    row-parallel split would cut a group or a packed word."""
    if array == "perm":
        return P()
    if not weight_spec or weight_spec[0] != TP:  # column-parallel: every array splits along N as the weight
        return weight_spec
    rows = shape[0]
    if array in ("scales", "zeros") and rows == 1:
        return P()
    if rows % tp:
        what = "groups of scales" if array in ("scales", "zeros") else f"rows of {array}"
        raise ValueError(f"{linear}: its {rows} {what} along the input features do not divide over "
                         f"tensor_parallel_size ({tp}); a row-parallel shard must hold whole groups")
    return weight_spec


def param_sharding(path: str, shape: tuple[int, ...], mesh: Mesh, config=None) -> NamedSharding:
    return NamedSharding(mesh, param_spec(path, shape, mesh, config))


def kv_sharding(mesh: Mesh) -> NamedSharding:
    """KV pages [C, P, B, H] split over their head slots (C = `kv_cache_heads`), so each device holds exactly the
    kv-heads its q-heads attend with."""
    return NamedSharding(mesh, P(TP, None, None, None))


def logits_sharding(mesh: Mesh) -> NamedSharding:
    """Logits [T, V] as the vocab-parallel lm_head produces them: each device its slice of the vocabulary."""
    return NamedSharding(mesh, P(None, TP))


def replicated(mesh: Mesh) -> NamedSharding:
    """Whole on every device: the step's inputs, the residual stream, the gathered logits and sampler outputs."""
    return NamedSharding(mesh, P())
