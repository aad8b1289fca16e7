"""The Tokenizer wrapper: the default GGUF tokenizer against transformers' encodings, HF directories, chat templates."""

import json
import pathlib
import random
import shutil

import pytest

from jaxllm.default_model import default_model_path
from jaxllm.loading import load_tokenizer, read_gguf_file
from jaxllm.text.tokenizer import Tokenizer

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
REFERENCE = FIXTURES / "smollm2_gguf.json"
TINY = FIXTURES / "llama3"
# Characters that stress byte-level BPE: multi-byte UTF-8 of every length, combining marks, CJK extension B (only
# reachable through single-byte tokens), controls, whitespace runs, and the special-token spelling.
ALPHABET = list("aZ0 9.,'\n\t\r_-<|>") + ["é", "ß", "Ω", "й", "日", "本", "語", "你", "🙂", "👍🏽", "\u0301",
                                          "𠀀", "\x00", "\x7f", "\u200b", "  ", "<|im_end|>", "’"]


@pytest.fixture(scope="module")
def smollm2():
    return load_tokenizer(default_model_path())  # a .gguf file: the loader reads it


@pytest.fixture(scope="module")
def reference():
    if not REFERENCE.exists():
        pytest.skip(f"{REFERENCE.name} not generated yet (tests/fixtures/make_golden.py)")
    return json.loads(REFERENCE.read_text())


def random_texts(seed: int, count: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 24))) for _ in range(count)]


def test_encodings_equal_transformers_gguf_tokenizer(smollm2, reference):
    assert len(reference["encodings"]) >= 10
    for case in reference["encodings"]:
        assert smollm2.encode(case["text"], add_special_tokens=False) == case["ids"], case["text"]
        assert smollm2.encode(case["text"]) == case["ids"], case["text"]  # the file says add_bos_token = false
        assert smollm2.decode(case["ids"], skip_special_tokens=False) == case["text"]


def test_special_tokens_match_transformers(smollm2, reference):
    for key in ("bos", "eos", "pad", "unk"):
        assert getattr(smollm2, f"{key}_token") == reference[f"{key}_token"], key
    assert (smollm2.bos_token_id, smollm2.eos_token_id, smollm2.pad_token_id) == (
        reference["bos_token_id"], reference["eos_token_id"], reference["pad_token_id"])
    assert smollm2.eos_token_ids == {2}
    assert smollm2.vocab_size == 49152
    assert smollm2.all_special_ids == list(range(17))  # the 17 tokens the file marks as control
    assert smollm2.convert_ids_to_tokens([1, 19556, 216]) == ["<|im_start|>", "Hello", "Ġ"]


def test_decode_matches_transformers_with_and_without_special_tokens(smollm2, reference):
    ids = reference["greedy_new_ids"]
    assert smollm2.decode(ids, skip_special_tokens=False) == reference["greedy_text"]
    assert smollm2.decode(ids) == reference["greedy_text_skip_special"]


def test_chat_template_renders_exactly_the_reference_prompt(smollm2, reference):
    assert smollm2.chat_template == reference["chat_template"]
    text = smollm2.apply_chat_template(reference["chat_messages"], add_generation_prompt=True)
    assert text == reference["chat_prompt_text"]
    assert smollm2.encode(text, add_special_tokens=False) == reference["chat_prompt_ids"]
    without = smollm2.apply_chat_template(reference["chat_messages"], add_generation_prompt=False)
    assert text == without + "<|im_start|>assistant\n"


def test_round_trip_of_random_multilingual_text(smollm2):
    for text in random_texts(seed=1, count=400) + ["𠀀\x00🙂👍🏽", "naïve café 日本語", "  \n\n  x  "]:
        ids = smollm2.encode(text, add_special_tokens=False)
        assert smollm2.decode(ids, skip_special_tokens=False) == text
        assert smollm2.decode(ids) == text.replace("<|im_end|>", "")
        assert all(0 <= i < smollm2.vocab_size for i in ids)


def test_rare_characters_fall_back_to_byte_tokens(smollm2):
    ids = smollm2.encode("𠀀", add_special_tokens=False)  # U+20000: 4 UTF-8 bytes, no merged token
    assert len(ids) > 1 and smollm2.decode(ids) == "𠀀"
    assert smollm2.decode(ids[:1]) == "\ufffd"  # a lone lead byte


def test_hf_directory_tokenizer():
    tok = Tokenizer.from_pretrained(TINY)
    ids = tok.encode("The river keeps its own time.")
    assert ids[0] == tok.bos_token_id == 1 and ids[1:] == tok.encode("The river keeps its own time.", False)
    assert tok.decode(ids) == "The river keeps its own time."
    assert tok.decode(ids, skip_special_tokens=False) == "<|bos|>The river keeps its own time."
    assert (tok.eos_token, tok.eos_token_ids, tok.pad_token_id, tok.vocab_size) == ("<|eos|>", {2}, 0, 512)
    assert set(tok.all_special_ids) == {0, 1, 2, 3, 4}
    chat = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    assert chat == "<|bos|><|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    assert tok.encode(chat, add_special_tokens=False).count(1) == 1


