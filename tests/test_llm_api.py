"""The offline LLM API: prompt forms, per-prompt SamplingParams, output order, chat(), close() and the context
manager."""

import jax
import pytest
import tokenizers

from conftest import FIXTURES, TINY, golden
from jaxllm import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


def _tokens(outs):
    return [o.outputs[0].token_ids for o in outs]


def test_prompt_forms_agree(tiny_llm):
    llm = tiny_llm("llama3")
    text = str(golden("llama3")["prompt_text_1"])
    ids = llm.get_tokenizer().encode(text)
    assert ids == golden("llama3")["prompt_1"].tolist()
    forms = [text, {"prompt": text}, {"prompt_token_ids": ids}, ids]
    outs = [llm.generate(f, GREEDY, use_tqdm=False)[0] for f in forms]
    assert all(o.prompt_token_ids == ids for o in outs)
    assert [o.prompt for o in outs] == [text, text, None, None]
    assert _tokens(outs) == [golden("llama3")["greedy_1"].tolist()[:6]] * 4
    assert len({o.request_id for o in outs}) == 4
    # A list of id lists is several prompts, a flat list of ids one.
    assert len(llm.generate([ids, ids[:5]], GREEDY, use_tqdm=False)) == 2
    assert len(llm.generate(ids[:5], GREEDY, use_tqdm=False)) == 1


def test_per_prompt_params_and_output_order(tiny_llm):
    llm = tiny_llm("llama3")
    g = golden("llama3")
    prompts = [{"prompt_token_ids": g[f"prompt_{i}"].tolist()} for i in (2, 0, 1)]
    # The longest prompt first and the shortest budget last, so requests finish in another order than given.
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (20, 3, 1)]
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert [o.prompt_token_ids for o in outs] == [p["prompt_token_ids"] for p in prompts]
    assert _tokens(outs) == [g["greedy_2"].tolist()[:20], g["greedy_0"].tolist()[:3], g["greedy_1"].tolist()[:1]]
    with pytest.raises(ValueError, match="2 entries for 3 prompts"):
        llm.generate(prompts, params[:2], use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()


def test_chat_applies_the_template(tiny_llm):
    llm = tiny_llm("llama3")
    backend = tokenizers.Tokenizer.from_file(str(FIXTURES / "llama3" / "tokenizer.json"))
    first = [{"role": "user", "content": "Hi there"}]
    second = [{"role": "user", "content": "What time is it?"}, {"role": "assistant", "content": "Noon."},
              {"role": "user", "content": "Thanks"}]
    expected = [
        "<|bos|><|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
        "<|bos|><|im_start|>user\nWhat time is it?<|im_end|>\n<|im_start|>assistant\nNoon.<|im_end|>\n"
        "<|im_start|>user\nThanks<|im_end|>\n<|im_start|>assistant\n",
    ]
    expected_ids = [backend.encode(t, add_special_tokens=False).ids for t in expected]
    assert expected_ids[0][:2] == [1, 3]  # one bos (from the template, none added), then <|im_start|>
    outs = llm.chat([first, second], GREEDY, use_tqdm=False)
    assert [o.prompt_token_ids for o in outs] == expected_ids and [o.prompt for o in outs] == expected
    assert _tokens(outs) == _tokens(llm.generate([{"prompt_token_ids": i} for i in expected_ids], GREEDY,
                                                 use_tqdm=False))
    single = llm.chat(first, GREEDY, use_tqdm=False)
    assert len(single) == 1 and single[0].prompt_token_ids == expected_ids[0]
    no_prompt = llm.chat(first, GREEDY, use_tqdm=False, add_generation_prompt=False)[0]
    assert no_prompt.prompt_token_ids == backend.encode(expected[0].removesuffix("<|im_start|>assistant\n"),
                                                        add_special_tokens=False).ids


def test_context_manager_and_close_free_device_buffers():
    with LLM(model=str(FIXTURES / "llama2"), **TINY) as llm:
        g = golden("llama2")
        out = llm.generate({"prompt_token_ids": g["prompt_0"].tolist()}, GREEDY, use_tqdm=False)[0]
        assert out.outputs[0].token_ids == g["greedy_0"].tolist()[:6]
        runner = llm.llm_engine.runner
        buffers = jax.tree_util.tree_leaves((runner.params, runner.kv_cache))
        assert buffers and not any(b.is_deleted() for b in buffers)
        live = {id(a) for a in jax.live_arrays()}
        assert all(id(b) in live for b in buffers)
    assert all(b.is_deleted() for b in buffers)
    live = {id(a) for a in jax.live_arrays()}
    assert not any(id(b) in live for b in buffers)
    llm.close()  # a second close is harmless


def test_close_without_context_manager():
    llm = LLM(model=str(FIXTURES / "qwen2"), **TINY)
    buffers = jax.tree_util.tree_leaves((llm.llm_engine.runner.params, llm.llm_engine.runner.kv_cache))
    llm.close()
    assert buffers and all(b.is_deleted() for b in buffers)


def test_an_interrupted_generate_leaves_nothing_queued(tiny_llm, monkeypatch):
    llm = tiny_llm("llama3")
    engine = llm.llm_engine
    free = engine.block_manager.num_free_blocks
    dispatch, calls = engine.runner.dispatch, []

    def interrupted_on_third_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return dispatch(*args, **kwargs)
    monkeypatch.setattr(engine.runner, "dispatch", interrupted_on_third_step)
    prompts = [{"prompt_token_ids": list(range(10 + i, 60 + i))} for i in range(4)]
    with pytest.raises(KeyboardInterrupt):
        llm.generate(prompts, GREEDY, use_tqdm=False)
    assert not engine.has_unfinished_requests() and engine.block_manager.num_free_blocks == free
    monkeypatch.undo()
    outs = llm.generate(prompts[:1], GREEDY, use_tqdm=False)
    assert len(outs) == 1 and len(outs[0].outputs[0].token_ids) == 6
