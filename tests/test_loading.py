"""Weight loading: name maps, sharded/fused/tied checkpoints, dtypes, refusals, errors, dummy weights, placement."""

import concurrent.futures
import json
import os
import pathlib
import shutil
import subprocess
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from safetensors import safe_open
from safetensors.numpy import save_file

from benchmarks import loading as loading_benchmark
from jaxllm.loading import SafetensorsSource, dummy_params, load_model
from jaxllm.model_config import ModelConfig
from jaxllm.models import build_model
from jaxllm.models.fusion import FusedProjection, create_parts_last
from jaxllm.models.state import state_dict
from jaxllm.sharding import make_mesh, param_spec

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
LLAMA3 = FIXTURES / "llama3"  # sharded in two files with an index
QWEN2 = FIXTURES / "qwen2"  # tied embeddings, q/k/v biases


def hf_tensors(directory) -> dict[str, np.ndarray]:
    """The checkpoint through safetensors' own reader (an independent oracle for ours), as float32."""
    out = {}
    for path in sorted(pathlib.Path(directory).glob("*.safetensors")):
        with safe_open(path, framework="flax") as f:
            out |= {k: np.asarray(f.get_tensor(k), np.float32) for k in f.keys()}
    return out


def write_checkpoint(directory, tensors: dict[str, np.ndarray], config: dict) -> pathlib.Path:
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(directory / "model.safetensors"))
    return directory


def fixture_config(directory) -> dict:
    return json.loads((pathlib.Path(directory) / "config.json").read_text())


def test_sharded_checkpoint_fills_every_param_exactly():
    model, config = load_model(LLAMA3, dtype="float32")
    params = state_dict(model)
    ref = hf_tensors(LLAMA3)
    np.testing.assert_array_equal(params["embed.weight"], ref["model.embed_tokens.weight"])
    np.testing.assert_array_equal(params["lm_head.weight"], ref["lm_head.weight"].T)
    np.testing.assert_array_equal(params["final_norm.weight"], ref["model.norm.weight"])
    for i in range(config.num_layers):
        layer, pre = model.layers[i], f"model.layers.{i}."

        def hf(name, pre=pre):
            return ref[pre + name + ".weight"].T  # [in, out]

        # One device: the fused projections are the checkpoint's columns side by side, in one shard.
        qkv = np.concatenate([hf("self_attn.q_proj"), hf("self_attn.k_proj"), hf("self_attn.v_proj")], axis=1)
        np.testing.assert_array_equal(layer.attn.qkv_proj[...], qkv[:, None, :])
        np.testing.assert_array_equal(layer.mlp.gate_up_proj[...],
                                      np.concatenate([hf("mlp.gate_proj"), hf("mlp.up_proj")], axis=1)[:, None, :])
        np.testing.assert_array_equal(layer.attn.o_proj[...], hf("self_attn.o_proj"))
        np.testing.assert_array_equal(layer.mlp.down_proj[...], hf("mlp.down_proj"))
        np.testing.assert_array_equal(layer.input_norm.weight[...], ref[pre + "input_layernorm.weight"])
        np.testing.assert_array_equal(layer.post_norm.weight[...], ref[pre + "post_attention_layernorm.weight"])
    assert len(params) == len(ref) - 3 * config.num_layers  # q/k/v -> 1, gate/up -> 1


