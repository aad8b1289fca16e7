"""HeapFreeze: gc.freeze() what the engine keeps for its lifetime, so full collections do not walk it.

What start-up leaves (jax, the tokenizer, the model's tables) lives as long as the engine, and each full collection
would walk all of it; so would it JAX's caches of each program traced later (a batch shape's first step). vLLM
freezes too (docs/perf-notes.md#garbage-collection-pauses-and-gcfreeze). A process-wide side effect:
EngineConfig.freeze_gc turns it off.
"""

import gc


class HeapFreeze:
    def __init__(self, enabled: bool, num_layouts: int):
        """Freeze now; `num_layouts`: the batch layouts the runner has run so far (each traced a program)."""
        self.enabled = enabled
        self._frozen_layouts = num_layouts
        if enabled:
            gc.collect()
            gc.freeze()

    def refreeze(self, *, idle: bool, num_layouts: int) -> None:
        """Freeze again once idle after a new layout's first step. Only when no request is alive (`idle`): a frozen
        request's reference cycles (Sequence <-> SequenceGroup) would never be collected."""
        if not self.enabled or not idle or num_layouts == self._frozen_layouts:
            return
        self._frozen_layouts = num_layouts
        gc.collect()
        gc.freeze()

    def release(self) -> None:
        """What the engine held can be collected again (another engine's heap then is too: no harm)."""
        if self.enabled:
            gc.unfreeze()
