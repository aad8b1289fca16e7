"""Device mesh and the PartitionSpecs of the weights, declared as data.

One mesh axis, "tp" (tensor parallel). Megatron layout: q/k/v/gate/up are column-parallel (output features split),
o/down row-parallel (input features split, so each device's partial sum needs one all-reduce), embed and lm_head
vocab-parallel, norms replicated. With a one-device mesh every spec degenerates to "whole array on that device".
"""

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

TP = "tp"

# Keyed by a param's leaf name (the last component of its dotted path).
PARAM_SPECS: dict[str, P] = {
    "embed": P(TP, None),  # [V, D]
    "lm_head": P(None, TP),  # [D, V]
    "q_proj": P(None, TP), "k_proj": P(None, TP), "v_proj": P(None, TP),  # [D, N*H], [D, K*H]
    "q_bias": P(TP), "k_bias": P(TP), "v_bias": P(TP),
    "o_proj": P(TP, None),  # [N*H, D]
    "o_bias": P(),
    "gate_proj": P(None, TP), "up_proj": P(None, TP),  # [D, F]
    "gate_bias": P(TP), "up_bias": P(TP),
    "down_proj": P(TP, None),  # [F, D]
    "down_bias": P(),
    "input_norm": P(), "post_norm": P(), "final_norm": P(), "q_norm": P(), "k_norm": P(),
}


def make_mesh(tensor_parallel_size: int = 1, devices=None) -> Mesh:
    """A 1-D mesh over the first `tensor_parallel_size` devices (default: local devices of the default backend)."""
    devices = list(jax.devices() if devices is None else devices)
    if not 1 <= tensor_parallel_size <= len(devices):
        raise ValueError(f"tensor_parallel_size must be in [1, {len(devices)}] (the devices available), "
                         f"got {tensor_parallel_size}")
    return Mesh(np.array(devices[:tensor_parallel_size]), (TP,))


def param_spec(path: str, shape: tuple[int, ...], mesh: Mesh) -> P:
    """The spec of one param; an axis that the mesh does not divide evenly stays replicated rather than fail.

    Divisibility is checked on the flattened feature axis only; keeping whole kv-heads on a device (what the
    sharded kernels will need) is the tensor-parallel issue's refinement.
    """
    spec = PARAM_SPECS[path.rsplit(".", 1)[-1]]
    assert len(spec) <= len(shape), (path, spec, shape)
    return P(*(axis if axis is None or shape[d] % mesh.shape[axis] == 0 else None for d, axis in enumerate(spec)))


def param_sharding(path: str, shape: tuple[int, ...], mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, param_spec(path, shape, mesh))


def kv_sharding(mesh: Mesh, num_kv_heads: int | None = None) -> NamedSharding:
    """KV pages [K, P, B, H] split over kv-heads, so each device holds the heads its q-heads attend with; replicated
    when `num_kv_heads` is given and the mesh does not divide it."""
    if num_kv_heads is not None and num_kv_heads % mesh.shape[TP]:
        return NamedSharding(mesh, P())
    return NamedSharding(mesh, P(TP, None, None, None))
