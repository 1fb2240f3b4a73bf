"""Draw samples from a trained one-step generator.

    python -m dmd_minimal.sample --checkpoint runs/toy2d-grid25/checkpoint.pt --num 10000 --out x.npz

Sample i uses noise seeded by (seed, i), so any subset of samples can be regenerated exactly.
"""
import argparse
import sys

import numpy as np
import torch
from tqdm import tqdm

from .generator import OneStepGenerator
from .networks import denoiser_from_dict
from .train import load_checkpoint
from .utils import DMDError, atomic_write, per_index_noise


def load_generator(path):
    """The one-step generator stored in a DMD checkpoint, and the checkpoint's config."""
    saved = load_checkpoint(path)
    generator = OneStepGenerator(denoiser_from_dict(saved["generator"]), saved["config"]["sigma_max"])
    return generator.eval(), saved["config"]


@torch.no_grad()
def sample(generator, num, shape, seed=0, batch_size=4096, device="cpu"):
    """num one-step samples [num, *shape] from per-index noise."""
    generator = generator.to(device)
    chunks = []
    for start in tqdm(range(0, num, batch_size), desc="sampling", mininterval=1.0):
        z = per_index_noise(range(start, min(num, start + batch_size)), shape, seed, device)
        chunks.append(generator(z).cpu())
    return torch.cat(chunks)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m dmd_minimal.sample", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a checkpoint.pt written by dmd_minimal.train")
    parser.add_argument("--num", type=int, default=10000, help="number of samples (default 10000)")
    parser.add_argument("--out", required=True, help="output .npz file (array x of shape [num, 2])")
    parser.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    try:
        if not args.out.endswith(".npz"):
            raise DMDError(f"--out {args.out} must end in .npz")
        generator, config = load_generator(args.checkpoint)
        x = sample(generator, args.num, (2,), args.seed, device=args.device)
        atomic_write(args.out, lambda f: np.savez(f, x=x.numpy()))
        print(f"wrote {args.num} samples of {config['dataset']}/{config['toy']} to {args.out}")
    except DMDError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
