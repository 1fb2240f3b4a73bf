import os

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):   # pytest -n 2: one core per worker, for its subprocesses and kernels too
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
