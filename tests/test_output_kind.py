"""RequestOutputKind: CUMULATIVE outputs every step a request moves, FINAL_ONLY one output when it finishes (what
LLM.generate asks for, on copies of the caller's params); DELTA and unknown kinds are refused with a clear error."""

import dataclasses

import numpy as np
import pytest

from jaxllm import SamplingParams
from jaxllm.sampling_params import RequestOutputKind


@pytest.fixture(scope="module")
def llm(tiny_llm):
    return tiny_llm("llama3", enable_prefix_caching=False)


def _run(engine, kind: RequestOutputKind) -> dict[str, list]:
    rng = np.random.default_rng(3)
    seen: dict[str, list] = {}
    for i, max_tokens in enumerate((1, 4, 9)):
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, output_kind=kind)
        engine.add_request(f"{kind.name}{i}", {"prompt_token_ids": rng.integers(5, 500, 7 + 5 * i).tolist()}, params)
    while engine.has_unfinished_requests():
        for output in engine.step():
            seen.setdefault(output.request_id, []).append(output)
    return seen


def test_final_only_returns_each_request_once_with_the_cumulative_result(llm):
    engine = llm.llm_engine
    cumulative, final = _run(engine, RequestOutputKind.CUMULATIVE), _run(engine, RequestOutputKind.FINAL_ONLY)
    assert [len(v) for v in cumulative.values()] == [1, 4, 9]  # one output per token
    assert [len(v) for v in final.values()] == [1, 1, 1]
    for (_, cs), (_, fs) in zip(sorted(cumulative.items()), sorted(final.items())):
        assert fs[0].finished and cs[-1].finished
        assert all(o.prompt_token_ids is cs[0].prompt_token_ids for o in cs)  # one copy per request, not per step
        assert fs[0].outputs[0].token_ids == cs[-1].outputs[0].token_ids
        assert fs[0].outputs[0].text == cs[-1].outputs[0].text


def test_generate_asks_for_final_outputs_without_changing_the_callers_params(llm):
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    before = dataclasses.asdict(params)
    outputs = llm.generate([{"prompt_token_ids": [5, 6, 7]}, {"prompt_token_ids": [8, 9]}], params, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outputs] == [5, 5] and all(o.finished for o in outputs)
    assert dataclasses.asdict(params) == before and params.output_kind is RequestOutputKind.CUMULATIVE


def test_delta_and_unknown_kinds_are_refused_and_numbers_become_kinds():
    with pytest.raises(ValueError, match="DELTA is not supported"):
        SamplingParams(output_kind=RequestOutputKind.DELTA)
    with pytest.raises(ValueError, match="output_kind must be a RequestOutputKind"):
        SamplingParams(output_kind="final")
    assert SamplingParams(output_kind=2).output_kind is RequestOutputKind.FINAL_ONLY
