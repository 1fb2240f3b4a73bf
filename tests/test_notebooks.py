"""Every tutorial notebook runs top to bottom with DMD_FAST=1 (tiny step counts), in a scratch folder."""
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

TUTORIALS = Path(__file__).resolve().parents[1] / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("[0-9]*.ipynb"))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """One working folder for all notebooks, so the teacher the first one trains is reused by the rest."""
    return tmp_path_factory.mktemp("tutorials")


def test_there_are_notebooks():
    assert NOTEBOOKS, f"expected the tutorial notebooks in {TUTORIALS}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_with_outputs(path):
    code = [cell for cell in nbformat.read(path, as_version=4).cells if cell.cell_type == "code"]
    unexecuted = [i for i, cell in enumerate(code) if cell.execution_count is None]
    assert not unexecuted, (f"{path.name}: code cells {unexecuted} have no outputs; "
                            f"refresh them with: python tutorials/run.py {path.name}")


@pytest.mark.slow   # minutes of CPU: kept out of CI until the suite has room (`pytest -m slow`)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, workdir, monkeypatch):
    monkeypatch.setenv("DMD_FAST", "1")
    monkeypatch.setenv("TQDM_DISABLE", "1")
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(notebook, timeout=600, startup_timeout=180, kernel_name="python3",
                            resources={"metadata": {"path": str(workdir)}})   # timeouts per cell, for a busy CI
    try:
        client.execute()
    except CellExecutionError as e:
        pytest.fail(f"{path.name} fails with DMD_FAST=1 (rerun: DMD_FAST=1 python tutorials/run.py "
                    f"{path.name}):\n{e}", pytrace=False)
