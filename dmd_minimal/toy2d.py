"""Toy 2D distributions shared by the tests, tutorials and benchmarks (DMD.md §9).

`grid25` and `ring8` are Gaussian mixtures, so their exact denoiser is known (gaussian.py) and
mode coverage can be measured (metrics.py); `moons`, `checkerboard` and `swissroll` are for pictures.
"""
import math

import torch

from .gaussian import GaussianMixtureDenoiser

MIXTURE_STD = 0.1   # std of every component of grid25 and ring8


def mixture_centers(name):
    """[K, 2] component centres of a mixture toy."""
    if name == "grid25":
        ticks = torch.arange(-2, 3, dtype=torch.float32) * 2
        return torch.cartesian_prod(ticks, ticks)                      # (2i, 2j), i, j in -2..2
    if name == "ring8":
        angles = 2 * math.pi * torch.arange(8, dtype=torch.float32) / 8
        return 4 * torch.stack([angles.cos(), angles.sin()], dim=1)    # radius 4
    raise ValueError(f"{name!r} is not a Gaussian-mixture toy; choose one of {MIXTURES}")


def exact_denoiser(name):
    """The closed-form denoiser of a mixture toy, at any sigma."""
    return GaussianMixtureDenoiser(mixture_centers(name), MIXTURE_STD)


def _moons(n, g):
    upper = torch.rand(n, generator=g) < 0.5
    t = math.pi * torch.rand(n, generator=g)
    x = torch.where(upper, t.cos(), 1 - t.cos())
    y = torch.where(upper, t.sin(), 0.5 - t.sin())
    points = torch.stack([x - 0.5, y - 0.25], dim=1) * 2                # centred, about unit scale
    return points + 0.1 * torch.randn(n, 2, generator=g)


def _checkerboard(n, g):
    x = 4 * torch.rand(n, generator=g) - 2
    y = torch.rand(n, generator=g) - 2 * torch.randint(0, 2, (n,), generator=g) + x.floor() % 2
    return torch.stack([x, y], dim=1) * 2


def _swissroll(n, g):
    t = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=g))
    points = torch.stack([t * t.cos(), t * t.sin()], dim=1) / 3
    return points + 0.1 * torch.randn(n, 2, generator=g)


def _mixture(name):
    return lambda n, g: exact_denoiser(name).sample(n, generator=g)


SAMPLERS = {
    "grid25": _mixture("grid25"),
    "ring8": _mixture("ring8"),
    "moons": _moons,
    "checkerboard": _checkerboard,
    "swissroll": _swissroll,
}
MIXTURES = ("grid25", "ring8")


def sample_toy(name, n, generator=None):
    """n samples [n, 2] of a toy distribution (a torch.Generator makes them reproducible)."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown toy distribution {name!r}; choose one of {sorted(SAMPLERS)}")
    return SAMPLERS[name](n, generator)
