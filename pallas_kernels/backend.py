"""Which implementation of a kernel runs: chosen from the device, overridable by configuration, never by env vars."""

import jax

REFERENCE = "reference"  # pure jnp over the whole block-table width: the oracle of every test
XLA = "xla"  # plain XLA walking each token's real context in chunks: the CPU serving path
TRITON = "triton"  # Pallas lowered through Triton: runs on Ampere and Hopper
AUTO = "auto"
BACKENDS = (AUTO, REFERENCE, XLA, TRITON)


def resolve_backend(backend: str, device: jax.Device | None = None) -> str:
    """Map "auto" to the backend that suits `device` (default: the first device); check any other name.

    Mosaic GPU is not offered: the Triton lowering already reads KV near the copy bandwidth for decode, and the
    Mosaic GPU interpreter cannot run the indexing tests on CPU
    (docs/perf-notes.md#why-the-pallas-triton-lowering-not-mosaic-gpu).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    if backend != AUTO:
        return backend
    device = device or jax.devices()[0]
    return TRITON if device.platform == "gpu" else XLA
