"""OpenAI logprobs objects from the engine's per-position `{token_id: Logprob}` dicts.

Completions use the legacy shape (tokens / token_logprobs / top_logprobs / text_offset); chat uses
`{"content": [{token, logprob, bytes, top_logprobs: [...]}]}`. -inf (a token masked out) is not valid JSON, so values
are clamped to -9999.0 as vLLM does.
"""

import math

_FLOOR = -9999.0


def _value(logprob: float) -> float:
    return _FLOOR if math.isnan(logprob) or logprob < _FLOOR else float(logprob)


def _token_text(token_id: int, entry, tokenizer) -> str:
    decoded = getattr(entry, "decoded_token", None) if entry is not None else None
    if decoded is None:
        decoded = tokenizer.decode([token_id], skip_special_tokens=False)
    return decoded


def _ranked(position: dict, limit: int) -> list[tuple[int, object]]:
    items = sorted(position.items(), key=lambda kv: (getattr(kv[1], "rank", None) or math.inf, -kv[1].logprob))
    return items[:limit]


def completion_logprobs(token_ids: list[int], positions: list[dict | None], top_n: int, tokenizer,
                        text_offset: int = 0) -> dict:
    """Legacy completions logprobs for `token_ids`; a None position (the first prompt token) has no logprob."""
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    for token_id, position in zip(token_ids, positions):
        entry = position.get(token_id) if position else None
        text = _token_text(token_id, entry, tokenizer)
        tokens.append(text)
        offsets.append(text_offset)
        text_offset += len(text)
        if position is None or entry is None:
            token_logprobs.append(None)
            top_logprobs.append(None)
            continue
        token_logprobs.append(_value(entry.logprob))
        top = {_token_text(tid, lp, tokenizer): _value(lp.logprob) for tid, lp in _ranked(position, top_n)}
        top.setdefault(text, _value(entry.logprob))
        top_logprobs.append(top)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": offsets}


def _chat_entry(text: str, logprob: float) -> dict:
    return {"token": text, "logprob": _value(logprob), "bytes": list(text.encode("utf-8"))}


def chat_logprobs(token_ids: list[int], positions: list[dict | None], top_n: int, tokenizer) -> dict:
    content = []
    for token_id, position in zip(token_ids, positions):
        entry = position.get(token_id) if position else None
        if entry is None:
            continue
        item = _chat_entry(_token_text(token_id, entry, tokenizer), entry.logprob)
        item["top_logprobs"] = [_chat_entry(_token_text(tid, lp, tokenizer), lp.logprob)
                                for tid, lp in _ranked(position, top_n)]
        content.append(item)
    return {"content": content}
