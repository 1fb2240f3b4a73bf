"""A dry run before a multi-day run: the preset's networks with random weights, two DMD iterations, a plan.

    python -m dmd_minimal.train --dataset imagenet64 --dry-run                  # any preset, any flags
    torchrun --nproc_per_node 8 -m dmd_minimal.train --dataset imagenet64 --dry-run --batch-gpu 8

Nothing is downloaded and nothing is written into OUT: the teacher is the preset's network (EDM's DDPM++ or
ADM for cifar10 / imagenet64) with random weights, and LPIPS's VGG16 has random weights where its ImageNet
weights are not cached (the same cost). It prints what a run will cost on this device: the networks'
parameters, time per iteration and per image, on a GPU the memory per image and the largest --batch-gpu
that fits, the checkpoint's size and save time (written to a temporary folder), the pairs' disk, and the
time of the whole preset on 1 and 8 processes like this one.
"""
import dataclasses
import math
import os
import tempfile
import time
from pathlib import Path

import torch

from . import dist
from .checkpoint import save_checkpoint
from .config import regression_batch
from .dmd_loss import VGG16_URL, lpips_vgg, sigma_levels
from .networks import IMAGE_NETWORKS, build_denoiser, sample_shape
from .teacher import TRAINED_HERE, data_spec, teacher_network


VGG16_FILE = os.path.basename(VGG16_URL)


def random_teacher(cfg):
    """The preset's teacher network with random weights: EDM's for the released teachers, else the one trained here."""
    shape, label_dim = data_spec(cfg)
    if cfg.dataset == "toy2d":
        return build_denoiser(cfg.arch, cfg.sigma_data or 1.0, hidden=cfg.hidden, depth=cfg.depth)
    network = dict(IMAGE_NETWORKS[cfg.dataset], dropout=0.0) if cfg.dataset in IMAGE_NETWORKS \
        else teacher_network(cfg, shape)
    return build_denoiser(sigma_data=cfg.sigma_data, label_dim=label_dim, **network)


def random_lpips(device, pooling):
    """LPIPS with VGG16's ImageNet weights where cached, else with random ones (lpips_vgg; no download): which, and it."""
    if os.path.isfile(os.path.join(torch.hub.get_dir(), "checkpoints", VGG16_FILE)):
        return "VGG16", lpips_vgg(device, pooling)
    return "VGG16 with random weights", lpips_vgg(device, pooling, random_vgg=True)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def iterate(cfg, nets, training, dmd_iteration, micro, levels):
    """One DMD iteration at `micro` images per process (DM and regression), on random pairs: (seconds, peak bytes)."""
    device = levels.device
    cfg = dataclasses.replace(cfg, batch_size=micro * dist.world_size(), regression_batch=micro * dist.world_size(),
                              batch_gpu=0)
    shape, label_dim = sample_shape(nets["teacher"]), nets["teacher"].label_dim
    pair_batch = dict(z=torch.randn(micro, *shape), y=torch.randn(micro, *shape).clamp(-1, 1),
                      labels=torch.randint(label_dim, (micro,)) if label_dim else None) if cfg.lambda_reg > 0 else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    start = time.perf_counter()
    dmd_iteration(cfg, nets, training, pair_batch, levels, dict(generator=0, fake_score=0))
    sync(device)
    return time.perf_counter() - start, torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0


@torch.no_grad()
def teacher_seconds_per_image(teacher, micro, device):
    """Seconds of one teacher evaluation per image (the pairs' ODE makes 2 steps - 1 of them per pair)."""
    x = torch.randn(micro, *sample_shape(teacher), device=device)
    sigma = torch.full((micro,), 1.0, device=device)
    labels = torch.randint(teacher.label_dim, (micro,), device=device) if teacher.label_dim else None
    teacher(x, sigma, labels)   # warm-up
    sync(device)
    start = time.perf_counter()
    teacher(x, sigma, labels)
    sync(device)
    return (time.perf_counter() - start) / micro


def checkpoint_cost(cfg, nets, training):
    """(bytes, seconds) of one checkpoint of these networks, written to a temporary folder and deleted."""
    if dist.rank() != 0:
        return 0, 0.0
    with tempfile.TemporaryDirectory(prefix="dmd-dry-run-") as folder:
        start = time.perf_counter()
        save_checkpoint(Path(folder), cfg, nets, training,
                        dict(step=2, history=[], pending={}, skipped=dict(generator=0, fake_score=0), provenance={}))
        seconds = time.perf_counter() - start
        return os.path.getsize(os.path.join(folder, "checkpoint.pt")), seconds


def say(line):
    if dist.rank() == 0:
        print(line)


def duration(seconds):
    """'3 h 20 min', '2.5 days', '40 s'."""
    if seconds >= 2 * 86400:
        return f"{seconds / 86400:.1f} days"
    if seconds >= 3600:
        return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60)} min"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.1f} s"


