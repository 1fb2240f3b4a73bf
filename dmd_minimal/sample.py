"""Draw samples from a trained one-step generator, or from the teacher's ODE to compare with it.

    python -m dmd_minimal.sample --checkpoint runs/toy2d-grid25/checkpoint.pt --num 10000 --out x.npz
    python -m dmd_minimal.sample --checkpoint runs/cifar10/checkpoint.pt --num 50000 --out dmd.npz --png-dir dmd/
    python -m dmd_minimal.sample --checkpoint edm-cifar10-32x32-cond-vp.pkl --teacher-steps 18 --num 50000 --out edm.npz

Sample i uses noise seeded by (seed, i) and class label i % num_classes, so the classes are balanced and
any subset can be regenerated exactly, by the generator or the teacher from the same noise. Images are
written as an .npz with `arr_0` uint8 [N, H, W, C] and `labels` [N] (what the ADM / guided-diffusion
evaluator reads; C = 1 for grayscale data), a grid PNG beside it, and optionally one PNG per sample.
Under torchrun every process draws every world_size-th batch and rank 0 writes the files.
"""
import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from tqdm import tqdm

from . import dist
from .checkpoint import recovery
from .generator import OneStepGenerator
from .load import load_denoiser
from .networks import denoiser_from_dict, sample_shape
from .sampler import sample_ode
from .utils import DMDError, atomic_write, check_at_least, check_writable, hide_progress, load_file, per_index_noise


def load_generator(path, ema=True):
    """(generator, config, which) of a DMD checkpoint: which is "generator_ema" (the network train() returns
    and the grids show) where the checkpoint has an EMA and ema is true, else "generator" (the raw weights)."""
    saved = load_file(path, "checkpoint", required=("config", "generator"), fix=recovery(path, "--checkpoint"))
    which = "generator_ema" if ema and saved.get("generator_ema") is not None else "generator"
    generator = OneStepGenerator(denoiser_from_dict(saved[which]), saved["config"]["sigma_max"])
    return generator.eval(), saved["config"], which


def load_model(path, teacher_steps=0, ema=True):
    """(model(z, labels) -> x, denoiser, description): the generator (its EMA), or the teacher's Heun ODE."""
    if teacher_steps:
        teacher = load_denoiser(path, which="teacher")
        return (lambda z, labels: sample_ode(teacher, z, teacher_steps, labels)), teacher, \
            f"teacher, Heun {teacher_steps} steps ({2 * teacher_steps - 1} NFE)"
    generator, _, which = load_generator(path, ema)
    return generator, generator.denoiser, "one-step generator" + " (EMA of its weights)" * (which == "generator_ema")


@torch.no_grad()
def sample(model, num, shape, label_dim=0, seed=0, batch_size=256, device="cpu", rank=0, world_size=1):
    """Samples [n, *shape] and labels [n] (None if unconditional) of this rank's batches, with their indices [n]."""
    starts = range(rank * batch_size, num, world_size * batch_size)
    indices, xs = [], []
    for start in tqdm(starts, desc="sampling", disable=hide_progress(rank), mininterval=1.0):
        index = torch.arange(start, min(num, start + batch_size))
        z = per_index_noise(index, shape, seed, device)
        labels = index.to(device) % label_dim if label_dim else None
        xs.append(model(z, labels).float().cpu())
        indices.append(index)
    indices = torch.cat(indices) if indices else torch.zeros(0, dtype=torch.long)
    x = torch.cat(xs) if xs else torch.zeros((0,) + tuple(shape))
    return x, (indices % label_dim if label_dim else None), indices


