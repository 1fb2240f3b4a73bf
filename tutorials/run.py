"""Execute the tutorial notebooks and store their outputs in place.

    python tutorials/run.py                       # every notebook, as committed (a few CPU minutes each)
    python tutorials/run.py 03_distribution_matching.ipynb
    DMD_FAST=1 python tutorials/run.py            # tiny step counts, as the tests run them

The notebooks run in one scratch folder, deleted afterwards, so every refresh trains from scratch;
the teacher that the first notebook trains there is reused by the others. 05 reuses the finished
fashion-mnist run in $DMD_FASHION_OUT where it is set:

    DMD_FASHION_OUT=RUN python tutorials/run.py 05_images_pipeline.ipynb
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

HERE = Path(__file__).resolve().parent


def execute(path, cwd, timeout=None):
    """Run every cell of the notebook at path with cwd as its working folder (no time limit); returns it executed."""
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(notebook, timeout=timeout, startup_timeout=180, kernel_name="python3",
                   resources={"metadata": {"path": str(cwd)}}).execute()
    return notebook


def main(argv=None):
    parser = argparse.ArgumentParser(description="Execute the tutorials and save them with their outputs.")
    parser.add_argument("notebooks", nargs="*", help="notebook files (default: every NN_*.ipynb in tutorials/)")
    args = parser.parse_args(argv)
    paths = [Path(p) if os.path.exists(p) else HERE / p for p in args.notebooks] or sorted(HERE.glob("[0-9]*.ipynb"))
    os.environ.setdefault("TQDM_DISABLE", "1")    # progress bars would fill the saved outputs
    if os.environ.get("DMD_FAST") == "1":
        print("DMD_FAST=1: tiny step counts; do not commit these outputs")
    with tempfile.TemporaryDirectory(prefix="dmd-tutorials-") as cwd:
        for path in paths:
            start = time.time()
            try:
                notebook = execute(path, cwd)
            except CellExecutionError as e:
                sys.exit(f"error: {path.name} failed, nothing written:\n{e}")
            tmp = path.with_suffix(".ipynb.tmp")
            nbformat.write(notebook, tmp)
            os.replace(tmp, path)                 # atomic: an interrupted run keeps the old notebook
            print(f"{path.name}: {time.time() - start:.0f} s, {path.stat().st_size / 1e3:.0f} kB")


if __name__ == "__main__":
    main()
