"""The loading benchmark's checkpoint writer: what it writes must be what Hugging Face writes for the model."""

import json
import pathlib

import numpy as np
from safetensors import safe_open

from benchmarks.loading import write_checkpoint
from jaxllm.loading import load_model

LLAMA3 = pathlib.Path(__file__).parent / "fixtures" / "llama3"  # saved by transformers' save_pretrained


def _tensors(directory) -> dict[str, np.ndarray]:
    out = {}
    for path in sorted(pathlib.Path(directory).glob("*.safetensors")):
        with safe_open(path, framework="flax") as f:
            out |= {name: np.asarray(f.get_tensor(name), np.float32) for name in f.keys()}
    return out


def test_written_checkpoint_has_hugging_faces_names_and_shapes_in_shards_and_loads(tmp_path):
    written = write_checkpoint(str(LLAMA3), str(tmp_path / "ckpt"), shard_bytes=100_000)
    ours, theirs = _tensors(tmp_path / "ckpt"), _tensors(LLAMA3)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    assert written == sum(v.size for v in ours.values()) * 2  # bf16
    index = json.loads((tmp_path / "ckpt" / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in (tmp_path / "ckpt").glob("*.safetensors"))
    assert len(files) > 1 and sorted(set(index["weight_map"].values())) == files
    assert set(index["weight_map"]) == set(ours)
    weights = np.concatenate([v.ravel() for v in ours.values()])
    assert 0.015 < weights.std() < 0.025 and np.count_nonzero(weights) > 0.99 * weights.size
    _, params, _ = load_model(str(tmp_path / "ckpt"), dtype="float32")
    np.testing.assert_array_equal(params["embed"], ours["model.embed_tokens.weight"])
    assert (tmp_path / "ckpt" / "tokenizer.json").is_file()  # it serves too (benchmarks.startup)
