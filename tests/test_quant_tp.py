"""A quantized model under tensor parallelism on 4 CPU devices: TP = 2 and 4 generate the TP = 1 greedy tokens, the
packed words, scales and zeros are split as their dense weights (column-parallel along N, row-parallel along K in
whole groups; a quantized head along the vocabulary), and a row-parallel layer whose groups do not divide over tp is
a ValueError naming it. With the "triton" backend the quantized linears run pallas_kernels.quant_matmul_sharded,
here in the Pallas interpreter, column- or row-parallel as each layer is. Runs in a child process with 4 devices,
as tests/test_tensor_parallel.py does."""

import json
import subprocess
import sys

import pytest

from test_tensor_parallel import FIXTURES, ROOT, four_cpu_devices

CHILD = r"""
import json, sys
sys.path.insert(0, sys.argv[2])
import jax, numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from jaxllm import LLM, SamplingParams
from jaxllm.loading import model_loader
from jaxllm.models import quant_linear
from jaxllm.quantization.linear_quant import LinearQuant
from quant_double import fixture_tensors, quantize_fixture, quantize_int

fixture, plan_name, triton = sys.argv[1], sys.argv[3], sys.argv[5] == "triton"
assert jax.device_count() == 4, jax.devices()
plans = {
    # act-ordered int4 q/k/v, int8 per-channel o_proj, int4 g32 gate/up and down
    "mixed": lambda layer, m: ("int", 8, -1, False) if m == "self_attn.o_proj" else ("int", 4, 32,
                                                                                     m.startswith("self_attn")),
    # down_proj K = 128 in groups of 64: 2 groups, which 4 devices cannot split
    "coarse": lambda layer, m: ("int", 4, 64, False) if m == "mlp.down_proj" else None,
}
quant_format, _ = quantize_fixture(fixture, plans[plan_name])
if plan_name == "mixed":  # the untied head int4 in groups of 32
    quant_format.quants["lm_head"] = LinearQuant("int", 4, 32)
    quant_format.arrays["lm_head"], _ = quantize_int(fixture_tensors(fixture)["lm_head.weight"].T, 4, 32, None)
calls = []
if triton:
    # The quantized linears resolve their backend to "triton" (a GPU's "auto"); the sharded kernel runs in the
    # Pallas interpreter, and each call records its parallel kind, the shapes and (when eager) the shardings.
    sharded = quant_linear.quant_matmul_sharded

    def recording(x, qweight, scales, zeros, **knobs):
        spec = (lambda a: list(a.sharding.spec) if isinstance(a, jax.Array) and hasattr(a, "sharding")
                and not isinstance(a, jax.core.Tracer) else None)
        calls.append({"parallel": knobs["parallel"], "kn": [x.shape[1], qweight.shape[1]],
                      "specs": [spec(a) for a in (x, qweight, scales, zeros)]})
        return sharded(x, qweight, scales, zeros, interpret=True, **knobs)

    quant_linear.quant_matmul_sharded = recording
    quant_linear.resolve_backend = lambda backend: "triton"
model_loader.detect_format = lambda hf_config, requested: quant_format
golden = np.load(f"{fixture}/golden.npz")
requests = [{"prompt_token_ids": golden[f"prompt_{i}"].tolist()} for i in (0, 2)]
greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
report = {}
for tp in json.loads(sys.argv[4]):
    try:
        llm = LLM(model=fixture, dtype="float32", enforce_eager=True, max_model_len=256, max_num_seqs=8,
                  kv_cache_memory_bytes=1 << 22, max_num_batched_tokens=32, tensor_parallel_size=tp)
    except ValueError as e:
        report[tp] = {"error": str(e)}
        continue
    tokens = [list(o.outputs[0].token_ids) for o in llm.generate(requests, greedy, use_tqdm=False)]
    params = {name: {"spec": list(leaf.sharding.spec), "shard_shapes": sorted({tuple(s.data.shape)
                                                                             for s in leaf.addressable_shards})}
              for name, leaf in llm.llm_engine.runner.params.items() if name.startswith(("layers.0.", "lm_head."))}
    report[tp] = {"tokens": tokens, "params": params, "calls": calls[:]}
    if triton and tp > 1:
        # Each quantized linear once more, eagerly on x as the step gives it (replicated for a column-parallel
        # layer, split along K for a row-parallel one): the arrays reach the kernel with their shardings, and its
        # output is the jnp expression's.
        del calls[:]
        mesh = llm.model.mesh
        for path, node in jax.tree_util.tree_leaves(
                [(p, n) for p, n in nnx.iter_graph(llm.model) if isinstance(n, quant_linear.QuantLinear)],
                is_leaf=lambda t: isinstance(t, tuple)):
            k = node.perm.shape[0] if node.perm is not None else node.qweight.shape[0] * 32 // node.quant.bits
            x = jax.random.normal(jax.random.key(len(calls)), (3, k))
            x = jax.device_put(x, NamedSharding(mesh, P(None, "tp") if node.parallel == "row" else P()))
            np.testing.assert_allclose(np.asarray(node(x)), np.asarray(node(x, kernel=False)), rtol=2e-5,
                                       atol=2e-5)
            calls[-1]["path"] = ".".join(map(str, path))
        report[tp]["eager"] = calls[:]
    del calls[:]
    llm.close()
print("REPORT" + json.dumps(report))
"""


