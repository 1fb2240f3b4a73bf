"""Every tutorial notebook runs top to bottom with DMD_FAST=1 (tiny step counts), in a scratch folder."""
import os
from pathlib import Path

import nbformat
import pytest
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

TUTORIALS = Path(__file__).resolve().parents[1] / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("[0-9]*.ipynb"))


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    """One kernel for all notebooks, in one working folder (the teacher the first one trains is reused by
    the rest). Each notebook starts from an empty namespace (%reset); only the imported modules carry over,
    so torch is imported once rather than once per notebook."""
    km = KernelManager(kernel_name="python3")
    km.start_kernel(cwd=str(tmp_path_factory.mktemp("tutorials")),
                    env=dict(os.environ, DMD_FAST="1", TQDM_DISABLE="1"))
    yield km
    km.shutdown_kernel(now=True)


def test_there_are_notebooks():
    assert NOTEBOOKS, f"expected the tutorial notebooks in {TUTORIALS}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_with_outputs(path):
    code = [cell for cell in nbformat.read(path, as_version=4).cells if cell.cell_type == "code"]
    unexecuted = [i for i, cell in enumerate(code) if cell.execution_count is None]
    assert not unexecuted, (f"{path.name}: code cells {unexecuted} have no outputs; "
                            f"refresh them with: python tutorials/run.py {path.name}")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, kernel):
    notebook = nbformat.read(path, as_version=4)
    notebook.cells.insert(0, nbformat.v4.new_code_cell("%reset -f"))   # nothing left from the notebook before
    client = NotebookClient(notebook, km=kernel, timeout=600)            # per cell, for a busy CI
    try:
        client.execute()
    except CellExecutionError as e:
        pytest.fail(f"{path.name} fails with DMD_FAST=1 (rerun: DMD_FAST=1 python tutorials/run.py "
                    f"{path.name}):\n{e}", pytrace=False)
