"""`load_model`: the format of a model path decided (HF directory, GGUF file, dummies), its checks, and the build;
`load_tokenizer`: the tokenizer of the same path, taken from a GGUF checkpoint already read when there is one.

Pickled checkpoints (`.bin`, `.pt`, `.pth`) are never read: unpickling runs arbitrary code from the model directory.
jaxllm has no pickle reader at all, so `allow_pickle=True` changes only the error (it cannot make such a load work);
convert the checkpoint to safetensors instead.

Quantization: an HF directory's format is `detect_format(config.json, quantization)` (its quantization_config
checked against what the user asked for), a GGUF file's `gguf_quant_format` (its Q4_0 / Q4_1 / Q8_0 linears:
packed where the backend has the quantized kernel or `quantization="gguf"` asks, else dequantized once); None from
either loads dense, as an unquantized checkpoint. Dummy weights are quantized only when asked.
"""

import json
import logging
import os

from jaxllm.config import LOAD_FORMATS, quantization_method
from jaxllm.loading.dummy import dummy_params
from jaxllm.loading.loader import TensorSource, load_params, resolve_dtype
from jaxllm.loading.quantized import checkpoint_quants, dummy_quants
from jaxllm.loading.safetensors import SafetensorsSource
from jaxllm.model_config import ModelConfig
from jaxllm.models.fusion import fuse_params
from jaxllm.models.registry import build_model, get_model_class
from jaxllm.models.state import fill
from jaxllm.quantization.detect import detect_format
from jaxllm.quantization.gguf_format import gguf_quant_format
from jaxllm.quantization.linear_quant import QuantFormat
from jaxllm.sharding import make_mesh
from jaxllm.text.tokenizer import Tokenizer
from pallas_kernels.backend import TRITON, resolve_backend

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
logger = logging.getLogger(__name__)


def load_model(model, *, dtype: str = "auto", load_format: str = "auto",
               mesh=None, trust_remote_code: bool = False, allow_pickle: bool = False,
               kernel_backend: str = "auto", seed: int = 0, quantization: str | None = None):
    """-> (model, model_config): the model an nnx.Module whose state holds the loaded params, fused as it runs them
    (models/fusion.py), each placed with its sharding on `mesh`.

    `model`: an HF directory (config.json + safetensors), a `.gguf` file, a GGUF checkpoint already read with
    `read_gguf` (a caller that also needs its tokenizer reads the file once), or (dummy only) a ModelConfig.
    `load_format`: auto | safetensors | gguf | dummy (random weights made on the devices, for benchmarks).
    `quantization`: None (the checkpoint's) or a method of jaxllm.config.QUANTIZATION_METHODS (or an alias); one the
    checkpoint does not hold is a ValueError naming both; with dummy weights, the method they are quantized with.
    `model.quantization` is then the name of the format loaded (None: dense).
    """
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format {load_format!r} is not supported; choose one of {LOAD_FORMATS}")
    mesh = make_mesh(1) if mesh is None else mesh
    quantization_method(quantization)  # a ValueError for an unknown name, before anything is read
    if isinstance(model, ModelConfig):
        if load_format != "dummy":
            raise ValueError("a ModelConfig carries no weights: pass load_format='dummy' or a model path")
        return _dummy(model, dtype, mesh, kernel_backend, seed, quantization)
    gguf_options = dict(load_format=load_format, dtype=dtype, mesh=mesh, trust_remote_code=trust_remote_code,
                        kernel_backend=kernel_backend, seed=seed, quantization=quantization)
    if not isinstance(model, (str, os.PathLike)):
        return _from_gguf(model, **gguf_options)
    path = os.fspath(model)
    is_gguf = is_gguf_file(path)
    if load_format == "gguf" or (is_gguf and load_format in ("auto", "dummy")):
        return _from_gguf(read_gguf_file(path), **gguf_options)
    if not os.path.isdir(path):
        hint = "; it is a GGUF file: use load_format 'auto' or 'gguf'" if is_gguf else ""
        raise FileNotFoundError(f"model {path!r} is not a model directory (config.json + safetensors){hint}")
    config = ModelConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    if load_format == "dummy":
        return _dummy(config, dtype, mesh, kernel_backend, seed, quantization)
    files = os.listdir(path)
    if not any(f.endswith(".safetensors") for f in files):
        pickles = sorted(f for f in files if f.endswith(_PICKLE_SUFFIXES))
        if pickles and not allow_pickle:
            raise ValueError(f"{path} holds only pickled weights {pickles[:3]}; jaxllm refuses to unpickle files "
                             f"(it can run arbitrary code). Convert them to safetensors.")
        if pickles:
            raise NotImplementedError(f"allow_pickle=True, but jaxllm has no pickle reader by design; convert "
                                      f"{pickles[:3]} to safetensors")
        raise FileNotFoundError(f"no .safetensors weights in {path}")
    with open(os.path.join(path, "config.json")) as f:
        quant_format = detect_format(json.load(f), quantization)
    return load_checkpoint(config, SafetensorsSource.from_dir(path), dtype=dtype, mesh=mesh,
                           kernel_backend=kernel_backend, quant_format=quant_format)


