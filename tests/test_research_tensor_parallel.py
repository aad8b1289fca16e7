"""Hidden states and steering under tensor parallelism on 4 CPU devices: TP = 2 and 4 equal TP = 1 and the Hugging
Face reference (research.npz). The residual stream is replicated over tp, so the gathered states are whole on
every device. Runs in a child process with 4 devices, as tests/test_tensor_parallel.py does."""

import json
import subprocess
import sys

import numpy as np
import pytest

from test_tensor_parallel import FIXTURES, ROOT, four_cpu_devices

CHILD = r"""
import json, sys
import jax, numpy as np
from jaxllm import LLM, SamplingParams

fixture, tps = sys.argv[1], json.loads(sys.argv[2])
assert jax.device_count() == 4, jax.devices()
r = np.load(f"{fixture}/research.npz")
ids = r["hs_ids"].tolist()
hidden = SamplingParams(temperature=0, max_tokens=len(ids) - 40 + 1, ignore_eos=True, return_hidden_states=True)
steer = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True,
                       steering={int(r["steer_layer"]): r["steer_vector"]})
report = {}
for tp in tps:
    llm = LLM(model=fixture, dtype="float32", enforce_eager=True, max_model_len=256, max_num_seqs=8,
              kv_cache_memory_bytes=1 << 22, max_num_batched_tokens=16, tensor_parallel_size=tp)
    outs = llm.generate([{"prompt_token_ids": ids[:40]}, {"prompt_token_ids": r["steer_prompt"].tolist()}],
                        [hidden, steer], use_tqdm=False)
    states = outs[0].outputs[0].hidden_states
    np.save(f"{sys.argv[3]}/hidden_tp{tp}.npy", states)
    report[tp] = {"steered": outs[1].outputs[0].token_ids}
    llm.close()
print("REPORT" + json.dumps(report))
"""


@pytest.mark.parametrize("fixture, tps", [("llama3", [1, 2, 4]), ("qwen2", [1, 2])])
def test_tp_hidden_states_and_steering_equal_tp1(fixture, tps, tmp_path):
    child = subprocess.run([sys.executable, "-c", CHILD, str(FIXTURES / fixture), json.dumps(tps), str(tmp_path)],
                           env=four_cpu_devices(), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert child.returncode == 0, child.stderr[-3000:]
    line = next(line for line in child.stdout.splitlines() if line.startswith("REPORT"))
    report = {int(tp): v for tp, v in json.loads(line[len("REPORT"):]).items()}
    with np.load(FIXTURES / fixture / "research.npz") as r:
        reference, steer_greedy = r["hidden_states"], r["steer_greedy"].tolist()
    tp1 = np.load(tmp_path / "hidden_tp1.npy")
    for tp in tps:
        states = np.load(tmp_path / f"hidden_tp{tp}.npy")
        assert states.shape == reference.shape
        assert np.linalg.norm(states - reference) <= 1e-4 * np.linalg.norm(reference)
        assert np.linalg.norm(states - tp1) <= 1e-5 * np.linalg.norm(tp1)
        assert report[tp]["steered"] == steer_greedy
