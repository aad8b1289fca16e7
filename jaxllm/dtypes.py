"""The dtype names jaxllm accepts, in one place: the engine option, the CLI, model configs and the loader read these.

`DTYPES` are the canonical names (numpy / jnp spell them so); `DTYPE_CHOICES` adds "auto" (the checkpoint's own
dtype) and vLLM's other spellings, which `canonical_dtype` maps back.
"""

DTYPES = ("float32", "bfloat16", "float16")
_ALIASES = {"half": "float16", "fp16": "float16", "float": "float32", "fp32": "float32", "bf16": "bfloat16"}
DTYPE_CHOICES = ("auto", *DTYPES, *_ALIASES)


def canonical_dtype(name: str) -> str:
    """vLLM's spellings -> a name of DTYPES; "auto" stays "auto"."""
    if name not in DTYPE_CHOICES:
        raise ValueError(f"dtype {name!r} is not supported; choose one of {DTYPE_CHOICES}")
    return _ALIASES.get(name, name)
