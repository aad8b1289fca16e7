"""Incremental detokenization: the text each new batch of token ids adds, in O(window) per step.

vLLM's prefix_offset/read_offset scheme: decode a short window of ids twice, once up to what was already emitted
and once to the end, and emit the difference. Decoding a window instead of a single token keeps the context that
decoders need (byte-level tokens that are parts of one UTF-8 character, SentencePiece's leading-space rule), and
text is held back while it ends in U+FFFD, which is what a character cut in the middle of its bytes decodes to.

The state is a small frozen value: it goes in and comes back out, so a sequence owns it and preemption, n > 1 and
aborts need no bookkeeping here.
"""

import dataclasses
from collections.abc import Sequence

from jaxllm.text.tokenizer import Tokenizer

# A held-back tail longer than this is emitted as it is. Valid text never holds more than the 3 ids of a cut
# character (plus skipped special tokens), so only output that is already invalid UTF-8 gets here; the cap keeps a
# request that samples nothing but stray bytes from making each step decode an ever longer window.
MAX_HELD_TOKENS = 16

# Prompt ids kept as decoding context, so the first output token decodes as it would inside the full text.
_PROMPT_CONTEXT_MIN, _PROMPT_CONTEXT_MAX = 4, 24


@dataclasses.dataclass(frozen=True)
class DetokenizerState:
    window: tuple[int, ...] = ()  # the ids still needed: window[:read] were already emitted (context only)
    read: int = 0

    @classmethod
    def start(cls, tokenizer: Tokenizer, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True):
        """The state before the first output token; with prompt ids, their tail is the decoding context (as vLLM:
        the shortest suffix of at least 4 ids that decodes without U+FFFD, i.e. starts on a character)."""
        prompt_ids = tuple(prompt_ids[-_PROMPT_CONTEXT_MAX:])
        context = prompt_ids[-_PROMPT_CONTEXT_MIN:]
        for n in range(_PROMPT_CONTEXT_MIN, min(len(prompt_ids), _PROMPT_CONTEXT_MAX) + 1):
            if "\ufffd" not in tokenizer.decode(prompt_ids[-n:], skip_special_tokens=skip_special_tokens):
                context = prompt_ids[-n:]
                break
        return cls(window=context, read=len(context))


def detokenize_step(
    tokenizer: Tokenizer,
    state: DetokenizerState,
    new_ids: Sequence[int],
    *,
    skip_special_tokens: bool = True,
    finished: bool = False,
) -> tuple[DetokenizerState, str]:
    """Append `new_ids`; return the new state and the text delta that is now final.

    Concatenating the deltas of a sequence (with `finished=True` on the last call, which flushes what is held back)
    gives `tokenizer.decode(all_ids)` exactly.
    """
    window = state.window + tuple(new_ids)
    emitted_text = tokenizer.decode(window[: state.read], skip_special_tokens=skip_special_tokens)
    text = tokenizer.decode(window, skip_special_tokens=skip_special_tokens)
    if not finished and (len(text) <= len(emitted_text) or text.endswith("\ufffd")):
        # The tail is part of a character. Emit up to the last id boundary that ends on a whole character: the cut
        # character's bytes (<= 3) lie in the last <= 3 ids, so looking 3 ids back finds it for any valid text.
        for end in range(len(window) - 1, max(state.read, len(window) - 4), -1):
            partial = tokenizer.decode(window[:end], skip_special_tokens=skip_special_tokens)
            if len(partial) > len(emitted_text) and not partial.endswith("\ufffd"):
                return DetokenizerState(window[state.read :], end - state.read), partial[len(emitted_text) :]
        if len(window) - state.read < MAX_HELD_TOKENS:
            return DetokenizerState(window, state.read), ""
    # The emitted text keeps only the ids just emitted as context for the next step.
    return DetokenizerState(window[state.read :], len(window) - state.read), text[len(emitted_text) :]


class IncrementalDetokenizer:
    """`detokenize_step` with the state kept inside, for callers that prefer an object."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.state = DetokenizerState.start(tokenizer, prompt_ids, skip_special_tokens)

    def step(self, new_ids: Sequence[int], finished: bool = False) -> str:
        self.state, delta = detokenize_step(
            self.tokenizer, self.state, new_ids, skip_special_tokens=self.skip_special_tokens, finished=finished
        )
        return delta
