"""ModelConfig: what a model needs to know about itself, read from a Hugging Face `config.json` dict.

Both config.json dialects are read: transformers 4 (`rope_theta`, `rope_scaling`, `torch_dtype`) and transformers 5
(`rope_parameters`, `dtype`). Per-family defaults that config.json leaves implicit (Qwen2's q/k/v bias, Qwen3's q/k
norm, Mistral's 4096-token window) live in `_FAMILIES`, next to the parsing that needs them.
"""

import dataclasses
import json
import logging
import os

from jaxllm.dtypes import DTYPES

logger = logging.getLogger(__name__)

LAYER_TYPES = ("full_attention", "sliding_attention")
ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class _Family:
    qkv_bias: bool | None  # None: read config.json's `attention_bias`
    qk_norm: bool
    sliding: bool  # HF's implementation reads `sliding_window` at all (Llama's ignores it)
    default_sliding_window: int | None  # HF's class default when config.json omits the key
    window_needs_opt_in: bool  # Qwen: the window applies only with use_sliding_window, from max_window_layers on


_FAMILIES = {
    "LlamaForCausalLM": _Family(qkv_bias=None, qk_norm=False, sliding=False, default_sliding_window=None,
                                  window_needs_opt_in=False),
    "MistralForCausalLM": _Family(qkv_bias=None, qk_norm=False, sliding=True, default_sliding_window=4096,
                                  window_needs_opt_in=False),
    "Qwen2ForCausalLM": _Family(qkv_bias=True, qk_norm=False, sliding=True, default_sliding_window=4096,
                                 window_needs_opt_in=True),
    "Qwen3ForCausalLM": _Family(qkv_bias=None, qk_norm=True, sliding=True, default_sliding_window=4096,
                                 window_needs_opt_in=True),
}
_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                "qwen3": "Qwen3ForCausalLM"}


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Rotary frequency scaling. "linear" divides every frequency by `factor`; "llama3" (Llama 3.1) divides only
    the low frequencies and interpolates the middle band (HF `_compute_llama3_parameters`)."""

    rope_type: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.rope_type not in ("linear", "llama3"):
            raise ValueError(f"rope_scaling type {self.rope_type!r} is not supported; supported: {ROPE_TYPES}")
        if self.factor <= 0:
            raise ValueError(f"rope_scaling factor must be > 0, got {self.factor}")
        if self.rope_type == "llama3" and self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(f"rope_scaling high_freq_factor ({self.high_freq_factor}) must exceed low_freq_factor "
                             f"({self.low_freq_factor})")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v projections
    o_proj_bias: bool = False  # Llama's attention_bias also covers o_proj; Qwen2's implicit bias does not
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before rotary
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()  # per layer "full_attention" | "sliding_attention"; () means all full
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    dtype: str | None = None  # the checkpoint's dtype as config.json states it; None when it does not

    def __post_init__(self):
        if self.architecture not in _FAMILIES:
            raise ValueError(f"architecture {self.architecture!r} is not supported; supported: {sorted(_FAMILIES)}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_q_heads", "num_kv_heads",
                     "head_dim", "max_position_embeddings"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if self.num_q_heads % self.num_kv_heads:
            raise ValueError(f"num_q_heads ({self.num_q_heads}) must be a multiple of num_kv_heads "
                             f"({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.rms_norm_eps <= 0 or self.rope_theta <= 0:
            raise ValueError(f"rms_norm_eps ({self.rms_norm_eps}) and rope_theta ({self.rope_theta}) must be > 0")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"sliding_window must be a positive int or None, got {self.sliding_window}")
        if self.layer_types:
            if len(self.layer_types) != self.num_layers:
                raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers")
            if bad := set(self.layer_types) - set(LAYER_TYPES):
                raise ValueError(f"unknown layer_types {sorted(bad)}; supported: {LAYER_TYPES}")
            if "sliding_attention" in self.layer_types and self.sliding_window is None:
                raise ValueError("layer_types has sliding_attention layers but sliding_window is None")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not supported; supported: {DTYPES}")

    @property
    def q_size(self) -> int:
        return self.num_q_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def layer_sliding_window(self, layer: int) -> int | None:
        """The window of one layer: None for full attention."""
        if self.layer_types:
            return self.sliding_window if self.layer_types[layer] == "sliding_attention" else None
        return self.sliding_window

    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike, *, trust_remote_code: bool = False) -> "ModelConfig":
        path = os.path.join(model_dir, "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no config.json in {model_dir}")
        with open(path) as f:
            return cls.from_hf(json.load(f), trust_remote_code=trust_remote_code)

    @classmethod
    def from_hf(cls, hf: dict, *, trust_remote_code: bool = False) -> "ModelConfig":
        """Builds the config from a config.json dict; raises ValueError naming the offending field."""
        if "auto_map" in hf:
            if not trust_remote_code:
                raise ValueError(
                    "config.json has `auto_map` (remote model code). jaxllm never imports code from a model "
                    "directory; pass trust_remote_code=True to load it with jaxllm's own implementation of its "
                    "`architectures` instead.")
            logger.warning("config.json has `auto_map`: its code is NOT imported; using jaxllm's own implementation "
                           "of %s", hf.get("architectures"))
        architecture = _architecture(hf)
        family = _FAMILIES[architecture]
        act = hf.get("hidden_act", hf.get("hidden_activation", "silu"))
        if act != "silu":
            raise ValueError(f"hidden_act {act!r} is not supported for {architecture}; only 'silu'")
        num_layers = hf["num_hidden_layers"]
        num_q_heads = hf["num_attention_heads"]
        rope_theta, rope_scaling = _rope(hf)
        sliding_window, layer_types = _sliding_window(hf, family, num_layers)
        eos = hf.get("eos_token_id")
        attention_bias = bool(hf.get("attention_bias", False))
        return cls(
            architecture=architecture,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=num_layers,
            num_q_heads=num_q_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_q_heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // num_q_heads,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=attention_bias if family.qkv_bias is None else family.qkv_bias,
            o_proj_bias=attention_bias if family.qkv_bias is None else False,
            mlp_bias=bool(hf.get("mlp_bias", False)),
            qk_norm=family.qk_norm,
            sliding_window=sliding_window,
            layer_types=layer_types,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,)),
            dtype=_dtype(hf.get("dtype", hf.get("torch_dtype"))),
        )


def _architecture(hf: dict) -> str:
    architectures = hf.get("architectures") or []
    if not architectures and hf.get("model_type") in _MODEL_TYPES:
        architectures = [_MODEL_TYPES[hf["model_type"]]]
    for arch in architectures:
        if arch in _FAMILIES:
            return arch
    raise ValueError(f"architectures {architectures} (model_type {hf.get('model_type')!r}) not supported; "
                     f"supported: {sorted(_FAMILIES)}")


def _rope(hf: dict) -> tuple[float, RopeScaling | None]:
    # transformers 5 folds rope_theta into rope_parameters; 4 keeps it top-level next to rope_scaling.
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    if params and all(isinstance(v, dict) for v in params.values()):
        raise ValueError("per-layer-type rope_parameters are not supported")
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"rope_scaling type {rope_type!r} is not supported; supported: {ROPE_TYPES}")
    if rope_type == "default":
        return theta, None
    kwargs = {k: params[k] for k in ("low_freq_factor", "high_freq_factor") if k in params}
    if rope_type == "llama3":
        kwargs["original_max_position_embeddings"] = params.get(
            "original_max_position_embeddings", hf.get("max_position_embeddings", 8192))
    return theta, RopeScaling(rope_type=rope_type, factor=float(params["factor"]), **kwargs)


def _sliding_window(hf: dict, family: _Family, num_layers: int) -> tuple[int | None, tuple[str, ...]]:
    window = hf.get("sliding_window", family.default_sliding_window) if family.sliding else None
    if family.window_needs_opt_in and not hf.get("use_sliding_window", False):
        window = None
    if window is None:
        return None, ()
    if hf.get("layer_types"):
        return window, tuple(hf["layer_types"])
    if family.window_needs_opt_in:
        first = hf.get("max_window_layers", num_layers)
        return window, tuple("sliding_attention" if i >= first else "full_attention" for i in range(num_layers))
    return window, ()


def _dtype(value) -> str | None:
    if value is None:
        return None
    name = str(value).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"config.json dtype {value!r} is not supported; supported: {DTYPES}")
    return name
