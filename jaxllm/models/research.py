"""ResearchInputs: what a step needs for per-request hidden states and steering (issue 20), on device.

Legend: T tokens of the step, R gathered token rows, U steering-table rows, D hidden size, K layers gathered.

A step in which no row asks gets no ResearchInputs at all (None), so its program is the one without the feature.
Layer indices follow Hugging Face's `output_hidden_states`: 0 = the embeddings, l = the residual stream after
decoder layer l, L = after the final norm (hidden states); steering adds after decoder layer l, 1 <= l <= L.
"""

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ResearchInputs:
    hidden_rows: jax.Array  # i32[R] token rows whose stream is gathered (padding rows repeat row 0)
    steer_index: jax.Array  # i32[T] each token's row of the steering tables (0: the zero row, unsteered)
    steer_tables: tuple[jax.Array, ...]  # f32[U, D] per steered layer, row 0 zeros
    hidden_layers: tuple[int, ...] = dataclasses.field(default=(), metadata=dict(static=True))  # K, sorted
    steer_layers: tuple[int, ...] = dataclasses.field(default=(), metadata=dict(static=True))  # sorted

    def steering(self, layer: int, dtype) -> jax.Array | None:
        """The [T, D] vectors to add after decoder layer `layer` (1-based), or None when no row steers it."""
        if layer not in self.steer_layers:
            return None
        table = self.steer_tables[self.steer_layers.index(layer)]
        return jnp.take(table, self.steer_index, axis=0).astype(dtype)

    def gather(self, streams: dict[int, jax.Array]) -> jax.Array | None:
        """streams {layer: [T, D]} -> f32[K, R, D] at the asked rows, or None when no row asks."""
        if not self.hidden_layers:
            return None
        return jnp.stack([streams[layer][self.hidden_rows] for layer in self.hidden_layers]).astype(jnp.float32)
