"""The format of a model's weight name map: rows of data that say which checkpoint tensor fills which param.

A rule `WeightRule(hf="model.layers.{i}.mlp.gate_up_proj.weight", params=("layers.{i}.mlp.gate_proj",
"layers.{i}.mlp.up_proj"), transpose=True)` reads: the checkpoint tensor named by the pattern (`{i}` is the layer
index) is the concatenation, along its axis 0, of the listed params (each transposed first when `transpose`). Split
checkpoints have one rule per projection, fused ones one rule per fused tensor; a model lists both and a checkpoint
matches whichever it has. Split sizes come from the params' shapes, so the table needs no numbers.

Param paths are dotted state paths of the checkpoint layout (models/llama_weights.py): "embed.weight",
"layers.3.attn.q_proj". A rule whose params the model does not have (biases of a model without bias, lm_head of a
tied model) makes its tensor "unexpected", unless `skip_if_absent` (HF writes a copy of the tied embedding as
`lm_head.weight` in some checkpoints).
"""

import dataclasses
import re
from typing import NamedTuple


@dataclasses.dataclass(frozen=True)
class WeightRule:
    hf: str  # checkpoint tensor name pattern; "{i}" matches a layer index
    params: tuple[str, ...]  # param paths, concatenated along the checkpoint tensor's axis 0
    transpose: bool = False  # HF Linear stores [out, in]; our params are [in, out]
    skip_if_absent: bool = False

    def __post_init__(self):
        if not self.params:
            raise ValueError(f"rule for {self.hf!r} names no params")

    @property
    def regex(self) -> re.Pattern:
        return name_regex(self.hf)

    def targets(self, match: re.Match) -> tuple[str, ...]:
        """The concrete param paths for one matched tensor name."""
        layer = match.groupdict().get("i")
        return tuple(p.replace("{i}", layer) if layer is not None else p for p in self.params)


def name_regex(pattern: str) -> re.Pattern:
    """A name pattern ("model.layers.{i}.mlp.up_proj.weight", or a param path) -> its full-match regex."""
    return re.compile(re.escape(pattern).replace(re.escape("{i}"), r"(?P<i>\d+)") + r"\Z")



class Linear(NamedTuple):
    """One linear of the checkpoint layout, as a quantized format addresses it."""

    module: str  # its Hugging Face module name, "model.layers.0.self_attn.q_proj"
    in_features: int  # K
    out_features: int  # N
