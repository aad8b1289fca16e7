"""The host-side modules import no jax, jaxlib, flax or numpy: the scheduler stays plain Python, and the server can
validate requests without touching device code."""

import json
import pathlib
import subprocess
import sys

import pytest

pytestmark = pytest.mark.server

ROOT = pathlib.Path(__file__).resolve().parents[1]

# jaxllm/__init__.py imports the engine (and so jax); load the package's modules without running it, to test what
# these modules themselves import.
_PROBE = """
import json, sys, types
pkg = types.ModuleType("jaxllm")
pkg.__path__ = [sys.argv[1] + "/jaxllm"]
sys.modules["jaxllm"] = pkg
import jaxllm.scheduling, jaxllm.sampling_params, jaxllm.validation, jaxllm.outputs
print(json.dumps(sorted(sys.modules)))
"""


def test_scheduling_imports_no_jax_nor_numpy():
    result = subprocess.run([sys.executable, "-c", _PROBE, str(ROOT)], capture_output=True, text=True, timeout=60,
                            check=True)
    modules = json.loads(result.stdout)
    assert "jaxllm.scheduling.scheduler" in modules and "jaxllm.validation" in modules
    heavy = [m for m in modules if m.split(".")[0] in ("jax", "jaxlib", "flax", "numpy")]
    assert heavy == []