def load_checkpoint(config: ModelConfig, source: TensorSource, *, dtype: str = "auto", mesh=None,
                    kernel_backend: str = "auto", quant_format: QuantFormat | None = None):
    """Any tensor source with HF names + its config -> (model, model_config), the linears `quant_format` (None:
    every one dense) stores quantized read through it. GGUF callers that also need the file's tokenizer read the
    file once and come here."""
    mesh = make_mesh(1) if mesh is None else mesh
    quants = {} if quant_format is None else checkpoint_quants(get_model_class(config.architecture), config,
                                                               quant_format)
    model = build_model(config, dtype=resolve_dtype(dtype, config, source), mesh=mesh, kernel_backend=kernel_backend,
                        quants=quants, quantization=None if quant_format is None else quant_format.name)
    return _filled(model, load_params(source, model, mesh=mesh, quant_format=quant_format), mesh), config


def load_tokenizer(model, tokenizer: str | os.PathLike | None = None) -> Tokenizer:
    """`tokenizer` (an HF directory or a .gguf file) if given, else `model`'s own: a path, or a GGUF checkpoint
    already read with `read_gguf`, whose tokenizer comes from the metadata in hand (the file is not read again)."""
    source = model if tokenizer is None else tokenizer
    if isinstance(source, (str, os.PathLike)):
        if not is_gguf_file(os.fspath(source)):
            return Tokenizer.from_pretrained(source)
        source = read_gguf_file(os.fspath(source))
    return Tokenizer.from_gguf(source)


def is_gguf_file(path: str) -> bool:
    return path.endswith(".gguf") and os.path.isfile(path)


def read_gguf_file(path: str):
    """The file's GGUFCheckpoint (weights and tokenizer); the gguf package is only needed for GGUF files."""
    from jaxllm.loading.gguf import read_gguf

    return read_gguf(path)


def _from_gguf(checkpoint, *, load_format: str, dtype: str, mesh, trust_remote_code: bool, kernel_backend: str,
               seed: int, quantization: str | None):
    if quantization_method(quantization) not in (None, "gguf"):
        raise ValueError(f"quantization {quantization!r} was asked for, but {checkpoint.path} is a GGUF file "
                         f"(quantization 'gguf')")
    config = ModelConfig.from_hf(checkpoint.hf_config, trust_remote_code=trust_remote_code)
    if load_format == "dummy":
        return _dummy(config, dtype, mesh, kernel_backend, seed, quantization)
    quant_format = gguf_quant_format(checkpoint)
    if quant_format is not None and quantization is None and resolve_backend(kernel_backend) != TRITON:
        # No quantized kernel on this backend: its jnp path would dequantize every weight in every step (0.72x the
        # default model's output tokens/s on CPU: benchmarks/RESULTS.md), so the file is dequantized once, unless
        # -q gguf asks for it packed.
        logger.info("%s: GGUF linears dequantized on load (backend %s has no quantized kernel; -q gguf keeps "
                    "them packed)", checkpoint.path, resolve_backend(kernel_backend))
        quant_format = None
    return load_checkpoint(config, checkpoint.tensors, dtype=dtype, mesh=mesh, kernel_backend=kernel_backend,
                           quant_format=quant_format)


def _dummy(config: ModelConfig, dtype: str, mesh, kernel_backend: str, seed: int, quantization: str | None):
    quants = {} if quantization is None else dummy_quants(get_model_class(config.architecture), config, quantization)
    model = build_model(config, dtype=resolve_dtype(dtype, config), mesh=mesh, kernel_backend=kernel_backend,
                        quants=quants, quantization=quantization_method(quantization))
    return _filled(model, dummy_params(model, mesh=mesh, seed=seed), mesh), config


def _filled(model, params: dict, mesh):
    """The abstract `model` with its state set from checkpoint-layout `params` (consumed), fused."""
    return fill(model, fuse_params(params, model.fused_projections, model.config, mesh))
