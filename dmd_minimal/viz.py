"""Pictures for the tutorials: 2D samples, vector fields, ODE paths, image grids and metric tables.

Each helper draws onto an Axes the caller made with `panels`, so a notebook composes a figure from
a few calls; nothing is saved (plots.py writes the training report's files). 2D helpers take torch
tensors or numpy arrays of shape [N, 2].
"""
import math

import matplotlib.pyplot as plt
import numpy as np
import torch

LIM = 6.0    # grid25 (centres up to +-4) and ring8 (radius 4) fit in [-LIM, LIM]^2
DPI = 80     # small, readable figures keep the committed notebooks small


def as_numpy(x):
    return x.detach().cpu().float().numpy() if torch.is_tensor(x) else np.asarray(x, dtype=np.float32)


def panels(rows=1, cols=1, size=2.6):
    """A figure with a rows x cols array of axes (always 2D), each about size x size inches."""
    width, height = (size, size) if np.isscalar(size) else size
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False, dpi=DPI)
    return fig, axes


def frame(ax, title=None, lim=LIM):
    """A square [-lim, lim]^2 view without ticks."""
    ax.set(xlim=(-lim, lim), ylim=(-lim, lim), aspect="equal", xticks=[], yticks=[])
    if title:
        ax.set_title(title, fontsize=9)


def scatter(ax, x, title=None, color="C0", lim=LIM, size=1.5, max_points=4000):
    """2D samples as dots (color: one colour, or one per point, e.g. from position_colors)."""
    x = as_numpy(x)[:max_points]
    if not isinstance(color, str):
        color = as_numpy(color)[:max_points]
    ax.scatter(x[:, 0], x[:, 1], s=size, c=color, alpha=0.6, linewidths=0, rasterized=True)
    frame(ax, title, lim)


def mark_modes(ax, centers):
    """Small grey crosses at the mixture's centres."""
    c = as_numpy(centers)
    ax.scatter(c[:, 0], c[:, 1], marker="+", s=20, c="0.5", linewidths=0.8)


def grid_points(lim=LIM, n=25):
    """[n * n, 2] points of a regular grid over [-lim, lim]^2."""
    ticks = torch.linspace(-lim, lim, n)
    Y, X = torch.meshgrid(ticks, ticks, indexing="ij")          # [n, n] each
    return torch.stack([X.flatten(), Y.flatten()], dim=1)


def field(ax, points, vectors, title=None, color="C0", lim=LIM):
    """A vector field given at grid points [M, 2], as equal-length arrows: its direction only."""
    p, v = as_numpy(points), as_numpy(vectors)
    spacing = 2 * lim / (math.isqrt(len(p)) - 1)
    u = 0.75 * spacing * v / (np.linalg.norm(v, axis=1, keepdims=True) + 1e-12)
    ax.quiver(p[:, 0], p[:, 1], u[:, 0], u[:, 1], color=color, angles="xy", scale_units="xy", scale=1,
              width=0.005, headwidth=4, headlength=4, pivot="middle")
    frame(ax, title, lim)


def arrows(ax, x, v, color="C3", length=None, max_points=300):
    """Arrows from points x along v, to scale (x + v is the tip), or all `length` long (directions only)."""
    x, v = as_numpy(x)[:max_points], as_numpy(v)[:max_points]
    if length is not None:
        v = length * v / (np.linalg.norm(v, axis=1, keepdims=True) + 1e-12)
    ax.quiver(x[:, 0], x[:, 1], v[:, 0], v[:, 1], angles="xy", scale_units="xy", scale=1,
              color=color, width=0.005, headwidth=3, headlength=3.5)


def trajectories(ax, paths, title=None, lim=LIM, max_paths=200):
    """Paths [T, N, 2] (e.g. an ODE trajectory) as thin lines, with their end points as dots."""
    paths = as_numpy(paths)[:, :max_paths]
    ax.plot(paths[:, :, 0], paths[:, :, 1], color="C0", alpha=0.25, linewidth=0.6)
    ax.scatter(paths[-1, :, 0], paths[-1, :, 1], s=3, c="C3", zorder=3, linewidths=0)
    frame(ax, title, lim)


def position_colors(x, lim=4.0):
    """An RGB colour per 2D point [N, 3] that encodes where it is: red grows with x, green with y."""
    x = np.clip(as_numpy(x) / (2 * lim) + 0.5, 0, 1)
    return np.stack([x[:, 0], x[:, 1], 0.6 * np.ones(len(x))], axis=1)


def image_grid(ax, images, title=None, nrow=8):
    """Images [N, C, H, W] in [-1, 1] tiled nrow per row."""
    import torchvision   # here, so that the 2D tutorials do not pay for importing it

    images = torch.as_tensor(images).detach().cpu().float().clamp(-1, 1) * 0.5 + 0.5
    grid = torchvision.utils.make_grid(images, nrow=nrow, padding=1, pad_value=1.0)   # [C, H', W']
    ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
    ax.set(xticks=[], yticks=[])
    if title:
        ax.set_title(title, fontsize=9)


def metrics_table(rows, digits=3):
    """A Markdown table from {row name: {column: value}} (columns from the first row)."""
    columns = list(next(iter(rows.values())))
    lines = ["| | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, row in rows.items():
        cells = [f"{row[c]:.{digits}g}" if isinstance(row[c], float) else str(row[c]) for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
