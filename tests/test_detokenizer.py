"""Incremental detokenization equals full decoding, never emits broken characters, and stays O(window); stop strings
are never partly emitted."""

import pathlib
import random

import pytest
import tokenizers

from jaxllm.default_model import default_model_path
from jaxllm.loading import load_tokenizer
from jaxllm.text.detokenizer import MAX_HELD_TOKENS, DetokenizerState, IncrementalDetokenizer, detokenize_step
from jaxllm.text.gguf_tokenizer import bytes_to_unicode
from jaxllm.text.stop_strings import check_stop_strings
from jaxllm.text.tokenizer import Tokenizer

TINY = pathlib.Path(__file__).parent / "fixtures" / "llama3"
TEXTS = ["The river keeps its own time. ", "日本語のテキスト", "你好，世界! ", "🙂👍🏽🎉 ", "Café naïve über straße ",
         "def f(x):\n    return x ** 2\n", "𠀀𠀁 ", "  \n\t  ", "Ωmega ≠ 𝔸lpha "]


@pytest.fixture(scope="module")
def smollm2():
    return load_tokenizer(default_model_path())  # a .gguf file: the loader reads it


@pytest.fixture(scope="module", params=["smollm2", "tiny"])
def tok(request):
    return request.getfixturevalue("smollm2") if request.param == "smollm2" else Tokenizer.from_pretrained(TINY)


def byte_token_ids(tok: Tokenizer) -> list[int]:
    """Tokens that are one byte >= 0x80: pieces of a multi-byte character, never valid UTF-8 alone."""
    high = {bytes_to_unicode()[b] for b in range(0x80, 0x100)}
    return [i for i in range(tok.vocab_size) if tok.backend.id_to_token(i) in high]


def text_ids(tok: Tokenizer, rng: random.Random, n: int) -> list[int]:
    """At least n ids of whole texts (valid UTF-8) with special tokens between them."""
    ids = []
    while len(ids) < n:
        ids += tok.encode(rng.choice(TEXTS), add_special_tokens=False)
        if rng.random() < 0.2:
            ids.append(rng.choice(tok.all_special_ids))
    return ids


def random_ids(tok: Tokenizer, rng: random.Random, n: int, byte_ids: list[int]) -> list[int]:
    """A mixture: runs of real text (multi-byte characters split over tokens), special tokens, lone bytes, noise."""
    ids = []
    while len(ids) < n:
        r = rng.random()
        if r < 0.4:
            ids += text_ids(tok, rng, rng.randint(1, 8))
        elif r < 0.55:
            ids.append(rng.choice(tok.all_special_ids))
        elif r < 0.75:
            ids.append(rng.choice(byte_ids))
        else:
            ids.append(rng.randrange(tok.vocab_size))
    return ids[:n]


def stream(tok, ids, rng, skip, flush_separately=False, max_chunk=4):
    """Feed ids in random chunks of 1..max_chunk; returns the deltas and the largest window the state ever held."""
    state = DetokenizerState.start(tok, (), skip)
    deltas, widest, i = [], 0, 0
    while i < len(ids):
        k = rng.randint(1, max_chunk)
        last = i + k >= len(ids) and not flush_separately
        state, delta = detokenize_step(tok, state, ids[i : i + k], skip_special_tokens=skip, finished=last)
        deltas.append(delta)
        widest = max(widest, len(state.window))
        i += k
    if flush_separately or not ids:
        state, delta = detokenize_step(tok, state, [], skip_special_tokens=skip, finished=True)
        deltas.append(delta)
    return deltas, widest


@pytest.mark.parametrize("skip", [True, False])
def test_incremental_equals_full_decode_on_random_sequences(tok, skip):
    rng = random.Random(1234 + skip)
    byte_ids = byte_token_ids(tok)
    assert len(byte_ids) > 100
    for trial in range(150):
        ids = random_ids(tok, rng, rng.randint(0, 200), byte_ids)
        deltas, widest = stream(tok, ids, rng, skip, flush_separately=trial % 3 == 0)
        assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip), ids
        # emitted context (< cap + a chunk) + held ids (< cap) + a chunk, whatever the length of the sequence
        assert widest <= 2 * (MAX_HELD_TOKENS + 4)


@pytest.mark.parametrize("skip", [True, False])
def test_valid_text_never_emits_a_broken_character_and_keeps_a_small_window(tok, skip):
    rng = random.Random(99 + skip)
    for trial in range(60):
        ids = text_ids(tok, rng, rng.randint(1, 300))
        one_at_a_time = trial % 2 == 0  # as the engine decodes
        deltas, widest = stream(tok, ids, rng, skip, max_chunk=1 if one_at_a_time else 4)
        assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip)
        assert not any("\ufffd" in d for d in deltas)
        # The previous emission (a chunk + the <= 3 ids it completed + a skipped special) + the held pieces of the
        # next character (<= 3) + the new chunk.
        assert widest <= (9 if one_at_a_time else 15)


