"""The notebooks run top to bottom on CPU with the default model; any failing cell fails the test.

notebooks/quickstart.ipynb: generate, chat, the KV cache, streaming. notebooks/research.ipynb: per-request hidden
states, a steering vector and its effect on generations, an attribution through llm.model; its last cell displays
what it found as JSON, which the test checks."""

import json
import math
import os
import pathlib
import sys

import nbformat
import pytest
from nbclient import NotebookClient

pytestmark = pytest.mark.server

ROOT = pathlib.Path(__file__).parents[1]
NOTEBOOKS = ROOT / "notebooks"


@pytest.fixture
def python3_kernel_of_this_interpreter(tmp_path, monkeypatch):
    """A "python3" kernelspec that runs this interpreter (the venv's), found before any other on JUPYTER_PATH, and
    imports this checkout's jaxllm (not whichever one the venv has installed)."""
    spec = tmp_path / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    return "python3"


def execute(name: str, kernel_name: str) -> list:
    """Runs notebooks/<name> in a fresh kernel; returns the outputs of its code cells, in order, one list each."""
    path = NOTEBOOKS / name
    nb = nbformat.read(path, as_version=4)
    assert nb.metadata.kernelspec.name == "python3"
    assert all(not cell.get("outputs") for cell in nb.cells if cell.cell_type == "code"), "commit it cleared"
    client = NotebookClient(nb, kernel_name=kernel_name, timeout=300,
                            resources={"metadata": {"path": str(path.parent)}})
    client.execute()  # raises CellExecutionError naming the cell on the first failure
    cell_outputs = [cell.outputs for cell in nb.cells if cell.cell_type == "code"]
    assert not [o for outputs in cell_outputs for o in outputs if o.output_type == "error"]
    return cell_outputs


@pytest.mark.timeout(400)
def test_quickstart_notebook_runs(python3_kernel_of_this_interpreter):
    cell_outputs = execute("quickstart.ipynb", python3_kernel_of_this_interpreter)
    text = "".join(o.get("text", "") for outputs in cell_outputs for o in outputs)
    assert "Paris" in text and "finished: True" in text


@pytest.mark.timeout(400)
def test_research_notebook_runs(python3_kernel_of_this_interpreter):
    cell_outputs = execute("research.ipynb", python3_kernel_of_this_interpreter)
    figures = [o for outputs in cell_outputs for o in outputs if "image/png" in o.get("data", {})]
    assert len(figures) == 3  # the residual-stream norms, the states along the steering direction, the attribution
    (summary,) = [o.data["application/json"] for o in cell_outputs[-1] if "application/json" in o.get("data", {})]

    num_layers, hidden_size = summary["num_layers"], summary["hidden_size"]
    assert (num_layers, hidden_size) == (30, 576)  # SmolLM2-135M
    assert summary["hidden_states_shapes"] == [[num_layers + 1, t, hidden_size] for t in summary["prompt_lengths"]]
    assert summary["engine_vs_dense_error"] < 1e-4  # the paged step's states are the dense forward's

    generations = summary["generations"]
    plain, up, down = generations["plain"], generations["+ direction"], generations["- direction"]
    assert all(text for texts in (plain, up, down) for text in texts)
    for steered in (up, down):  # every steered generation differs from its plain one
        assert all(s != p for s, p in zip(steered, plain)), (steered, plain)
    assert all(u != d for u, d in zip(up, down))

    attribution = summary["attribution"]
    tokens = attribution["tokens"]
    assert "".join(tokens) == "The capital of France is"
    for values in (attribution["grad_norm"], attribution["grad_x_input"]):
        assert len(values) == len(tokens) and all(math.isfinite(v) for v in values)
    assert any(v > 0 for v in attribution["grad_norm"])
