"""The GGUF container: metadata as Python values, tensors as views of one read-only memmap.

`gguf.GGUFReader` builds a numpy object per element of every metadata array, seconds of a model start for a large
vocabulary (docs/perf-notes.md#gguf-metadata-read-with-struct). This reads the same file (GGUF v2/v3, little-endian,
spec in llama.cpp's docs/gguf.md) with struct; dequantization still uses the gguf package.
"""

import dataclasses
import os
import struct
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

_MAGIC = b"GGUF"
_SCALARS = {  # GGUF value type -> struct format
    0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d",
}  # fmt: skip
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
          7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}  # fmt: skip
_STRING, _ARRAY = 8, 9
# Unquantized tensor types stored as plain numpy element types; the rest are byte blocks (one row per last dim).
_PLAIN = {
    GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16, GGMLQuantizationType.F64: np.float64,
    GGMLQuantizationType.I8: np.int8, GGMLQuantizationType.I16: np.int16, GGMLQuantizationType.I32: np.int32,
    GGMLQuantizationType.I64: np.int64,
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    tensor_type: GGMLQuantizationType
    shape: tuple[int, ...]  # ggml order: fastest-varying dimension first
    data: np.ndarray  # memmap view, numpy order; quantized: uint8 [..., rows, bytes per row]


class _Cursor:
    def __init__(self, buf: memoryview):
        self.buf, self.pos = buf, 0

    def scalar(self, fmt: str):
        (value,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.scalar("Q")
        value = bytes(self.buf[self.pos : self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return value

    def value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            item_type, count = self.scalar("I"), self.scalar("Q")
            if item_type in _NUMPY:  # numeric arrays in one go: token types are 49152 int32
                items = np.frombuffer(self.buf, _NUMPY[item_type], count, self.pos)
                self.pos += items.nbytes
                return items.tolist()
            return [self.value(item_type) for _ in range(count)]
        if vtype not in _SCALARS:
            raise ValueError(f"GGUF metadata value type {vtype} is unknown")
        return self.scalar(_SCALARS[vtype])


def read_gguf_file(path: str | os.PathLike) -> tuple[dict[str, Any], list[GGUFTensorInfo]]:
    data = np.memmap(path, dtype=np.uint8, mode="r")
    cur = _Cursor(memoryview(data))
    if bytes(data[:4]) != _MAGIC:
        raise ValueError(f"{os.fspath(path)!r} is not a GGUF file")
    cur.pos = 4
    version = cur.scalar("I")
    if version not in (2, 3):
        # A big-endian file shows its version byte-swapped (3 -> 0x03000000).
        raise ValueError(f"GGUF version {version} is not supported (little-endian v2/v3 only)")
    n_tensors, n_kv = cur.scalar("Q"), cur.scalar("Q")
    metadata = {}
    for _ in range(n_kv):
        key = cur.string()
        metadata[key] = cur.value(cur.scalar("I"))
    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        dims = tuple(cur.scalar("Q") for _ in range(cur.scalar("I")))
        infos.append((name, dims, GGMLQuantizationType(cur.scalar("I")), cur.scalar("Q")))
    alignment = int(metadata.get("general.alignment", 32))
    start = -(-cur.pos // alignment) * alignment
    return metadata, [_tensor(data, start + offset, name, dims, ttype) for name, dims, ttype, offset in infos]


def _tensor(data: np.memmap, offset: int, name: str, dims: tuple[int, ...], ttype) -> GGUFTensorInfo:
    block_size, type_size = GGML_QUANT_SIZES[ttype]
    np_shape = tuple(reversed(dims))
    n_bytes = int(np.prod(dims, dtype=np.int64)) * type_size // block_size
    raw = data[offset : offset + n_bytes]
    if ttype in _PLAIN:
        array = raw.view(_PLAIN[ttype]).reshape(np_shape)
    else:
        array = raw.reshape(*np_shape[:-1], np_shape[-1] // block_size * type_size)
    return GGUFTensorInfo(name, ttype, dims, array)
