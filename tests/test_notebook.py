"""notebooks/quickstart.ipynb runs top to bottom on CPU with the default model; any failing cell fails the test."""

import json
import pathlib
import sys

import nbformat
import pytest
from nbclient import NotebookClient

pytestmark = pytest.mark.server

NOTEBOOK = pathlib.Path(__file__).parents[1] / "notebooks" / "quickstart.ipynb"


@pytest.fixture
def python3_kernel_of_this_interpreter(tmp_path, monkeypatch):
    """A "python3" kernelspec that runs this interpreter (the venv's), found before any other on JUPYTER_PATH."""
    spec = tmp_path / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))
    return "python3"


@pytest.mark.timeout(400)
def test_quickstart_notebook_runs(python3_kernel_of_this_interpreter):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert nb.metadata.kernelspec.name == "python3"
    client = NotebookClient(nb, kernel_name=python3_kernel_of_this_interpreter, timeout=300,
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()  # raises CellExecutionError naming the cell on the first failure
    outputs = "".join(o.get("text", "") for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs)
    assert "Paris" in outputs and "finished: True" in outputs
    errors = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs if o.output_type == "error"]
    assert not errors
