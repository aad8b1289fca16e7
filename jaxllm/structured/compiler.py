"""Grammar compiles off the caller's thread, with a time and a size limit, cached by grammar text.

A compile builds a template LLMatcher; each sample matches with its own deep copy of it. llguidance drops the GIL
while it compiles, so a slow compile blocks only the request that sent it.
"""

import concurrent.futures
import threading
from collections import OrderedDict

import llguidance

from jaxllm.sampling_params import StructuredOutputsParams
from jaxllm.structured.grammar import to_grammar

COMPILE_WORKERS = 2
COMPILE_TIMEOUT_S = 10.0
MAX_GRAMMAR_SIZE = 200_000  # grammar symbols; llguidance's default is 500k
CACHE_SIZE = 64


class GrammarCompiler:
    def __init__(self, tokenizer: llguidance.LLTokenizer, *, timeout_s: float = COMPILE_TIMEOUT_S,
                 max_grammar_size: int = MAX_GRAMMAR_SIZE):
        self.tokenizer = tokenizer
        self.timeout_s = timeout_s
        self.limits = llguidance.LLParserLimits(max_grammar_size=max_grammar_size, verbose_errors=False)
        self._pool = concurrent.futures.ThreadPoolExecutor(COMPILE_WORKERS, thread_name_prefix="grammar")
        self._cache: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self._lock = threading.Lock()  # process_request may run on several threads

    def compile(self, so: StructuredOutputsParams) -> llguidance.LLMatcher:
        """The template matcher for `so`; ValueError naming the field for an invalid grammar or a compile over the
        limits."""
        field, grammar = to_grammar(so)
        with self._lock:
            template = self._cache.get(grammar)
            if template is not None:
                self._cache.move_to_end(grammar)
                return template
        future = self._pool.submit(llguidance.LLMatcher, self.tokenizer, grammar, log_level=0, limits=self.limits)
        try:
            template = future.result(timeout=self.timeout_s)
        except concurrent.futures.TimeoutError:
            raise ValueError(f"structured_outputs.{field}: the grammar did not compile within {self.timeout_s} s.")\
                from None
        if template.is_error():
            raise ValueError(f"structured_outputs.{field} is invalid: {template.get_error()}")
        with self._lock:
            self._cache[grammar] = template
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return template

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