def to_uint8(x):
    """Images in [-1, 1] [N, C, H, W] -> uint8 [N, H, W, C], rounded as EDM's generate.py does."""
    return (x * 127.5 + 128).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def gather_on_rank0(x, labels, indices, world_size):
    """Every rank's samples, in index order, on rank 0 (None elsewhere)."""
    if world_size == 1:
        return x, labels
    parts = [None] * world_size if dist.rank() == 0 else None
    torch.distributed.gather_object((x, labels, indices), parts, dst=0)
    if parts is None:
        return None, None
    order = torch.cat([p[2] for p in parts]).argsort()
    x = torch.cat([p[0] for p in parts])[order]
    labels = None if parts[0][1] is None else torch.cat([p[1] for p in parts])[order]
    return x, labels


def save_images(images, labels, out, png_dir=None):
    """uint8 images [N, H, W, C] (C = 3, or 1 for grayscale) as out (.npz: arr_0, labels), a grid PNG beside it,
    and one PNG each in png_dir."""
    arrays = dict(arr_0=images.numpy()) | ({} if labels is None else dict(labels=labels.numpy()))
    atomic_write(out, lambda f: np.savez(f, **arrays))
    grid = torchvision.utils.make_grid(images[:64].permute(0, 3, 1, 2), nrow=8)    # [3, H', W']
    atomic_write(Path(out).with_suffix(".png"), lambda f: Image.fromarray(grid.permute(1, 2, 0).numpy()).save(f, "png"))
    if png_dir:
        os.makedirs(png_dir, exist_ok=True)
        for i, image in enumerate(tqdm(images.numpy(), desc="png", mininterval=1.0)):   # [H, W, C]
            image = image[:, :, 0] if image.shape[2] == 1 else image                     # PIL: gray is [H, W]
            atomic_write(Path(png_dir) / f"{i:06d}.png", lambda f: Image.fromarray(image).save(f, "png"))


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m dmd_minimal.sample", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True,
                        help="a checkpoint written by dmd_minimal.train (with --teacher-steps also a teacher file, "
                             "an EDM snapshot .pkl or a URL)")
    parser.add_argument("--num", type=int, default=10000, help="number of samples (default 10000)")
    parser.add_argument("--out", required=True, help="output .npz (toy2d: array x [num, 2]; images: arr_0 and labels)")
    parser.add_argument("--png-dir", default="", help="images: also write one PNG per sample into this folder")
    parser.add_argument("--teacher-steps", type=int, default=0, help="sample the teacher's Heun ODE with this many "
                        "steps instead of the generator (18 steps = 35 NFE)")
    parser.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    parser.add_argument("--batch-size", type=int, default=256, help="samples per forward pass (default 256)")
    parser.add_argument("--device", default="", help="cpu, cuda, ... (default: cuda when available)")
    parser.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                        help="sample the EMA of the generator's weights where the checkpoint has one, as train() "
                             "returns it (--no-ema: the raw weights)")
    args = parser.parse_args(argv)
    try:
        check_at_least(args, dict(num=1, batch_size=1, teacher_steps=0, seed=0))
        if not args.out.endswith(".npz"):
            raise DMDError(f"--out {args.out} must end in .npz")
        check_writable(os.path.dirname(os.path.abspath(args.out)))   # before the sampling, not after it
        if args.png_dir:
            check_writable(args.png_dir, "--png-dir")
        rank, world_size, device = dist.setup(args.device)   # under torchrun: one process per GPU
        model, denoiser, what = load_model(args.checkpoint, args.teacher_steps, args.ema)
        denoiser.to(device)
        shape = sample_shape(denoiser)
        x, labels, indices = sample(model, args.num, shape, denoiser.label_dim, args.seed, args.batch_size,
                                    device, rank, world_size)
        x, labels = gather_on_rank0(x, labels, indices, world_size)
        if rank == 0:
            if len(shape) == 1:   # toy2d points
                atomic_write(args.out, lambda f: np.savez(f, x=x.numpy()))
            else:
                save_images(to_uint8(x), labels, args.out, args.png_dir)
            print(f"wrote {args.num} samples of the {what} to {args.out}")
    except DMDError as e:
        sys.exit(f"error: {e}")
    finally:
        dist.cleanup()


if __name__ == "__main__":
    main()
