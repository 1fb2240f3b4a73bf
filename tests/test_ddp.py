"""DistributedDataParallel on the CPU: two gloo processes agree with each other and with one process."""
import copy
import dataclasses
import os
import socket

import torch
import torch.multiprocessing as mp

from dmd_minimal import dist
from dmd_minimal.config import make_config
from dmd_minimal.train import train
from test_train_images import tiny_teacher


def runs(teacher, folder):
    """Two steps of full DMD, and of regression alone: the global batch of 8 split across the processes."""
    base = make_config("shapes", resolution=8, teacher=teacher, device="cpu", num_pairs=32, pair_steps=2,
                       batch_size=8, dmd_steps=2, log_every=1, grid_size=0)
    return {"dmd": dataclasses.replace(base, out=f"{folder}/dmd"),
            "regression": dataclasses.replace(base, out=f"{folder}/regression", distribution_matching=False,
                                              lambda_reg=1.0)}


def worker(rank, world_size, port, teacher, folder):
    """One process of torchrun, as its environment variables describe it."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    try:
        for name, cfg in runs(teacher, folder).items():
            torch.save(train(cfg).state_dict(), f"{folder}/{name}-rank{rank}.pt")
    finally:
        dist.cleanup()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_agree_with_each_other_and_with_one(tmp_path):
    teacher = tiny_teacher(tmp_path / "teacher.pt")
    one = train(dataclasses.replace(runs(teacher, tmp_path)["regression"], out=str(tmp_path / "one")))
    # fork: the workers start with this process's imports (as DataLoader workers do), not from scratch
    mp.start_processes(worker, args=(2, free_port(), teacher, str(tmp_path)), nprocs=2, start_method="fork")
    for name in ("dmd", "regression"):
        rank0, rank1 = (torch.load(tmp_path / f"{name}-rank{r}.pt") for r in (0, 1))
        for key in rank0:
            assert torch.equal(rank0[key], rank1[key]), (name, key)      # DDP kept the copies identical

    # Regression alone has no per-process randomness: the pairs come in one order split across the
    # processes, so one process with the same global batch takes the same steps, up to rounding. Compared
    # as functions: Adam moves weights whose true gradient is 0 (a bias before a GroupNorm) by the sign
    # of rounding noise, without changing the network's output.
    two = copy.deepcopy(one)
    two.load_state_dict(rank0)
    start = copy.deepcopy(one)
    start.denoiser.load_state_dict(torch.load(teacher, weights_only=True)["denoiser"]["state_dict"])
    z, labels = torch.randn(16, 3, 8, 8), torch.arange(16) % 4
    with torch.no_grad():
        moved = (one(z, labels) - start(z, labels)).abs().max()
        differ = (one(z, labels) - two(z, labels)).abs().max()
    assert differ < 1e-4 * moved, (differ, moved)   # measured: about 3e-6
