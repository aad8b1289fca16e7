"""Greedy generation of each quantized fixture (float32) equals the same model with the dequantized weights written
as a plain float32 checkpoint: the readers, the plumbing and the CPU quantized matmul end to end, per format and
per family (Llama, Qwen2 with tied embeddings and q/k/v biases, Qwen3 with q/k norms)."""

import numpy as np
import pytest

from conftest import FIXTURES, TINY
from jaxllm import LLM, SamplingParams
from quant_fixtures import QuantSpec, write_quantized_pair

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
PROMPTS = [[1, 72, 101, 108, 108, 111], [1, 300, 17, 450, 9, 260, 33, 88, 402], [1, 5]]

FORMATS = {
    "awq": QuantSpec("awq"),
    "awq-sym-g64": QuantSpec("awq", symmetric=True, group_size=64),
    "gptq-actorder": QuantSpec("gptq", act_order=True),
    "gptq-v2-sym-int8": QuantSpec("gptq", bits=8, group_size=-1, symmetric=True, gptq_v2=True),
    "ct-int4-group": QuantSpec("compressed-tensors"),
    "ct-int4-head": QuantSpec("compressed-tensors", group_size=64, ignore=()),  # lm_head quantized too
    "ct-int8-channel": QuantSpec("compressed-tensors", bits=8, group_size=-1, symmetric=True),
    "ct-int8-naive": QuantSpec("compressed-tensors", ct_format="naive-quantized", bits=8, group_size=-1),
    "ct-fp8-channel": QuantSpec("compressed-tensors", ct_format="float-quantized"),
    "ct-fp8-tensor": QuantSpec("compressed-tensors", ct_format="float-quantized", fp8_per_tensor=True),
}
# Every format on Llama; the tied and q/k-norm families with one format of each tool.
CASES = [("llama3", f) for f in FORMATS] + [
    (fam, f) for fam in ("qwen2", "qwen3") for f in ("awq", "gptq-actorder", "ct-int4-group")]

def prompt_logprobs(model_dir) -> np.ndarray:
    """The log-probability of each prompt token after the first."""
    prompt = PROMPTS[1] + PROMPTS[0][1:]
    with LLM(model=str(model_dir), **TINY) as llm:
        out = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(max_tokens=1, prompt_logprobs=0),
                           use_tqdm=False)[0]
    return np.array([entry[t].logprob for entry, t in zip(out.prompt_logprobs[1:], prompt[1:])])


def greedy(model_dir, **options) -> list[list[int]]:
    llm = LLM(model=str(model_dir), **TINY, **options)
    try:
        return [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY,
                                                             use_tqdm=False)]
    finally:
        llm.close()


@pytest.mark.parametrize("family, fmt", CASES)
def test_quantized_greedy_equals_dequantized_float32(tmp_path, family, fmt):
    quant_dir, ref_dir = write_quantized_pair(FIXTURES / family, tmp_path, FORMATS[fmt])
    tokens = greedy(quant_dir)
    assert all(len(t) == GREEDY.max_tokens for t in tokens)
    assert tokens == greedy(ref_dir)


def test_the_articles_quantization_argument(tmp_path):
    """`LLM(model=..., quantization="gptq")` as the vLLM article writes it; a method the checkpoint does not hold is
    refused naming both."""
    quant_dir, ref_dir = write_quantized_pair(FIXTURES / "llama3", tmp_path, FORMATS["gptq-actorder"])
    assert greedy(quant_dir, quantization="gptq_marlin") == greedy(ref_dir)
    with pytest.raises(ValueError, match=r"'awq'.*'gptq'"):
        LLM(model=str(quant_dir), quantization="awq", **TINY)


def test_fp8_dynamic_activations_are_quantized_per_token(tmp_path):
    """With `input_activations: {dynamic: true, strategy: token}` the inputs go through e4m3 too, so the model is
    near its float32 twin but not equal to it (the same weights without the activation scheme are: CASES)."""
    spec = QuantSpec("compressed-tensors", ct_format="float-quantized", fp8_per_tensor=True, dynamic_activations=True)
    quant_dir, ref_dir = write_quantized_pair(FIXTURES / "llama3", tmp_path, spec)
    got, ref = prompt_logprobs(quant_dir), prompt_logprobs(ref_dir)
    diff = np.abs(got - ref).mean()
    assert 1e-3 < diff < 0.05 * np.abs(ref).mean(), (diff, np.abs(ref).mean())