def test_a_character_split_over_tokens_is_held_until_complete(smollm2):
    ids = smollm2.encode("a🎉b", add_special_tokens=False)
    assert len(ids) >= 4  # 'a', then the emoji's four bytes in pieces, then 'b'
    d = IncrementalDetokenizer(smollm2)
    deltas = [d.step([i]) for i in ids]
    assert deltas[0] == "a" and "🎉" in "".join(deltas[1:-1]) and deltas[-1] == "b"
    assert all(x == "" for x in deltas[1:-2])


def test_invalid_bytes_are_emitted_within_the_hold_cap():
    tok = Tokenizer.from_pretrained(TINY)
    lead = tok.backend.token_to_id(bytes_to_unicode()[0xE2])  # a 3-byte lead byte, repeated: never completes
    state, out = DetokenizerState(), []
    for _ in range(5 * MAX_HELD_TOKENS):
        state, delta = detokenize_step(tok, state, [lead])
        out.append(delta)
        assert len(state.window) <= 2 * MAX_HELD_TOKENS
    state, delta = detokenize_step(tok, state, [], finished=True)
    assert "".join(out) + delta == tok.decode([lead] * 5 * MAX_HELD_TOKENS)


def test_prompt_context_gives_the_first_token_its_leading_space():
    # A SentencePiece-style decoder drops the leading space of the first token of a text; with the prompt as
    # context the first generated word keeps it, as in the full text (vLLM does the same).
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel({"▁Hello": 0, "▁world": 1, "<unk>": 2}, "<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace()
    backend.decoder = tokenizers.decoders.Metaspace()
    tok = Tokenizer(backend)
    assert tok.decode([1, 0]) == "world Hello"
    with_context = IncrementalDetokenizer(tok, prompt_ids=[0, 1])
    assert with_context.step([0]) + with_context.step([1], finished=True) == " Hello world"
    alone = IncrementalDetokenizer(tok)
    assert alone.step([0]) + alone.step([1], finished=True) == tok.decode([0, 1]) == "Hello world"


def reference_stop(text: str, stop: list[str], include: bool) -> tuple[str, str | None]:
    """Scan the text once, character by character: the first stop string to complete ends the output."""
    for end in range(1, len(text) + 1):
        hits = [s for s in stop if text[:end].endswith(s)]
        if hits:
            s = max(hits, key=len)
            return (text[:end] if include else text[: end - len(s)]), s
    return text, None


def held_back(text: str, stop: list[str]) -> int:
    return max([k for s in stop for k in range(1, len(s)) if text.endswith(s[:k])], default=0)


@pytest.mark.parametrize("include", [False, True])
def test_stop_strings_match_a_character_scan_and_are_never_partly_emitted(include):
    rng = random.Random(7 + include)
    for _ in range(600):
        text = "".join(rng.choice("ab c\n🙂") for _ in range(rng.randint(0, 30)))
        stop = ["".join(rng.choice("ab c🙂") for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
        expected, expected_stop = reference_stop(text, stop, include)
        sent, seen, matched, i = "", "", None, 0
        while i < len(text) and matched is None:
            k = rng.randint(1, 5)
            seen += text[i : i + k]
            i += k
            out, matched = check_stop_strings(seen, len(sent), stop, include_stop_str_in_output=include,
                                              finished=i >= len(text))
            sent += out
            assert expected.startswith(sent), (text, stop, sent)  # nothing emitted is ever taken back
            if matched is None and i < len(text):  # holds back exactly the possible start of a stop string
                assert len(sent) == len(seen) - held_back(seen, stop), (seen, stop, sent)
        assert (sent, matched) == (expected, expected_stop), (text, stop)


def test_stop_string_spanning_tokens_through_the_detokenizer(smollm2):
    text = "The capital of France is Paris. 🎉 Paris is nice."
    ids = smollm2.encode(text, add_special_tokens=False)
    for stop, include, expected in [(["is Par"], False, "The capital of France "),
                                    (["is Par"], True, "The capital of France is Par"),
                                    (["🎉"], False, "The capital of France is Paris. "),
                                    (["xyz", "nice"], True, "The capital of France is Paris. 🎉 Paris is nice")]:
        d, full, sent, matched = IncrementalDetokenizer(smollm2), "", "", None
        for n, i in enumerate(ids):
            full += d.step([i], finished=n == len(ids) - 1)
            out, matched = check_stop_strings(full, len(sent), stop, include_stop_str_in_output=include)
            sent += out
            assert expected.startswith(sent) and "\ufffd" not in sent
            if matched:
                break
        assert sent == expected and matched == stop[-1]