def run_child(plan: str, tps: list[int], backend: str = "reference") -> dict:
    child = subprocess.run([sys.executable, "-c", CHILD, str(FIXTURES / "llama3"), str(ROOT / "tests"), plan,
                            json.dumps(tps), backend], env=four_cpu_devices(), cwd=ROOT, capture_output=True,
                           text=True, timeout=400)
    assert child.returncode == 0, child.stdout[-3000:] + child.stderr[-6000:]
    line = next(line for line in child.stdout.splitlines() if line.startswith("REPORT"))
    return {int(tp): r for tp, r in json.loads(line[len("REPORT"):]).items()}


def spec_of(entry: dict) -> list:
    spec = list(entry["spec"])
    while spec and spec[-1] is None:
        spec.pop()
    return spec


@pytest.mark.server
def test_quantized_tp_greedy_equals_tp1_with_packed_arrays_sharded_as_their_weights():
    report = run_child("mixed", [1, 2, 4])
    assert len(report[1]["tokens"]) == 2 and all(len(t) == 16 for t in report[1]["tokens"])
    for tp in (2, 4):
        r = report[tp]
        assert r["tokens"] == report[1]["tokens"], (tp, r["tokens"], report[1]["tokens"])
        p = r["params"]
        # llama3: D 64, 4 q-heads and 2 kv-heads of 64 (replicated to one slot per device at tp 4), F 128
        width = (256 + 2 * max(2, tp) * 64) // tp
        expect = {
            "attn.qkv_proj.qweight": ([None, "tp"], [8, 1, width]),  # column-parallel: along N
            "attn.qkv_proj.scales": ([None, "tp"], [2, 1, width]),
            "attn.qkv_proj.zeros": ([None, "tp"], [2, 1, width]),
            "attn.qkv_proj.perm": ([], [64]),
            "attn.o_proj.qweight": (["tp"], [64 // tp, 64]),  # row-parallel int8: K / 4 words along K
            "attn.o_proj.scales": ([], [1, 64]),  # per-channel: replicated
            "mlp.gate_up_proj.qweight": ([None, "tp"], [8, 1, 256 // tp]),
            "mlp.down_proj.qweight": (["tp"], [16 // tp, 64]),  # row-parallel int4 g32: 4 groups of K = 128
            "mlp.down_proj.scales": (["tp"], [4 // tp, 64]),
            "mlp.down_proj.zeros": (["tp"], [4 // tp, 64]),
            # the head D 64 -> V 512, int4 g32: vocab-parallel as the dense head
            "lm_head.weight.qweight": ([None, "tp"], [8, 512 // tp]),
            "lm_head.weight.scales": ([None, "tp"], [2, 512 // tp]),
            "lm_head.weight.zeros": ([None, "tp"], [2, 512 // tp]),
        }
        for name, (spec, shard) in expect.items():
            entry = p[name if name.startswith("lm_head") else f"layers.0.{name}"]
            assert spec_of(entry) == spec and entry["shard_shapes"] == [shard], (tp, name, entry)
        assert not r["calls"]  # the reference backend: GSPMD partitions the jnp expression


@pytest.mark.server
def test_quantized_tp_on_triton_runs_the_sharded_kernel_column_or_row_parallel():
    report = run_child("mixed", [1, 2], backend="triton")
    assert not report[1]["calls"]  # one device: the unsharded entry
    r = report[2]
    assert r["tokens"] == report[1]["tokens"], (r["tokens"], report[1]["tokens"])
    # traced once per layer graph and step shape: every (K, N) of the model, each with its kind
    kinds = {(c["parallel"], *c["kn"]) for c in r["calls"]}
    assert kinds == {("column", 64, 512), ("row", 256, 64), ("column", 64, 256), ("row", 128, 64)}, kinds
    eager = {c["path"]: c | {"specs": [spec_of({"spec": spec}) for spec in c["specs"]]} for c in r["eager"]}
    column, split_k = [[], [None, "tp"], [None, "tp"], [None, "tp"]], [[None, "tp"], ["tp"], ["tp"], ["tp"]]
    for i in range(2):  # x, qweight, scales, zeros as they reach the kernel
        assert eager[f"layers.{i}.attn.qkv_proj"]["specs"] == column
        assert eager[f"layers.{i}.mlp.gate_up_proj"]["specs"] == column
        assert eager[f"layers.{i}.attn.o_proj"]["specs"] == [[None, "tp"], ["tp"], [], []]  # per-channel scales
        assert eager[f"layers.{i}.mlp.down_proj"]["specs"] == split_k
    assert eager["lm_head.weight"]["specs"] == column and eager["lm_head.weight"]["parallel"] == "column"
    assert len(eager) == 9


@pytest.mark.server
def test_row_parallel_groups_that_do_not_divide_over_tp_are_an_error_naming_the_layer():
    report = run_child("coarse", [2, 4])
    assert "tokens" in report[2]  # 2 groups split over 2 devices
    assert report[4]["error"].startswith("layers.0.mlp.down_proj: its 2 groups of scales along the input features "
                                         "do not divide over tensor_parallel_size (4)"), report[4]
