"""jaxllm's Tokenizer -> llguidance's LLTokenizer.

Both the HF tokenizer and the one built from a GGUF file wrap a `tokenizers.Tokenizer`, whose JSON llguidance reads
directly; n_vocab is the model's logits width, so ids past the tokenizer's vocabulary are always masked.
"""

import copy

import llguidance

from jaxllm.text.tokenizer import Tokenizer


def ll_tokenizer(tokenizer: Tokenizer, vocab_size: int, eos_token_ids) -> llguidance.LLTokenizer:
    backend = copy.copy(tokenizer.backend)  # padding and truncation would change how llguidance reads tokens
    backend.no_padding()
    backend.no_truncation()
    eos = sorted(eos_token_ids)
    if not eos:  # a grammar ends by allowing only EOS
        raise ValueError("structured_outputs needs the model to have an EOS token.")
    return llguidance.LLTokenizer(backend.to_str(), n_vocab=vocab_size, eos_token=eos[0] if len(eos) == 1 else eos)
