"""Text in and out: the tokenizer (HF or rebuilt from GGUF metadata), chat templates, prompt parsing, and the
output processor that turns sampled ids into RequestOutputs (incremental detokenization, stop strings, logprobs)."""
