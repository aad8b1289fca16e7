"""A lazy tensor source over one `*.safetensors` file or a sharded set (with `model.safetensors.index.json`).

The format is an 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}, then raw
row-major data. We memory-map each file and slice it, so `read(name, index)` touches only the pages of the requested
shard. Why not `safe_open(framework="numpy").get_slice`: numpy's framework raises on BF16 ("data type 'bfloat16' not
understood", safetensors 0.8), and bf16 is the common checkpoint dtype; `ml_dtypes` gives numpy a bfloat16 to view.
"""

import json
import os
import struct

import ml_dtypes
import numpy as np

INDEX_FILE = "model.safetensors.index.json"

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


def _read_header(path: str) -> tuple[int, dict]:
    """(offset of the data section, {name: entry}) without reading any tensor data."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return 8 + length, header


class SafetensorsSource:
    """Tensor source protocol: keys(), shape(name), dtype(name), read(name, index=None)."""

    def __init__(self, files: list[str]):
        if not files:
            raise FileNotFoundError("no .safetensors files given")
        self._entries: dict[str, tuple[str, int, dict]] = {}  # name -> (file, data offset, header entry)
        for path in files:
            data_start, header = _read_header(path)
            for name, entry in header.items():
                if name in self._entries:
                    raise ValueError(f"tensor {name!r} appears in both {self._entries[name][0]} and {path}")
                if entry["dtype"] not in _DTYPES:
                    raise ValueError(f"tensor {name!r} in {path} has unsupported dtype {entry['dtype']}")
                self._entries[name] = (path, data_start, entry)
        # Mapped once here, not on first read: the loader reads from several threads at once.
        self._maps = {path: np.memmap(path, dtype=np.uint8, mode="r") for path in files}

    @classmethod
    def from_dir(cls, model_dir: str) -> "SafetensorsSource":
        """Sharded checkpoints are read through their index; otherwise every *.safetensors file in the directory."""
        index = os.path.join(model_dir, INDEX_FILE)
        if os.path.isfile(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not os.path.isfile(os.path.join(model_dir, f))]
            if missing:
                raise FileNotFoundError(f"{INDEX_FILE} in {model_dir} names missing files: {missing}")
            source = cls([os.path.join(model_dir, f) for f in files])
            if set(weight_map) != set(source.keys()):
                diff = sorted(set(weight_map) ^ set(source.keys()))
                raise ValueError(f"{INDEX_FILE} and the shard files disagree on tensors: {diff[:10]}")
            return source
        files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
        if not files:
            raise FileNotFoundError(f"no .safetensors files in {model_dir}")
        return cls([os.path.join(model_dir, f) for f in files])

    def keys(self):
        return self._entries.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name][2]["shape"])

    def dtype(self, name: str) -> np.dtype:
        return np.dtype(_DTYPES[self._entries[name][2]["dtype"]])

    def read(self, name: str, index: tuple[slice, ...] | None = None) -> np.ndarray:
        """The tensor, or only `index` of it, as an owned numpy array in the checkpoint dtype."""
        path, data_start, entry = self._entries[name]
        begin, end = entry["data_offsets"]
        raw = self._maps[path][data_start + begin:data_start + end]
        tensor = raw.view(_DTYPES[entry["dtype"]]).reshape(entry["shape"])
        return np.array(tensor if index is None else tensor[index])
