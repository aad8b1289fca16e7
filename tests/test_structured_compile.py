"""The tokenizer adapter (HF and GGUF-built tokenizers), grammar compiles with their limits, and matcher masks."""

import pathlib
import time

import llguidance
import numpy as np
import pytest

from jaxllm.default_model import default_model_path
from jaxllm.loading import load_tokenizer
from jaxllm.sampling_params import StructuredOutputsParams
from jaxllm.structured.compiler import GrammarCompiler
from jaxllm.structured.matchers import Matchers
from jaxllm.structured.tokenizer import ll_tokenizer
from jaxllm.text.tokenizer import Tokenizer

TINY = pathlib.Path(__file__).parent / "fixtures" / "llama3"
TEXTS = ['{"name": "Zoë", "n": [1, 22]}', "  spaces\tand\nnewlines", "日本語 🙂 ok"]


def _allowed(mask: np.ndarray, vocab_size: int) -> set[int]:
    bits = (mask.view(np.uint32)[:, None] >> np.arange(32, dtype=np.uint32)) & 1
    return set(np.flatnonzero(bits.reshape(-1)[:vocab_size]).tolist())


@pytest.fixture(scope="module", params=["hf", "gguf"])
def tokenizer(request):
    tok = Tokenizer.from_pretrained(TINY) if request.param == "hf" else load_tokenizer(default_model_path())
    vocab = tok.vocab_size + 7  # a logits width past the tokenizer's vocabulary, as padded embeddings give
    return tok, vocab, ll_tokenizer(tok, vocab, tok.eos_token_ids)


def test_adapter_tokenizes_and_decodes_like_the_tokenizer(tokenizer):
    tok, vocab, ll = tokenizer
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        assert ll.decode_str(ids) == tok.decode(ids)
        assert ll.tokenize_str(text) == ids


def test_choice_mask_follows_the_grammar_and_ends_with_eos(tokenizer):
    tok, vocab, ll = tokenizer
    compiler = GrammarCompiler(ll)
    matchers = Matchers(vocab, tok.eos_token_ids)
    matchers.add("r", compiler.compile(StructuredOutputsParams(choice=["alpha", "beta gamma"])))
    target = tok.encode("beta gamma", add_special_tokens=False)
    for i, t in enumerate(target):
        allowed = _allowed(matchers.bitmask("r", 0, target[:i]), vocab)
        assert t in allowed and not allowed & set(tok.eos_token_ids)
        assert max(allowed) < tok.vocab_size, "ids past the tokenizer's vocabulary are never allowed"
    assert _allowed(matchers.bitmask("r", 0, target), vocab) <= set(tok.eos_token_ids)
    # Another sample of the same request starts from the grammar's start, on its own matcher.
    assert target[0] in _allowed(matchers.bitmask("r", 1, []), vocab)
    matchers.forget("r")
    with pytest.raises(KeyError):
        matchers.bitmask("r", 0, [])
    compiler.close()


def test_compiles_are_cached_and_limits_fail_with_the_field(tokenizer):
    _, _, ll = tokenizer
    compiler = GrammarCompiler(ll)
    so = StructuredOutputsParams(json={"type": "object", "properties": {"a": {"type": "integer"}}})
    assert compiler.compile(so) is compiler.compile(StructuredOutputsParams(json=dict(so.json)))
    small = GrammarCompiler(ll, max_grammar_size=50)
    big = {"type": "object", "properties": {f"field_{i}": {"type": "string"} for i in range(200)}}
    with pytest.raises(ValueError, match=r"structured_outputs\.json is invalid"):
        small.compile(StructuredOutputsParams(json=big))
    # ~1 s to compile on any vocabulary: 2000 properties with a pattern each.
    slow = {"type": "object", "properties": {f"f{i}": {"type": "string", "pattern": "[a-z]{3,40}"}
                                             for i in range(2000)}}
    hasty = GrammarCompiler(ll, timeout_s=0.05)
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"structured_outputs\.json: the grammar did not compile within 0.05 s"):
        hasty.compile(StructuredOutputsParams(json=slow))
    assert time.perf_counter() - start < 0.5, "the caller waits no longer than the limit"
    for c in (compiler, small, hasty):
        c.close()


def test_llguidance_is_a_plain_dependency():
    assert isinstance(llguidance.LLMatcher.grammar_from_regex("a"), str)
