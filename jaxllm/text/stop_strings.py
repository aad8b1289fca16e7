"""Stop strings over streamed text: what may be sent now, and whether generation must stop.

Text that could still turn into a stop string is held back, so a stop string that spans tokens is never partly
streamed. The match that wins is the one that ends first in the text (the longest one on a tie): that is the
first stop string a reader scanning the text sees complete, so the result does not depend on how the text was
split into tokens or steps (vLLM picks by list order within one step, which can depend on the split).
"""

from collections.abc import Sequence


def check_stop_strings(
    text: str,
    emitted: int,
    stop: Sequence[str],
    *,
    include_stop_str_in_output: bool = False,
    finished: bool = False,
) -> tuple[str, str | None]:
    """`text` is the output text so far, of which the first `emitted` characters were already sent.

    Returns (text to send now, matched stop string or None). On a match generation stops and the final output text
    is `text[:emitted] + sent`: it ends right before the stop string, or right after it with
    include_stop_str_in_output. With `finished` (the sequence ended for another reason) nothing is held back.
    """
    pending = text[emitted:]
    # Everything before `emitted` was checked and cannot start a stop string, so a match lies inside `pending`.
    best = None  # (end, -len, start, stop)
    for s in stop:
        start = pending.find(s) if s else -1  # SamplingParams rejects empty stop strings; never match one here
        if start >= 0:
            candidate = (start + len(s), -len(s), start, s)
            best = candidate if best is None or candidate < best else best
    if best is not None:
        end, _, start, s = best
        return pending[: end if include_stop_str_in_output else start], s
    if finished:
        return pending, None
    return pending[: len(pending) - _partial_match_length(pending, stop)], None


def _partial_match_length(text: str, stop: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
    longest = 0
    for s in stop:
        # Candidate starts are occurrences of the stop string's first character in the last len(s) - 1 characters.
        i = text.find(s[0], max(0, len(text) - len(s) + 1)) if s else -1
        while i != -1 and len(text) - i > longest:
            if s.startswith(text[i:]):
                longest = len(text) - i
                break
            i = text.find(s[0], i + 1)
    return longest
