"""Shared fixtures: tiny LLMs on the golden HF fixtures, cached per configuration for the whole session.

Every distinct configuration compiles its own buckets, so tests share engines wherever the configuration allows;
a test using a shared engine must leave it idle (no unfinished requests) and compare counters as deltas.
"""

import pathlib

import numpy as np
import pytest

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
FAMILIES = ("llama3", "llama2", "mistral", "qwen2", "qwen3")

# Small enough that a bucket compiles in about a second and a step takes milliseconds on CPU.
TINY = dict(dtype="float32", enforce_eager=True, max_model_len=256, kv_cache_memory_bytes=1 << 22, max_num_seqs=8,
            max_num_batched_tokens=32)


def golden(family: str, name: str = "golden") -> dict:
    """A fixture's reference arrays: golden.npz, or research.npz with name="research"."""
    with np.load(FIXTURES / family / f"{name}.npz") as data:
        return {k: data[k] for k in data.files}


def rel_err(got, ref) -> float:
    return float(np.linalg.norm(np.asarray(got) - ref) / np.linalg.norm(ref))


@pytest.fixture(scope="session")
def tiny_llm():
    """make(family="llama3", **overrides) -> a shared LLM on tests/fixtures/<family> with TINY's settings."""
    from jaxllm import LLM

    cache = {}

    def make(family: str = "llama3", **overrides):
        key = (family, tuple(sorted(overrides.items())))
        if key not in cache:
            cache[key] = LLM(model=str(FIXTURES / family), **{**TINY, **overrides})
        llm = cache[key]
        assert not llm.llm_engine.has_unfinished_requests(), "a previous test left requests in this shared engine"
        return llm

    yield make
    for llm in cache.values():
        llm.close()
