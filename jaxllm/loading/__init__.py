"""Weight loading: `load_model(path)` -> (model, model_config) from an HF directory, a GGUF file or dummies;
`load_tokenizer(path)` -> its Tokenizer.

The logic is in model_loader.py (formats and checks), loader.py (the name-map loader), safetensors.py, gguf.py and
gguf_file.py (the readers) and dummy.py (random weights on the device).
"""

from jaxllm.loading.dummy import dummy_params
from jaxllm.loading.loader import TensorSource, load_params
from jaxllm.loading.model_loader import (
    LOAD_FORMATS,
    is_gguf_file,
    load_checkpoint,
    load_model,
    load_tokenizer,
    read_gguf_file,
)
from jaxllm.loading.safetensors import SafetensorsSource

__all__ = ["LOAD_FORMATS", "SafetensorsSource", "TensorSource", "dummy_params", "is_gguf_file", "load_checkpoint",
           "load_model", "load_params", "load_tokenizer", "read_gguf_file"]