def test_index_disagreeing_with_shards_is_an_error(tmp_path):
    shutil.copytree(LLAMA3, tmp_path / "m")
    index = json.loads((tmp_path / "m/model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.0.mlp.extra.weight"] = "model-00001-of-00002.safetensors"
    (tmp_path / "m/model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="model.layers.0.mlp.extra.weight"):
        load_model(tmp_path / "m")


def test_tied_embeddings_have_no_lm_head_and_a_stray_copy_is_skipped(tmp_path):
    model, config = load_model(QWEN2, dtype="float32")
    assert config.tie_word_embeddings and model.lm_head is None and "lm_head.weight" not in state_dict(model)
    ref = hf_tensors(QWEN2)
    bias = np.concatenate([ref[f"model.layers.1.self_attn.{p}_proj.bias"] for p in "qkv"])
    np.testing.assert_array_equal(model.layers[1].attn.qkv_bias[...], bias[None, :])
    ref["lm_head.weight"] = ref["model.embed_tokens.weight"]  # some tied checkpoints store the copy anyway
    again, _ = load_model(write_checkpoint(tmp_path / "m", ref, fixture_config(QWEN2)), dtype="float32")
    assert "lm_head.weight" not in state_dict(again)


def test_dtype_auto_and_conversions(tmp_path):
    assert load_model(LLAMA3)[0].embed.weight.dtype == jnp.bfloat16  # config.json: torch_dtype bfloat16
    ref = hf_tensors(LLAMA3)
    half = load_model(LLAMA3, dtype="float16")[0].layers[0].attn.qkv_proj[...]
    q = ref["model.layers.0.self_attn.q_proj.weight"].T.astype(np.float16)
    assert half.dtype == jnp.float16
    np.testing.assert_array_equal(half[:, 0, :q.shape[1]], q)
    # A float32 checkpoint stays float32 under auto, whether config.json says so or only the tensors do.
    rng = np.random.default_rng(0)
    fp32 = {k: (v + rng.normal(0, 1e-3, v.shape)).astype(np.float32) for k, v in ref.items()}
    for dtype_key in ({"torch_dtype": "float32"}, {}):
        config = {k: v for k, v in fixture_config(LLAMA3).items() if k not in ("torch_dtype", "dtype")} | dtype_key
        d = write_checkpoint(tmp_path / f"f32{len(dtype_key)}", fp32, config)
        embed = load_model(d)[0].embed.weight[...]
        assert embed.dtype == jnp.float32
        np.testing.assert_array_equal(embed, fp32["model.embed_tokens.weight"])
    with pytest.raises(ValueError, match="dtype 'int8'"):
        load_model(LLAMA3, dtype="int8")


def test_fused_qkv_and_gate_up_load_like_split_projections(tmp_path):
    ref = hf_tensors(LLAMA3)
    fused = dict(ref)
    for i in range(2):
        pre = f"model.layers.{i}."
        fused[pre + "self_attn.qkv_proj.weight"] = np.concatenate(
            [fused.pop(pre + f"self_attn.{p}_proj.weight") for p in "qkv"])
        fused[pre + "mlp.gate_up_proj.weight"] = np.concatenate(
            [fused.pop(pre + "mlp.gate_proj.weight"), fused.pop(pre + "mlp.up_proj.weight")])
    config = fixture_config(LLAMA3)
    got = state_dict(load_model(write_checkpoint(tmp_path / "fused", fused, config), dtype="float32")[0])
    want = state_dict(load_model(LLAMA3, dtype="float32")[0])
    assert got.keys() == want.keys()
    jax.tree.map(np.testing.assert_array_equal, got, want)


def test_refuses_pickles_without_unpickling(tmp_path):
    d = tmp_path / "pickled"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(fixture_config(LLAMA3)))
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(ValueError, match="refuses to unpickle"):
        load_model(d)
    with pytest.raises(NotImplementedError, match="no pickle reader"):
        load_model(d, allow_pickle=True)
    # Next to safetensors weights, pickles are simply ignored.
    save_file({k: v for k, v in hf_tensors(LLAMA3).items()}, str(d / "model.safetensors"))
    assert load_model(d)[1].architecture == "LlamaForCausalLM"


def test_auto_map_refused_and_never_imported(tmp_path):
    d = tmp_path / "remote"
    shutil.copytree(LLAMA3, d)
    sentinel = tmp_path / "imported"
    (d / "modeling_evil.py").write_text(f"open({str(sentinel)!r}, 'w').write('x')\n")
    config = fixture_config(d) | {"auto_map": {"AutoModelForCausalLM": "modeling_evil.Evil"}}
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="trust_remote_code"):
        load_model(d)
    assert load_model(d, trust_remote_code=True)[1].architecture == "LlamaForCausalLM"
    assert not sentinel.exists()


