"""Constrained decoding end to end on the tiny random model, which writes garbage unless constrained: every
constrained output must parse and validate, and unconstrained rows beside them are unaffected."""

import json
import re

import jsonschema
import numpy as np
import pytest

from jaxllm import SamplingParams
from jaxllm.sampling_params import StructuredOutputsParams
from test_engine_preemption import SMALL

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 99},
                                           "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2}},
          "required": ["name", "age"], "additionalProperties": False}
REGEX = r"[a-d]{2,4}-[0-9]{3}"
CHOICES = ["red", "green?", "blue (jeans) $5.*"]  # regex metacharacters stay literal
GRAMMAR = 'start: "(" item ("," item)* ")"\nitem: /[xyz]/ | "n" /[0-9]/'
GRAMMAR_RE = r"\((?:[xyz]|n[0-9])(?:,(?:[xyz]|n[0-9]))*\)"


def _ids(seed: int, n: int) -> list[int]:
    return np.random.default_rng(seed).integers(5, 512, size=n).tolist()


def _kinds():
    return {"json": StructuredOutputsParams(json=SCHEMA), "regex": StructuredOutputsParams(regex=REGEX),
            "choice": StructuredOutputsParams(choice=CHOICES), "json_object": StructuredOutputsParams(json_object=True),
            "grammar": StructuredOutputsParams(grammar=GRAMMAR)}


def _check(kind: str, text: str) -> None:
    if kind == "json":
        jsonschema.validate(json.loads(text), SCHEMA)
    elif kind == "json_object":
        assert isinstance(json.loads(text), dict), text
    elif kind == "regex":
        assert re.fullmatch(REGEX, text), text
    elif kind == "choice":
        assert text in CHOICES, text
    else:
        assert re.fullmatch(GRAMMAR_RE, text), text


# Any JSON object is unbounded: a bias on '"' and '}' (ids 6, 97 in the fixture's vocabulary) lets the random model
# close its strings and the object within max_tokens.
CLOSE_BIAS = {6: 6.0, 97: 6.0}


def _params(kind: str, **kw) -> SamplingParams:
    bias = CLOSE_BIAS if kind == "json_object" else None
    return SamplingParams(**{"max_tokens": 120, **kw}, structured_outputs=_kinds()[kind], logit_bias=bias)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_every_kind_validates_with_n3(tiny_llm, temperature):
    llm = tiny_llm("llama3")
    kinds = list(_kinds())
    outs = llm.generate([{"prompt_token_ids": _ids(i, 9 + i)} for i in range(len(kinds))],
                        [_params(k, temperature=temperature, n=3, seed=5) for k in kinds], use_tqdm=False)
    for kind, out in zip(kinds, outs):
        assert len(out.outputs) == 3
        for sample in out.outputs:
            assert sample.finish_reason == "stop", (kind, sample.text)
            _check(kind, sample.text)
    assert not llm.llm_engine.matchers._samples, "finished requests leave no matcher behind"
    free = llm.generate({"prompt_token_ids": _ids(0, 9)}, SamplingParams(temperature=0, max_tokens=20),
                        use_tqdm=False)[0].outputs[0].text
    with pytest.raises(ValueError):
        json.loads(free)  # the model writes garbage unless constrained


def test_unconstrained_rows_bit_identical_beside_constrained(tiny_llm):
    llm = tiny_llm("llama3")
    free = [{"prompt_token_ids": _ids(100 + i, 13 + 3 * i)} for i in range(3)]
    free_params = [SamplingParams(temperature=0.9, seed=70 + i, max_tokens=24, ignore_eos=True, logprobs=2)
                   for i in range(3)]
    alone = llm.generate(free, free_params, use_tqdm=False)
    kinds = list(_kinds())
    constrained = [{"prompt_token_ids": _ids(200 + i, 11)} for i in range(len(kinds))]
    mixed = llm.generate([constrained[0], free[0], constrained[1], free[1], *constrained[2:], free[2]],
                         [_params(kinds[0], temperature=1.0), free_params[0], _params(kinds[1], temperature=1.0),
                          free_params[1], *[_params(k, temperature=1.0, logprobs=1) for k in kinds[2:]],
                          free_params[2]], use_tqdm=False)
    got_free = [mixed[1], mixed[3], mixed[-1]]
    assert [o.outputs[0].token_ids for o in got_free] == [o.outputs[0].token_ids for o in alone]
    for a, b in zip(got_free, alone):  # logprobs to float rounding: another batch is another matmul shape
        np.testing.assert_allclose([lp[t].logprob for lp, t in zip(a.outputs[0].logprobs, a.outputs[0].token_ids)],
                                   [lp[t].logprob for lp, t in zip(b.outputs[0].logprobs, b.outputs[0].token_ids)],
                                   rtol=1e-5, atol=1e-5)
    for kind, out in zip(kinds, [mixed[0], mixed[2], *mixed[4:-1]]):
        _check(kind, out.outputs[0].text)
    assert all(len(lp) >= 1 for lp in mixed[4].outputs[0].logprobs)


@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_preemption_keeps_matcher_state(tiny_llm, mode):
    llm = tiny_llm("llama3", **SMALL, swap_space=2 / 1024 if mode == "swap" else 0)
    engine = llm.llm_engine
    before = engine.stats().num_preemptions_total
    prompts = [{"prompt_token_ids": _ids(300 + i, 40 + i)} for i in range(6)]
    params = [_params("json", temperature=1.0, seed=i, max_tokens=80) for i in range(6)]
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert engine.stats().num_preemptions_total > before
    reference = tiny_llm("llama3").generate(prompts, params, use_tqdm=False)
    for out, ref in zip(outs, reference):
        assert out.outputs[0].finish_reason == "stop"
        _check("json", out.outputs[0].text)
        assert out.outputs[0].token_ids == ref.outputs[0].token_ids


def test_prefix_cache_hit_and_max_tokens_cut(tiny_llm):
    llm = tiny_llm("llama3")
    prefix = _ids(400, 48)
    llm.generate({"prompt_token_ids": prefix + _ids(401, 3)}, SamplingParams(max_tokens=2), use_tqdm=False)
    out = llm.generate({"prompt_token_ids": prefix + _ids(402, 5)}, _params("json", temperature=0.0),
                       use_tqdm=False)[0]
    assert out.num_cached_tokens == 48
    _check("json", out.outputs[0].text)
    cut = llm.generate({"prompt_token_ids": _ids(403, 8)},
                       SamplingParams(max_tokens=4, temperature=0, structured_outputs=_kinds()["json"]),
                       use_tqdm=False)[0].outputs[0]
    assert cut.finish_reason == "length" and len(cut.token_ids) == 4
    assert out.outputs[0].text.startswith(cut.text), "the cut output is the prefix of the full one"


def test_stop_string_ends_a_constrained_output(tiny_llm):
    llm = tiny_llm("llama3")
    out = llm.generate({"prompt_token_ids": _ids(500, 8)},
                       SamplingParams(temperature=0, max_tokens=40, stop=["-"],
                                      structured_outputs=StructuredOutputsParams(regex=REGEX)),
                       use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == "-"
    assert re.fullmatch(r"[a-d]{2,4}", out.text), out.text


@pytest.mark.parametrize("so, field", [
    (dict(json={"type": "object", "properties": {"a": {"type": "nonsense"}}}), "json"),
    (dict(json="{not json"), "json"),
    (dict(regex="[a-"), "regex"),
    (dict(grammar="start: (("), "grammar"),
])
def test_invalid_constraint_is_a_value_error_naming_the_field(tiny_llm, so, field):
    llm = tiny_llm("llama3")
    engine = llm.llm_engine
    with pytest.raises(ValueError, match=rf"structured_outputs\.{field}"):
        engine.add_request("bad", {"prompt_token_ids": [5, 6, 7]},
                           SamplingParams(structured_outputs=StructuredOutputsParams(**so)))
    assert not engine.has_unfinished_requests()
    ok = llm.generate({"prompt_token_ids": [5, 6, 7]}, _params("choice", temperature=0), use_tqdm=False)
    assert ok[0].outputs[0].text in CHOICES


@pytest.mark.parametrize("kw", [{}, dict(json=SCHEMA, regex="a"), dict(choice=[]), dict(choice=["a", 1]),
                                dict(regex=3)])
def test_structured_outputs_params_need_exactly_one_valid_kind(kw):
    with pytest.raises(ValueError, match="structured_outputs"):
        StructuredOutputsParams(**kw)
