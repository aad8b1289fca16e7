"""A `tokenizers.Tokenizer` rebuilt from a GGUF file's `tokenizer.ggml.*` metadata.

It matches what Hugging Face transformers' GGUF converter builds (integrations/gguf/gguf_tokenizer_mapping.py), so
a GGUF model tokenizes here exactly as in transformers and vLLM, without importing torch.
"""

import dataclasses
import functools
import logging
from collections.abc import Callable
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

from jaxllm.text.tokenizer import template_post_processor

logger = logging.getLogger(__name__)

_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp's llama_token_type values

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# `tokenizer.ggml.pre` values whose split regex differs from GPT-2's. Every other value keeps the GPT-2 byte-level
# regex, as transformers does. Note "smollm": llama.cpp (and SmolLM2's own tokenizer.json) also split digits one by
# one first; transformers does not. The vocabulary has no multi-digit tokens, so the two differ only where two or
# more whitespace characters precede a digit ("x =  1": transformers "Ġ","Ġ","1", llama.cpp "ĠĠ","1").
_PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(["llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral", "dbrx", "smaug-bpe"], _LLAMA3_SPLIT),
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "megrez"], _QWEN2_SPLIT),
}
_GPT2_REGEX_PRE = {"default", "gpt2", "gpt-2", "smollm", "starcoder", "refact", "olmo", "mpt", "jais"}


@dataclasses.dataclass(frozen=True)
class GGUFTokenizerInfo:
    tokenizer: Tokenizer
    tokenizer_tokens: list[str]  # tokenizer.ggml.tokens as stored, index = id
    chat_template: str | None
    bos_token: str | None
    bos_token_id: int | None
    eos_token: str | None
    eos_token_id: int | None
    eos_token_ids: frozenset[int]
    unk_token: str | None
    pad_token: str | None
    special_tokens: tuple[str, ...]
    add_bos_token: bool
    add_eos_token: bool


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table: printable Latin-1 bytes map to themselves, the others to
    U+0100 onwards, so every byte string spells as visible text."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    extra = (b for b in range(256) if b not in table)
    table.update({b: chr(256 + n) for n, b in enumerate(extra)})
    return table


def build_gguf_tokenizer(get: Callable[[str, Any], Any]) -> GGUFTokenizerInfo:
    """`get(key, default)` reads one GGUF metadata value."""
    kind = get("tokenizer.ggml.model", None)
    if kind != "gpt2":
        raise ValueError(
            f"GGUF tokenizer model {kind!r} is not supported (only byte-level BPE, 'gpt2'); "
            "pass an HF tokenizer directory with --tokenizer instead"
        )
    tokens = get("tokenizer.ggml.tokens", None)
    merges = get("tokenizer.ggml.merges", None)
    if not tokens or merges is None:
        raise ValueError("GGUF byte-level tokenizer needs tokenizer.ggml.tokens and tokenizer.ggml.merges")
    token_types = get("tokenizer.ggml.token_type", None) or [1] * len(tokens)
    alphabet = set(bytes_to_unicode().values())

    def spelled(token: str) -> str:
        # A token written with characters outside the byte alphabet (some converters store added tokens as plain
        # text) is respelled byte by byte so the BPE model can produce it.
        return token if set(token) <= alphabet else "".join(bytes_to_unicode()[b] for b in token.encode())

    vocab = {spelled(token): i for i, token in enumerate(tokens)}
    model = models.BPE(
        vocab=vocab,
        merges=[tuple(m.split(" ", 1)) for m in merges],
        dropout=None,
        continuing_subword_prefix="",
        end_of_word_suffix="",
        fuse_unk=False,
    )
    tok = Tokenizer(model)
    tok.pre_tokenizer = _pre_tokenizer(get("tokenizer.ggml.pre", "default"))
    tok.decoder = decoders.ByteLevel()

    # Control tokens (<|im_start|> ...) must match whole in text and be skippable on decode. One spelled outside
    # the byte alphabet is a llama.cpp mislabel and stays out, as in transformers.
    special = [t for t, ty in zip(tokens, token_types) if ty == _CONTROL and set(t) <= alphabet]
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in special])
    user = [t for t, ty in zip(tokens, token_types) if ty == _USER_DEFINED and t in vocab]
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])

    def token_at(key: str) -> tuple[str | None, int | None]:
        i = get(f"tokenizer.ggml.{key}", None)
        return (tokens[i], int(i)) if i is not None and 0 <= i < len(tokens) else (None, None)

    (bos, bos_id), (eos, eos_id) = token_at("bos_token_id"), token_at("eos_token_id")
    (unk, _), (pad, _) = token_at("unknown_token_id"), token_at("padding_token_id")
    # End-of-turn / end-of-message (Llama 3's <|eot_id|>, <|eom_id|>) end generation in llama.cpp too.
    eos_ids = {i for i in (eos_id, token_at("eot_token_id")[1], token_at("eom_token_id")[1]) if i is not None}
    add_bos = bool(get("tokenizer.ggml.add_bos_token", False))
    add_eos = bool(get("tokenizer.ggml.add_eos_token", False))
    tok.post_processor = template_post_processor(add_bos, bos, bos_id, add_eos, eos, eos_id)
    return GGUFTokenizerInfo(
        tokenizer=tok,
        tokenizer_tokens=tokens,
        chat_template=get("tokenizer.chat_template", None),
        bos_token=bos,
        bos_token_id=bos_id,
        eos_token=eos,
        eos_token_id=eos_id,
        eos_token_ids=frozenset(eos_ids),
        unk_token=unk,
        pad_token=pad,
        special_tokens=tuple(special),
        add_bos_token=add_bos,
        add_eos_token=add_eos,
    )


def _pre_tokenizer(pre: str):
    split = _PRE_TOKENIZER_SPLITS.get(pre)
    if split is None:
        if pre not in _GPT2_REGEX_PRE:
            logger.warning("GGUF pre-tokenizer %r is unknown; splitting text with GPT-2's regex", pre)
        return pre_tokenizers.ByteLevel(add_prefix_space=False)
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