def dry_run(cfg, build_dmd, dmd_iteration):
    """Build the preset's networks with random weights, run two DMD iterations and print the plan; returns it
    as a dict. build_dmd and dmd_iteration are train.py's, passed in (train.py calls this)."""
    device, world_size = torch.device(cfg.device), dist.world_size()
    teacher = random_teacher(cfg).to(device).requires_grad_(False).eval()
    cfg = dataclasses.replace(cfg, sigma_data=teacher.sigma_data)
    lpips_name, lpips = random_lpips(device, cfg.lpips_pooling) if cfg.lambda_reg > 0 and \
        cfg.regression_loss == "lpips" else ("", None)
    nets, training = build_dmd(cfg, teacher, lpips)
    levels = sigma_levels(cfg.num_levels, cfg.sigma_min, cfg.sigma_max, cfg.rho, device)
    share = cfg.batch_size // world_size
    micro = max(2, min(cfg.batch_gpu or 4, share))   # two sizes give the memory per image (on a GPU)
    _, peak_one = iterate(cfg, nets, training, dmd_iteration, 1, levels)        # also the warm-up
    seconds, peak = iterate(cfg, nets, training, dmd_iteration, micro, levels)
    per_image = seconds / micro
    plan = dict(parameters=sum(p.numel() for p in teacher.parameters()), seconds_per_image=per_image,
                seconds_per_step=per_image * share)
    say(f"dry run of {cfg.dataset} on {device} ({world_size} process(es)), random weights, nothing written to {cfg.out}:")
    say(f"  networks     teacher, generator and fake score: {plan['parameters'] / 1e6:.1f}M parameters each "
        f"({type(teacher.backbone).__name__})" + (f"; LPIPS {lpips_name}, "
        f"{sum(p.numel() for p in lpips.parameters()) / 1e6:.1f}M" if lpips is not None else ""))
    say(f"  iteration    {seconds:.2f} s at {micro} images per process: {per_image:.3f} s per image, "
        f"{plan['seconds_per_step']:.1f} s per step of the preset's {share} images per process")
    if device.type == "cuda":
        memory = torch.cuda.get_device_properties(device).total_memory
        per_image_bytes = max(peak - peak_one, 1) / (micro - 1)
        fits = int((0.9 * memory - (peak_one - per_image_bytes)) // per_image_bytes)
        batch_gpu = max((d for d in range(1, min(fits, share) + 1) if share % d == 0), default=0)
        plan.update(bytes_per_image=per_image_bytes, batch_gpu=batch_gpu)
        say(f"  memory       {per_image_bytes / 2**30:.2f} GiB per image, {(peak_one - per_image_bytes) / 2**30:.1f} "
            f"GiB for the networks: --batch-gpu {batch_gpu} fits {memory / 2**30:.0f} GiB"
            + ("" if batch_gpu else " (nothing fits: a smaller network or more memory)"))
    size, save_seconds = checkpoint_cost(cfg, nets, training)
    plan.update(checkpoint_bytes=size, checkpoint_seconds=save_seconds)
    say(f"  checkpoint   {size / 1e9:.2f} GB, saved in {save_seconds:.1f} s (every {cfg.checkpoint_every} steps)")
    pixels = math.prod(sample_shape(teacher))
    needs_pairs = cfg.lambda_reg > 0
    pair_seconds = cfg.num_pairs * (2 * cfg.pair_steps - 1) * teacher_seconds_per_image(teacher, micro, device) \
        if needs_pairs else 0.0
    if needs_pairs:
        shape = "x".join(map(str, sample_shape(teacher)))
        say(f"  pairs        {cfg.num_pairs:,} x {shape} float32: {cfg.num_pairs * pixels * 4 / 1e9:.2f} GB on disk, "
            f"{2 * cfg.pair_steps - 1} teacher evaluations each")
    teacher_note = "" if cfg.dataset not in TRAINED_HERE else " (plus training the teacher, when OUT has none)"
    for n in sorted({1, 8, world_size}):
        total = pair_seconds / n + cfg.dmd_steps * per_image * cfg.batch_size / n
        say(f"  estimate     on {n} process(es) like this one, at {micro} images per pass: pairs {duration(pair_seconds / n)}, "
            f"{cfg.dmd_steps:,} DMD steps at batch {cfg.batch_size} {duration(total - pair_seconds / n)}: "
            f"{duration(total)}{teacher_note}")
        plan[f"seconds_on_{n}"] = total
    say("  note         larger passes (--batch-gpu) take less time per image; the pairs are made 256 at a time"
        + (f"; regression batches assumed as large as --batch-size ({cfg.batch_size})"
           if regression_batch(cfg) != cfg.batch_size else ""))
    return plan