@pytest.mark.parametrize("edit, match", [
    (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"), r"layers\.1\.mlp\.up_proj \(e\.g\. model\.layers\.1\.mlp"),
    (lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": np.ones(256, np.float32)}),
     r"unexpected checkpoint tensor 'model\.layers\.0\.self_attn\.q_proj\.bias'"),
    (lambda t: t.update({"model.layers.2.mlp.up_proj.weight": np.ones((128, 64), np.float32)}),
     r"unexpected checkpoint tensor 'model\.layers\.2\.mlp\.up_proj\.weight'"),
    (lambda t: t.update({"vision_tower.proj.weight": np.ones(3, np.float32)}), r"'vision_tower\.proj\.weight'"),
    (lambda t: t.update({"model.norm.weight": np.ones(65, np.float32)}), r"'model\.norm\.weight' has shape \(65,\)"),
])
def test_missing_unexpected_and_misshapen_tensors_are_named(tmp_path, edit, match):
    tensors = hf_tensors(LLAMA3)
    edit(tensors)
    d = write_checkpoint(tmp_path / "m", tensors, fixture_config(LLAMA3))
    with pytest.raises(ValueError, match=match):
        load_model(d)


def test_derived_rotary_buffers_are_ignored(tmp_path):
    tensors = hf_tensors(LLAMA3) | {"model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(32, np.float32)}
    assert load_model(write_checkpoint(tmp_path / "m", tensors, fixture_config(LLAMA3)))[1].num_layers == 2


def test_safetensors_source_reads_only_the_requested_block():
    source = SafetensorsSource.from_dir(LLAMA3)
    name = "model.layers.1.self_attn.q_proj.weight"
    full = source.read(name)
    assert source.shape(name) == full.shape == (256, 64) and source.dtype(name) == jnp.bfloat16
    np.testing.assert_array_equal(source.read(name, (slice(64, 128), slice(8, 40))), full[64:128, 8:40])


def test_dummy_params_shapes_dtypes_and_determinism():
    config = ModelConfig.from_pretrained(QWEN2)
    model, _ = load_model(config, load_format="dummy", dtype="bfloat16", seed=3)
    d, q, kv, f = config.hidden_size, config.q_size, config.kv_size, config.intermediate_size
    for layer in model.layers:
        assert layer.attn.qkv_proj.shape == (d, 1, q + 2 * kv) and layer.attn.qkv_bias.shape == (1, q + 2 * kv)
        assert layer.mlp.gate_up_proj.shape == (d, 1, 2 * f)
    assert {leaf.dtype for leaf in state_dict(model).values()} == {jnp.dtype(jnp.bfloat16)}
    w = np.asarray(model.layers[0].attn.qkv_proj[...], np.float32)
    assert 0.01 < w.std() < 0.03 and np.all(np.isfinite(w))
    norm = np.asarray(model.layers[1].input_norm.weight[...], np.float32)
    assert abs(norm.mean() - 1) < 0.01 and norm.std() > 0
    again = dummy_params(model, seed=3)
    other = dummy_params(model, seed=4)
    np.testing.assert_array_equal(again["embed.weight"], model.embed.weight[...])
    assert not np.array_equal(other["embed.weight"], model.embed.weight[...])
    assert not np.array_equal(model.layers[0].attn.qkv_proj[...], model.layers[1].attn.qkv_proj[...])


def test_loaders_create_fusion_parts_last_and_dummy_values_do_not_depend_on_that_order():
    model = build_model(ModelConfig.from_pretrained(QWEN2))
    shapes = model.checkpoint_shapes()
    paths = list(shapes)
    order = []
    create_parts_last(paths, model.fused_projections, order.append)  # the calls' order
    parts = {part for fusion in model.fused_projections for part in fusion.parts}
    is_part = [paths[j].split(".", 2)[-1] in parts for j in order]
    assert sorted(order) == list(range(len(paths))) and any(is_part) and not all(is_part)
    assert is_part == sorted(is_part)  # every part after every other param
    first_part = is_part.index(True)
    assert order[:first_part] == sorted(order[:first_part]) and order[first_part:] == sorted(order[first_part:])
    # Each dummy param is drawn from fold_in(key(seed), its number in the layout), whatever order they are made in.
    params = dummy_params(model, seed=5)
    for path in ("embed.weight", "layers.1.attn.k_proj", "layers.0.mlp.down_proj"):
        j = paths.index(path)
        want = 0.02 * jax.random.normal(jax.random.fold_in(jax.random.key(5), j), shapes[path].shape)
        np.testing.assert_allclose(np.asarray(params[path]), np.asarray(want), rtol=1e-6, atol=1e-7)


def test_written_checkpoint_has_hugging_faces_names_and_shapes_in_shards_and_loads(tmp_path):
    """benchmarks/loading.py's checkpoint writer writes what Hugging Face's save_pretrained wrote for the model."""
    written = loading_benchmark.write_checkpoint(str(LLAMA3), str(tmp_path / "ckpt"), shard_bytes=100_000)
    ours, theirs = hf_tensors(tmp_path / "ckpt"), hf_tensors(LLAMA3)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    assert written == sum(v.size for v in ours.values()) * 2  # bf16
    index = json.loads((tmp_path / "ckpt" / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in (tmp_path / "ckpt").glob("*.safetensors"))
    assert len(files) > 1 and sorted(set(index["weight_map"].values())) == files
    assert set(index["weight_map"]) == set(ours)
    weights = np.concatenate([v.ravel() for v in ours.values()])
    assert 0.015 < weights.std() < 0.025 and np.count_nonzero(weights) > 0.99 * weights.size
    model, _ = load_model(str(tmp_path / "ckpt"), dtype="float32")
    np.testing.assert_array_equal(model.embed.weight[...], ours["model.embed_tokens.weight"])
    assert (tmp_path / "ckpt" / "tokenizer.json").is_file()  # it serves too (benchmarks.startup)


def test_params_made_concurrently_still_finish_every_other_param_before_the_first_fusion_part():
    """The loader places params from a thread pool; the parts (freed again by fusing) must still come after every
    other param, or their holes would lie between the weights (create_parts_last)."""
    paths = ["embed.weight", "layers.0.attn.q_proj", "layers.0.input_norm.weight", "layers.0.attn.k_proj",
             "final_norm.weight"]
    fusions = (FusedProjection("attn.qkv_proj", ("attn.q_proj", "attn.k_proj")),)
    events, lock = [], threading.Lock()

    def create(i: int) -> str:
        with lock:
            events.append(("start", paths[i]))
        if paths[i] == "embed.weight":
            threading.Event().wait(0.2)  # the slowest param: the parts must wait for it
        with lock:
            events.append(("end", paths[i]))
        return paths[i].upper()

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        made = create_parts_last(paths, fusions, create, map_fn=pool.map)
    assert made == [p.upper() for p in paths]
    ends = [k for k, (what, path) in enumerate(events) if what == "end" and "proj" not in path]
    part_starts = [k for k, (what, path) in enumerate(events) if what == "start" and "proj" in path]
    assert len(ends) == 3 and len(part_starts) == 2 and max(ends) < min(part_starts), events


def test_dummy_llama31_8b_shapes_without_allocating():
    hf = {"architectures": ["LlamaForCausalLM"], "vocab_size": 128256, "hidden_size": 4096,
          "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
          "rms_norm_eps": 1e-5, "max_position_embeddings": 131072, "torch_dtype": "bfloat16",
          "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
    model = build_model(ModelConfig.from_hf(hf), dtype=jnp.bfloat16)
    shapes = jax.eval_shape(lambda: dummy_params(model))
    assert sum(np.prod(s.shape) for s in jax.tree_util.tree_leaves(shapes)) == 8_030_261_248
    assert shapes["layers.31.attn.k_proj"].shape == (4096, 1024) and shapes["lm_head.weight"].dtype == jnp.bfloat16
    # The abstract model (no memory either) has the fused state of the same size.
    fused = jax.tree_util.tree_leaves(state_dict(model))
    assert sum(np.prod(s.shape) for s in fused) == 8_030_261_248 and len(fused) == 32 * 6 + 3


def test_params_placed_with_their_partition_specs_on_a_one_device_mesh():
    mesh = make_mesh(1)
    params = state_dict(load_model(QWEN2, mesh=mesh)[0])
    for path, leaf in params.items():
        assert isinstance(leaf.sharding, NamedSharding) and leaf.sharding.mesh == mesh
        want = NamedSharding(mesh, param_spec(path, leaf.shape, mesh))
        assert leaf.sharding.is_equivalent_to(want, leaf.ndim), (path, leaf.sharding)
    assert params["layers.0.attn.qkv_proj"].sharding.spec == jax.sharding.PartitionSpec(None, "tp", None)


SHARDED_CHECK = """
import sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import PartitionSpec as P
from jaxllm.kv_cache import AttentionMetadata, KVCache
from jaxllm.loading import SafetensorsSource, load_params
from jaxllm.models import build_model
from jaxllm.models.fusion import fuse_params
from jaxllm.models.state import fill
from jaxllm.model_config import ModelConfig
from jaxllm.sharding import kv_cache_heads, kv_sharding, make_mesh

fixture = sys.argv[1]
assert len(jax.devices()) == 4, jax.devices()
reads = []

class Recording(SafetensorsSource):
    def read(self, name, index=None):
        out = super().read(name, index)
        reads.append((name, out.shape))
        return out

mesh = make_mesh(4)
config = ModelConfig.from_pretrained(fixture)
model = build_model(config, dtype=jnp.float32, mesh=mesh)
params = load_params(Recording.from_dir(fixture), model, mesh=mesh)  # the checkpoint layout
reference = SafetensorsSource.from_dir(fixture)
for path, hf, spec, shard_shape in [
        ("layers.0.attn.q_proj", "model.layers.0.self_attn.q_proj.weight", P(None, "tp"), (64, 64)),
        ("layers.1.mlp.down_proj", "model.layers.1.mlp.down_proj.weight", P("tp", None), (32, 64)),
        ("embed.weight", "model.embed_tokens.weight", P("tp", None), (128, 64))]:
    leaf = params[path]
    assert leaf.sharding.spec == spec, (path, leaf.sharding.spec)
    full = reference.read(hf).astype(np.float32)
    full = full if path == "embed.weight" else full.T
    assert len(leaf.addressable_shards) == 4
    for shard in leaf.addressable_shards:
        assert shard.data.shape == shard_shape
        np.testing.assert_array_equal(np.asarray(shard.data), full[shard.index])
    # each device read only its own block from the file: no full copy per device
    assert {shape for name, shape in reads if name == hf} == {shard_shape[::-1] if path != "embed.weight" else
                                                            shard_shape}, reads

# Fused for the forward: device d's qkv_proj shard is its q-heads' columns, then its cache slot's kv-head's k and v.
h, n, k = config.head_dim, config.num_q_heads, config.num_kv_heads
slots = kv_cache_heads(k, 4)
def columns(name, heads, repeat):
    w = reference.read(f"model.layers.0.self_attn.{name}.weight").astype(np.float32).T.reshape(-1, heads, h)
    return np.repeat(w, repeat, axis=1).reshape(w.shape[0], 4, -1)  # [D, S, heads * repeat * H / S]
want = np.concatenate([columns("q_proj", n, 1), columns("k_proj", k, slots // k), columns("v_proj", k, slots // k)],
                      axis=-1)
model = fill(model, fuse_params(params, model.fused_projections, config, mesh))
qkv = model.layers[0].attn.qkv_proj[...]
assert qkv.sharding.spec == P(None, "tp", None), qkv.sharding
assert {shard.data.shape for shard in qkv.addressable_shards} == {(want.shape[0], 1, want.shape[2])}
np.testing.assert_array_equal(np.asarray(qkv), want)

golden = np.load(f"{fixture}/golden.npz")
prompt, want = golden["prompt_2"], golden["logits_2"]
t, block = len(prompt), 4
table = np.random.default_rng(0).permutation(np.arange(1, 16))[: -(-t // block)]
pos = np.arange(t)
cache = KVCache.create(num_layers=config.num_layers, num_blocks=16, block_size=block,
                       num_kv_heads=kv_cache_heads(config.num_kv_heads, 4), head_dim=config.head_dim,
                       dtype=jnp.float32, sharding=kv_sharding(mesh))
metadata = AttentionMetadata(
    positions=jnp.asarray(pos, jnp.int32),
    slot_mapping=jnp.asarray(table[pos // block] * block + pos % block, jnp.int32),
    block_tables=jnp.asarray(np.pad(table, (0, 15 - len(table)))[None], jnp.int32),
    seq_lens=jnp.asarray([t], jnp.int32), query_start_loc=jnp.asarray([0, t], jnp.int32))
_, logits = jax.jit(lambda m, c, t, md: m.step(c, t, md))(model, cache, jnp.asarray(prompt, jnp.int32), metadata)
dense = np.asarray(jax.jit(lambda m, ids: m(ids))(model, jnp.asarray(prompt, jnp.int32)[None]))[0]
dense_err = np.linalg.norm(dense - want) / np.linalg.norm(want)
assert dense_err <= 1e-4, dense_err
err = np.linalg.norm(np.asarray(logits) - want) / np.linalg.norm(want)
assert err <= 1e-4, err
print("OK", err)
"""


@pytest.mark.server
def test_params_sharded_over_four_cpu_devices():
    """Placement, per-device reads and a tensor-parallel forward on 4 CPU devices. A subprocess, because the device
    count is fixed when jax starts (XLA_FLAGS must be set before the import)."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", SHARDED_CHECK, str(LLAMA3)], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout
