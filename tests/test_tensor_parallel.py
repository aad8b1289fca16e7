"""Tensor parallelism on 4 CPU devices: for every fixture family, greedy fp32 outputs of LLM.generate at TP = 2 and 4
equal TP = 1 (and Hugging Face's), the params and KV cache are really split (specs, per-device shard bytes), the
compiled step communicates activations and logits only, and heads that do not divide raise vLLM's errors.

The device count is fixed when jax starts, and this process already has jax with one device: the TP runs happen in
a child process started with XLA_FLAGS=--xla_force_host_platform_device_count=4, which reports JSON.
"""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxllm import EngineConfig
from jaxllm.sharding import check_tensor_parallel, kv_cache_heads, make_mesh

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
FOUR_DEVICES = "--xla_force_host_platform_device_count=4"
PROMPTS = (0, 2)  # random ids; prompt 2 is 40 tokens, 5x mistral's sliding window
MAX_TOKENS = 32

CHILD = r"""
import json, re, sys
import jax, numpy as np
from jaxllm import LLM, SamplingParams
from jaxllm.runtime.buckets import BatchLayout

fixture, prompts, max_tokens = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
assert jax.device_count() == 4, jax.devices()
golden = np.load(f"{fixture}/golden.npz")
requests = [{"prompt_token_ids": golden[f"prompt_{i}"].tolist()} for i in prompts]
greedy = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
report = {}
for tp in (1, 2, 4, 8):
    try:
        llm = LLM(model=fixture, dtype="float32", enforce_eager=True, max_model_len=256, max_num_seqs=8,
                  kv_cache_memory_bytes=1 << 22, tensor_parallel_size=tp)
    except ValueError as e:
        report[tp] = {"error": str(e)}
        continue
    runner = llm.llm_engine.runner
    pointers = lambda: [s.data.unsafe_buffer_pointer() for s in runner.kv_cache.k[0].addressable_shards]
    before = pointers()
    tokens = [list(o.outputs[0].token_ids) for o in llm.generate(requests, greedy, use_tqdm=False)]
    in_place = pointers() == before  # the donated, sharded cache was updated where it lives, never copied
    params = {}
    for name, leaf in runner.params.items():
        shards = leaf.addressable_shards
        params[name] = {"spec": [a for a in leaf.sharding.spec], "nbytes": leaf.nbytes,
                        "devices": sorted(s.device.id for s in shards),
                        "shard_nbytes": sorted({s.data.nbytes for s in shards}),
                        "shard_shapes": sorted({tuple(s.data.shape) for s in shards})}
    k0 = runner.kv_cache.k[0]
    kv = {"shape": list(k0.shape), "spec": [a for a in k0.sharding.spec], "nbytes": k0.nbytes,
          "shard_shapes": sorted({tuple(s.data.shape) for s in k0.addressable_shards}),
          "shard_nbytes": sorted({s.data.nbytes for s in k0.addressable_shards}),
          "devices": sorted(s.device.id for s in k0.addressable_shards)}
    layout = BatchLayout(16, 8, 16, False)
    hlo = runner.lower_step(layout).compile().as_text()
    collectives = re.findall(r"= (\S+) (all-reduce|all-gather|reduce-scatter|collective-permute|all-to-all)"
                             r"(?:-start)?\(", hlo)
    report[tp] = {"tokens": tokens, "params": params, "kv": kv, "collectives": collectives, "in_place": in_place}
    llm.close()
print("REPORT" + json.dumps(report))
"""


def spec_of(entry: dict) -> list:
    """A PartitionSpec as a list, trailing Nones dropped (P("tp") and P("tp", None) are the same layout)."""
    spec = list(entry["spec"])
    while spec and spec[-1] is None:
        spec.pop()
    return spec


def four_cpu_devices() -> dict:
    """A child process's environment: jax on 4 CPU devices, importing this checkout."""
    return dict(os.environ, XLA_FLAGS=FOUR_DEVICES, JAX_PLATFORMS="cpu",
                PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")


def run_child(fixture: str) -> dict:
    child = subprocess.run([sys.executable, "-c", CHILD, str(FIXTURES / fixture), json.dumps(PROMPTS),
                            str(MAX_TOKENS)], env=four_cpu_devices(), cwd=ROOT, capture_output=True, text=True,
                           timeout=400)
    assert child.returncode == 0, child.stdout[-3000:] + child.stderr[-6000:]
    line = next(line for line in child.stdout.splitlines() if line.startswith("REPORT"))
    return {int(tp): r for tp, r in json.loads(line[len("REPORT"):]).items()}


def heads(fixture: str) -> tuple[int, int, int]:
    config = json.loads((FIXTURES / fixture / "config.json").read_text())
    n, k = config["num_attention_heads"], config["num_key_value_heads"]
    return n, k, config.get("head_dim") or config["hidden_size"] // n


@pytest.mark.server
@pytest.mark.parametrize("fixture", ["llama3", "llama2", "mistral", "qwen2", "qwen3"])
def test_tp_greedy_equals_tp1_and_weights_and_kv_are_sharded(fixture):
    report = run_child(fixture)
    n, k, h = heads(fixture)
    golden = np.load(FIXTURES / fixture / "golden.npz")
    want = [golden[f"greedy_{i}"][:MAX_TOKENS].tolist() for i in PROMPTS]
    assert report[1]["tokens"] == want  # TP = 1 reproduces Hugging Face, so equality below is against both
    config = json.loads((FIXTURES / fixture / "config.json").read_text())
    d, f, v, layers = (config["hidden_size"], config["intermediate_size"], config["vocab_size"],
                       config["num_hidden_layers"])

    assert "tensor_parallel_size (8) is larger than the number of available CPU devices (4)" in report[8]["error"]
    for tp in (2, 4):
        r = report[tp]
        if n % tp:  # vLLM's rule: q-heads must divide; the error names both numbers
            assert r["error"] == (f"the model's number of attention heads ({n}) must be divisible by "
                                  f"tensor_parallel_size ({tp})"), r
            continue
        assert r["tokens"] == report[1]["tokens"], (tp, r["tokens"], report[1]["tokens"])

        params = r["params"]
        expect = {  # param -> (spec, shard shape on every device)
            "embed.weight": (["tp"], [v // tp, d]),
            # fused q/k/v: a device's q-heads, then its kv-heads, split while they divide; with fewer kv-heads
            # than devices, the one kv-head its q-heads use (vLLM replicates those)
            "layers.0.attn.qkv_proj": ([None, "tp"], [d, 1, (n * h + 2 * kv_cache_heads(k, tp) * h) // tp]),
            "layers.0.attn.o_proj": (["tp"], [n * h // tp, d]),
            "layers.0.mlp.gate_up_proj": ([None, "tp"], [d, 1, 2 * f // tp]),
            "layers.0.mlp.down_proj": (["tp"], [f // tp, d]),
            "layers.0.input_norm.weight": ([], [d]),
        }
        if "lm_head.weight" in params:
            expect["lm_head.weight"] = ([None, "tp"], [d, v // tp])
        for name, (spec, shard_shape) in expect.items():
            p = params[name]
            assert spec_of(p) == spec, (tp, name, p)
            assert p["shard_shapes"] == [shard_shape] and len(p["devices"]) == tp, (tp, name, p)
        for name, p in params.items():  # every param: a device holds exactly its share of the bytes
            split = tp if "tp" in p["spec"] else 1
            assert p["shard_nbytes"] == [p["nbytes"] // split], (tp, name, p)

        kv, slots = r["kv"], kv_cache_heads(k, tp)
        assert spec_of(kv) == ["tp"] and kv["shape"][0] == slots and len(kv["devices"]) == tp, kv
        assert kv["shard_shapes"] == [[slots // tp, *kv["shape"][1:]]], kv  # k // tp heads, or 1 replica
        assert kv["shard_nbytes"] == [kv["nbytes"] // tp], kv
        assert r["in_place"]
        # same per-device KV budget as TP = 1, so a device holds at least as many blocks per kv-head it serves
        assert kv["shape"][1] >= report[1]["kv"]["shape"][1] * min(k, tp) // k

        # Megatron communication and nothing else: one all-reduce of the [T, D] activations per attention and MLP
        # block (plus the vocab-parallel embedding), one all-gather of the [S, V] logits; never a weight.
        kinds = sorted({(op, shape.split("{")[0]) for shape, op in r["collectives"]})
        assert kinds == [("all-gather", f"f32[8,{v}]"), ("all-reduce", f"f32[16,{d}]")], kinds
        assert sum(op == "all-reduce" for _, op in r["collectives"]) == 2 * layers + 1, r["collectives"]


EMBED_CHILD = r"""
import json, re
import jax, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from jaxllm.models.layers import embed
from jaxllm.sharding import make_mesh, param_sharding

rng = np.random.default_rng(0)
report = {}
for tp, vocab in ((2, 64), (4, 64), (4, 62)):  # 62 rows do not split over 4: the table stays whole
    mesh = make_mesh(tp)
    table = rng.standard_normal((vocab, 8)).astype(np.float32)
    placed = jax.device_put(table, param_sharding("embed.weight", table.shape, mesh))
    rows = vocab // tp
    ids = np.array([0, rows - 1, rows, vocab - 1, 5, rows + 3, 0], np.int32)  # every slice's edges, a repeat
    lookup = jax.jit(lambda t, i: embed(t, i, mesh))
    out = np.asarray(lookup(placed, jax.device_put(ids, NamedSharding(mesh, P()))))
    lowered = lookup.lower(placed, ids[:1])  # one token: where XLA:GPU's partitioner gathered the whole table
    hlo = lowered.compile().as_text()
    report[f"{tp}x{vocab}"] = {"equal": bool((out == table[ids]).all()), "spec": list(placed.sharding.spec),
                               "collectives": re.findall(r"= (\S+) (all-reduce|all-gather)(?:-start)?\(", hlo),
                               "stablehlo": re.findall(r"stablehlo\.(all_reduce|all_gather)", lowered.as_text())}
print("REPORT" + json.dumps(report))
"""


@pytest.mark.server
def test_vocab_parallel_embedding_sums_each_devices_rows_with_one_small_all_reduce():
    child = subprocess.run([sys.executable, "-c", EMBED_CHILD], env=four_cpu_devices(), cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, child.stderr[-4000:]
    report = json.loads(next(line for line in child.stdout.splitlines() if line.startswith("REPORT"))[6:])
    for case in ("2x64", "4x64"):  # split rows: a [1, 8] all-reduce, never the [64, 8] table gathered
        assert report[case]["equal"] and spec_of(report[case]) == ["tp"], report[case]
        # The program asks for the all-reduce itself (shard_map + psum) rather than leaving the gather to the
        # partitioner, whose choice differs by backend: CPU's sums rows too, XLA:GPU's gathered the table.
        assert report[case]["stablehlo"] == ["all_reduce"], report[case]
        assert [(op, shape.split("{")[0]) for shape, op in report[case]["collectives"]] == [
            ("all-reduce", "f32[1,8]")], report[case]
    whole = report["4x62"]
    assert whole["equal"] and spec_of(whole) == [] and whole["collectives"] == whole["stablehlo"] == [], whole


def test_head_rules_are_vllms_and_errors_name_both_numbers():
    check_tensor_parallel(32, 8, 8)
    check_tensor_parallel(32, 8, 4)
    check_tensor_parallel(64, 8, 16)  # 2 devices per kv-head
    check_tensor_parallel(4, 1, 4)
    with pytest.raises(ValueError, match=r"attention heads \(9\) must be divisible by tensor_parallel_size \(2\)"):
        check_tensor_parallel(9, 3, 2)  # SmolLM2-135M
    with pytest.raises(ValueError, match=r"kv heads \(6\) must be divisible by tensor_parallel_size \(4\)"):
        check_tensor_parallel(12, 6, 4)
    with pytest.raises(ValueError, match=r"tensor_parallel_size \(8\) must be a multiple of the model's number of "
                                         r"kv heads \(3\)"):
        check_tensor_parallel(24, 3, 8)
    assert [kv_cache_heads(k, tp) for k, tp in [(8, 4), (2, 4), (1, 2), (4, 4)]] == [8, 4, 2, 4]


def test_more_devices_than_present_is_a_clear_error():
    present = len(jax.devices())
    with pytest.raises(ValueError, match=rf"tensor_parallel_size \({present + 1}\) is larger than the number of "
                                         rf"available CPU devices \({present}\)"):
        make_mesh(present + 1)
    with pytest.raises(ValueError, match=r"tensor_parallel_size must be >= 1"):
        EngineConfig(tensor_parallel_size=0)


@pytest.mark.server
def test_server_with_tp2_serves_the_tp1_greedy_completion(monkeypatch):
    import httpx

    from server_harness import ServerProcess

    golden = np.load(FIXTURES / "llama3" / "golden.npz")
    prompt, want_ids = golden["prompt_1"].tolist(), golden["greedy_1"].tolist()  # TP = 1's tokens (test above)
    from jaxllm.text.tokenizer import Tokenizer

    want_text = Tokenizer.from_pretrained(str(FIXTURES / "llama3")).decode(want_ids)
    monkeypatch.setenv("XLA_FLAGS", FOUR_DEVICES)  # the harness passes this process's environment on
    server = ServerProcess("--model", str(FIXTURES / "llama3"), "--dtype", "float32", "--enforce-eager", "-tp", "2",
                           "--max-model-len", "256", "--kv-cache-memory-bytes", str(1 << 22))
    try:
        url = server.wait_ready(timeout=240)
        r = httpx.post(f"{url}/v1/completions", timeout=120, json={
            "model": str(FIXTURES / "llama3"), "prompt": prompt, "max_tokens": len(want_ids), "temperature": 0,
            "ignore_eos": True})
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["text"] == want_text and choice["finish_reason"] == "length"
        assert r.json()["usage"]["completion_tokens"] == len(want_ids)
    finally:
        server.stop()
