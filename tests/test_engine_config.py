"""EngineConfig's old option names (ALIASES) are accepted by LLM(...) through from_kwargs, never silently doubled."""

import pytest

from jaxllm import EngineConfig
from jaxllm.config import ALIASES


def test_attention_backend_is_the_old_name_of_kernel_backend():
    assert ALIASES == {"attention_backend": "kernel_backend"}
    assert EngineConfig.from_kwargs(attention_backend="xla").kernel_backend == "xla"
    assert EngineConfig.from_kwargs(kernel_backend="reference").kernel_backend == "reference"


def test_old_and_new_name_together_are_refused():
    with pytest.raises(ValueError, match="attention_backend is the old name of kernel_backend"):
        EngineConfig.from_kwargs(attention_backend="xla", kernel_backend="xla")


def test_an_unknown_backend_names_the_field():
    with pytest.raises(ValueError, match="kernel_backend"):
        EngineConfig.from_kwargs(attention_backend="cuda")
