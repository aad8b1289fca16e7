"""A request's prompt, in any of the forms LLM.generate and the server accept, as (text, token ids)."""

from jaxllm.text.tokenizer import Tokenizer


def parse_prompt(prompt, tokenizer: Tokenizer | None) -> tuple[str | None, list[int]]:
    """Text, token ids, {"prompt": text} or {"prompt_token_ids": ids[, "prompt": text]} -> (text or None, ids).

    Raises ValueError for any other form, and for text when there is no tokenizer (skip_tokenizer_init)."""
    if isinstance(prompt, str) or (isinstance(prompt, dict) and "prompt_token_ids" not in prompt):
        if tokenizer is None:
            raise ValueError("this engine was started with skip_tokenizer_init: give prompt_token_ids")
    if isinstance(prompt, str):
        return prompt, tokenizer.encode(prompt)
    if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
        return prompt.get("prompt"), prompt["prompt_token_ids"]
    if isinstance(prompt, dict) and isinstance(prompt.get("prompt"), str):
        return prompt["prompt"], tokenizer.encode(prompt["prompt"])
    if isinstance(prompt, (list, tuple)):
        return None, prompt
    raise ValueError(f"prompt must be text, token ids or a dict with prompt_token_ids; got {type(prompt).__name__}")
