"""Several processes, one per GPU, started by torchrun: setup, DistributedDataParallel, barriers.

    torchrun --nproc_per_node 8 -m dmd_minimal.train --dataset cifar10 --teacher URL
    torchrun --nnodes 2 --node_rank 0 --master_addr HOST --nproc_per_node 8 -m dmd_minimal.train ...

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK in each process's environment; without them everything
here is a no-op for a single process. Each process takes batch_size / WORLD_SIZE samples of every
batch; DistributedDataParallel averages the trained networks' gradients across processes, so all of
them take the same optimizer step on the gradient of the global batch.
"""
import contextlib
import datetime
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from .utils import DMDError


def check_device(name):
    """One-line error unless name ("" for the default) is the CPU, a CUDA GPU this machine has, or MPS."""
    try:
        device = torch.device(name or "cpu")
    except RuntimeError:
        raise DMDError(f"--device {name!r} is not a device: use cpu, cuda or cuda:N") from None
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device.type == "cuda" and (device.index or 0) >= gpus:
        raise DMDError(f"--device {name}: this machine has {gpus} CUDA GPU(s) that torch can use; try --device cpu")
    if device.type not in ("cpu", "cuda") and not (device.type == "mps" and torch.backends.mps.is_available()):
        raise DMDError(f"--device {name}: dmd_minimal runs on cpu, cuda or cuda:N (mps where available)")


def setup(device="", timeout=1800):
    """Join torchrun's process group (NCCL on GPUs, gloo on CPUs); returns (rank, world_size, device).

    timeout: seconds a collective waits for the slowest process before the run stops with an error. Every
    stage splits its work evenly, so the longest legitimate wait is process 0 alone writing a checkpoint
    or scoring samples; NCCL's default of 10 minutes is too short for that at ImageNet's scale.
    """
    check_device(device)
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size == 1:
        return 0, 1, torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device in ("", "cuda") and torch.cuda.is_available():
        device = f"cuda:{local_rank}"          # one GPU per process
    device = torch.device(device or "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=timeout))
    return dist.get_rank(), dist.get_world_size(), device


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier():
    """Wait until every process gets here (e.g. until rank 0 has written a file the others read)."""
    if dist.is_initialized():
        dist.barrier()


def any_process(flag, device):
    """Whether flag is true in any process: all of them must stop at the same step."""
    if not dist.is_initialized():
        return bool(flag)
    flag = torch.tensor(float(bool(flag)), device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag)


def mean_over_processes(values, device):
    """{name: float} averaged over the processes (one all_reduce): the logged losses are every process's."""
    if not dist.is_initialized() or not values:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(values, (t / dist.get_world_size()).tolist()))


def cleanup():
    if dist.is_initialized():
        dist.destroy_process_group()


class DDP(DistributedDataParallel):
    """DistributedDataParallel that lets attributes of the wrapped network through (net.sigma_data, ...)."""

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)


def wrap(net, device):
    """net in DDP when there are several processes (gradients averaged in backward), else net itself."""
    if not dist.is_initialized():
        return net
    return DDP(net, device_ids=[device.index] if device.type == "cuda" else None,
               broadcast_buffers=False)   # the buffers are constants (FIR filters, frequencies)


def no_sync(net, skip=True):
    """Inside it, DDP's backward passes only accumulate gradients; the first one outside averages them all."""
    return net.no_sync() if skip and isinstance(net, DistributedDataParallel) else contextlib.nullcontext()


def unwrap(net):
    """The network inside DDP (whose state_dict keys carry a 'module.' prefix)."""
    return net.module if isinstance(net, DistributedDataParallel) else net
