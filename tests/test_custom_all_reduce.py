"""disable_custom_all_reduce (vLLM's knob): it reaches EngineConfig from LLM(...) and from `jaxllm serve`, the model
step asks XLA for its collective kernels only on a single-host GPU mesh of several devices, the option is spelled
so XLA accepts it (on CPU too, where it is ignored), and TP = 2 greedy output equals TP = 1 either way.

TP needs several devices, fixed when jax starts: those runs happen in a child process with 4 CPU devices (as in
test_tensor_parallel.py), which reports JSON.
"""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import EngineConfig
from jaxllm.runtime.compiler_options import step_compiler_options
from serving.cli import parse_args

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "llama3"
GPU = {"xla_gpu_command_buffer_update_mode": "SKIP_TEMP"}  # every GPU step (compiler_options.step_compiler_options)
GRAPHED = "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,CONDITIONAL,DYNAMIC_SLICE_FUSION,COLLECTIVES"
TP = GPU | {"xla_gpu_enable_command_buffer": GRAPHED}  # tensor parallel: all-reduces inside the step's CUDA graph
KERNELS = TP | {"xla_gpu_experimental_use_collective_kernels": "COLLECTIVE_KERNEL_ALL_REDUCE"}

CHILD = r"""
import json, sys
import jax, numpy as np
import jaxllm.runtime.runner as runner_module
from jaxllm import LLM, SamplingParams

fixture = sys.argv[1]
assert jax.device_count() == 4, jax.devices()
golden = np.load(f"{fixture}/golden.npz")
requests = [{"prompt_token_ids": golden[f"prompt_{i}"].tolist()} for i in (0, 1)]
greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
real = runner_module.step_compiler_options
# XLA_FLAGS' short spelling, which per-compile options reject: the step fails to compile iff it gets the options.
rejected = lambda config, platform: {"xla_gpu_experimental_use_collective_kernels": "ALL_REDUCE"}
cases = {"tp1": (1, False, real), "tp2": (2, False, real), "tp2_disabled": (2, True, real),
         "tp2_rejected_option": (2, False, rejected)}
report = {}
for name, (tp, disabled, options) in cases.items():
    runner_module.step_compiler_options = options
    llm = LLM(model=fixture, dtype="float32", enforce_eager=True, max_model_len=256, max_num_seqs=8,
              kv_cache_memory_bytes=1 << 22, tensor_parallel_size=tp, disable_custom_all_reduce=disabled)
    config = llm.llm_engine.config
    entry = {"disabled": config.disable_custom_all_reduce,
             "options": options(config, llm.llm_engine.runner.platform)}
    try:
        entry["tokens"] = [list(o.outputs[0].token_ids) for o in llm.generate(requests, greedy, use_tqdm=False)]
    except Exception as e:
        entry["error"] = str(e)
    report[name] = entry
    llm.close()
print("REPORT" + json.dumps(report))
"""


@pytest.fixture(scope="module")
def tp_report() -> dict:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
               PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    child = subprocess.run([sys.executable, "-c", CHILD, str(FIXTURE)], env=env, cwd=ROOT, capture_output=True,
                           text=True, timeout=300)
    assert child.returncode == 0, child.stdout[-3000:] + child.stderr[-6000:]
    line = next(line for line in child.stdout.splitlines() if line.startswith("REPORT"))
    return json.loads(line[len("REPORT"):])


def test_the_server_flag_reaches_the_engine_config():
    assert parse_args([])[0].disable_custom_all_reduce is False  # vLLM's default
    assert parse_args(["--disable-custom-all-reduce"])[0].disable_custom_all_reduce is True


@pytest.mark.parametrize("platform, tp, disabled, nnodes, want", [
    ("gpu", 2, False, 1, KERNELS),
    ("gpu", 8, False, 1, KERNELS),
    ("gpu", 2, True, 1, TP),  # --disable-custom-all-reduce: NCCL
    ("gpu", 1, False, 1, GPU),  # no collective to speed up
    ("gpu", 4, False, 2, TP),  # across hosts, as vLLM's custom all-reduce: NCCL
    ("cpu", 2, False, 1, {}),
    ("tpu", 2, False, 1, {}),
])
def test_collective_kernels_only_on_a_single_gpu_host_with_tp(platform, tp, disabled, nnodes, want):
    config = EngineConfig(tensor_parallel_size=tp, disable_custom_all_reduce=disabled, nnodes=nnodes,
                          master_addr="10.0.0.1" if nnodes > 1 else None)
    assert step_compiler_options(config, platform) == want


def test_xla_accepts_the_option_as_spelled_and_rejects_the_xla_flags_spelling():
    """Per-compile options are parsed by proto reflection on any backend: the enum's full name compiles (and is
    ignored on CPU); "ALL_REDUCE", which XLA_FLAGS accepts, is an error."""
    options = step_compiler_options(EngineConfig(tensor_parallel_size=2), "gpu")
    x = jnp.arange(4.0)
    assert jax.jit(lambda a: a * 2, compiler_options=options)(x).tolist() == [0.0, 2.0, 4.0, 6.0]
    with pytest.raises(Exception, match="not a valid enum value"):
        jax.jit(lambda a: a * 3, compiler_options={"xla_gpu_experimental_use_collective_kernels": "ALL_REDUCE"})(x)


@pytest.mark.server
def test_the_graphed_commands_are_xlas_default_plus_collectives(tmp_path):
    """XLA dumps the options that differ from its defaults: dropping CUSTOM_CALL by flag shows the default list."""
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_dump_to={tmp_path} --xla_gpu_enable_command_buffer=-CUSTOM_CALL")
    subprocess.run([sys.executable, "-c", "import jax; jax.jit(lambda a: a + 1)(1.0).block_until_ready()"],
                   env=env, check=True, timeout=120)
    dumped = {line.split(": ")[1].strip() for path in tmp_path.glob("*.debug_options")
              for line in path.read_text().splitlines() if line.startswith("xla_gpu_enable_command_buffer:")}
    assert dumped | {"CUSTOM_CALL", "COLLECTIVES"} == set(GRAPHED.split(","))


@pytest.mark.server
def test_llm_kwarg_reaches_the_config_and_tp2_greedy_equals_tp1_either_way(tp_report):
    r = tp_report
    want = r["tp1"]["tokens"]
    golden = np.load(FIXTURE / "golden.npz")
    assert want == [golden[f"greedy_{i}"][:12].tolist() for i in (0, 1)]  # TP = 1 is Hugging Face's output
    for name in ("tp2", "tp2_disabled"):
        assert r[name]["tokens"] == want, (name, r[name])
    assert [r[n]["disabled"] for n in ("tp2", "tp2_disabled")] == [False, True]
    assert r["tp2"]["options"] == r["tp2_disabled"]["options"] == {}  # CPU: no GPU options either way


@pytest.mark.server
def test_the_model_step_is_compiled_with_these_options(tp_report):
    entry = tp_report["tp2_rejected_option"]
    assert "tokens" not in entry and "not a valid enum value" in entry["error"], entry