def test_tokenizer_config_add_bos_token_false_overrides_tokenizer_json(tmp_path):
    shutil.copytree(TINY, tmp_path / "m", ignore=shutil.ignore_patterns("*.safetensors", "*.npz"))
    config_path = tmp_path / "m" / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config |= {"add_bos_token": False, "add_eos_token": True}
    config_path.write_text(json.dumps(config))
    (tmp_path / "m" / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 4]}))
    tok = Tokenizer.from_pretrained(tmp_path / "m")
    ids = tok.encode("hello")
    assert ids[0] != 1 and ids[-1] == 2 and ids[:-1] == tok.encode("hello", add_special_tokens=False)
    assert tok.eos_token_ids == {2, 4}


def test_missing_tokenizer_json_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)


def test_load_tokenizer_takes_a_gguf_checkpoint_already_read_or_an_override(smollm2):
    checkpoint = read_gguf_file(default_model_path())
    tok = load_tokenizer(checkpoint)
    assert tok.backend is checkpoint.tokenizer  # built from the metadata in hand, not from the file again
    assert tok.encode("Hello, world") == smollm2.encode("Hello, world") and tok.eos_token_ids == smollm2.eos_token_ids
    assert load_tokenizer(checkpoint, TINY).encode("Hello") == Tokenizer.from_pretrained(TINY).encode("Hello")
    with pytest.raises(FileNotFoundError, match="load_tokenizer"):
        Tokenizer.from_pretrained(default_model_path())


def test_no_chat_template_is_a_clear_error(tmp_path):
    tok = Tokenizer(Tokenizer.from_pretrained(TINY).backend, eos_token="<|eos|>")
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    messages = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(messages, chat_template="{{ messages[0].content }}") == "hi"


@pytest.fixture(scope="module")
def tiny():
    return Tokenizer.from_pretrained(TINY)


def render(tok, template, messages=({"role": "user", "content": "hi"},), **kwargs):
    return tok.apply_chat_template(list(messages), chat_template=template, **kwargs)


def test_template_helpers_behave_as_in_transformers(tiny):
    msg = [{"role": "user", "content": "<b>é & ü</b>"}]
    # tojson: no HTML escaping, non-ASCII kept, indent and sort_keys honoured
    assert render(tiny, "{{ messages[0] | tojson }}", msg) == '{"role": "user", "content": "<b>é & ü</b>"}'
    assert render(tiny, "{{ {'b': 1, 'a': 2} | tojson(indent=1, sort_keys=True) }}") == '{\n "a": 2,\n "b": 1\n}'
    with pytest.raises(ValueError, match="roles must alternate"):
        render(tiny, "{{ raise_exception('roles must alternate') }}")
    year = render(tiny, "{{ strftime_now('%Y') }}")
    assert year.isdigit() and len(year) == 4
    assert render(tiny, "{{ bos_token }}|{{ eos_token }}|{{ add_generation_prompt }}") == "<|bos|>|<|eos|>|True"
    assert render(tiny, "{% for m in [1, 2, 3] %}{% if m == 2 %}{% break %}{% endif %}{{ m }}{% endfor %}") == "1"
    assert render(tiny, "{% generation %}x{{ messages[0].content }}{% endgeneration %}") == "xhi"
    assert render(tiny, "{% set ns = namespace(n=0) %}{% set ns.n = 5 %}{{ ns.n }}") == "5"


def test_template_whitespace_control_is_trim_and_lstrip_blocks(tiny):
    template = "  {% for m in messages %}\n    [{{ m.content }}]\n  {% endfor %}\nend"
    assert render(tiny, template, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]) == (
        "    [a]\n    [b]\nend")


def test_template_sandbox_blocks_python_internals(tiny):
    for template in ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "{% set ns = namespace(_x=1) %}{{ ns._x }}"):
        with pytest.raises(ValueError, match="unsafe|underscore"):
            render(tiny, template)
    assert render(tiny, "{{ messages.__class__ }}") == ""  # an unsafe attribute reads as undefined, never the type


def test_named_templates_and_tools(tmp_path):
    shutil.copytree(TINY, tmp_path / "m", ignore=shutil.ignore_patterns("*.safetensors", "*.npz"))
    config_path = tmp_path / "m" / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = [{"name": "default", "template": "D{{ messages[0].content }}"},
                               {"name": "tool_use", "template": "T{{ tools[0].name }}"}]
    config_path.write_text(json.dumps(config))
    tok = Tokenizer.from_pretrained(tmp_path / "m")
    messages = [{"role": "user", "content": "x"}]
    assert tok.apply_chat_template(messages) == "Dx"
    assert tok.apply_chat_template(messages, tools=[{"name": "calc"}]) == "Tcalc"
    assert tok.apply_chat_template(messages, chat_template="tool_use", tools=[{"name": "f"}]) == "Tf"
