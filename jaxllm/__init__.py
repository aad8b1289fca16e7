"""jaxllm: vLLM's job done in JAX/XLA — a paged KV cache, continuous batching and Pallas GPU kernels.

    from jaxllm import LLM, SamplingParams
    outputs = LLM().generate(["Hello"], SamplingParams(max_tokens=32))
"""

from jaxllm.async_engine import AsyncLLMEngine, EngineDeadError, EngineStepError
from jaxllm.config import EngineConfig
from jaxllm.engine import LLMEngine
from jaxllm.engine_stats import EngineStats
from jaxllm.llm import LLM
from jaxllm.outputs import CompletionOutput, Logprob, RequestOutput
from jaxllm.runtime.follower import run_worker
from jaxllm.sampling_params import SamplingParams, StructuredOutputsParams
from jaxllm.validation import ContextLengthExceededError, RequestTooLargeError

__version__ = "0.1.0"

__all__ = [
    "LLM", "SamplingParams", "StructuredOutputsParams", "LLMEngine", "AsyncLLMEngine", "EngineConfig", "EngineStats",
    "RequestOutput", "CompletionOutput", "Logprob", "EngineStepError", "EngineDeadError", "ContextLengthExceededError",
    "RequestTooLargeError", "run_worker", "__version__",
]
