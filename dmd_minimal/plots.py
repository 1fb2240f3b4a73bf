"""Pictures shared by the training report and the tutorials: scatter panels, loss curves, image grids."""
import math

import matplotlib

matplotlib.use("Agg")   # files only; notebooks switch to their inline backend themselves
import matplotlib.pyplot as plt  # noqa: E402

from .utils import atomic_write  # noqa: E402


def scatter_panels(panels, path=None, lim=6.0, max_points=5000, columns=None):
    """Scatter plots of 2D samples, one panel per {title: x [N, 2]}, side by side (rows of `columns`)."""
    columns = columns or len(panels)
    rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.4 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (title, x) in zip(axes.flat, panels.items()):
        x = x[:max_points]
        ax.scatter(x[:, 0], x[:, 1], s=1, alpha=0.4, rasterized=True)
        ax.set(title=title, xlim=(-lim, lim), ylim=(-lim, lim), aspect="equal", xticks=[], yticks=[])
    fig.tight_layout()
    return _finish(fig, path)


def loss_curves(curves, path=None):
    """One panel per {title: (steps, values)}, log-scaled where the values are positive."""
    fig, axes = plt.subplots(1, len(curves), figsize=(3.6 * len(curves), 3.0), squeeze=False)
    for ax, (title, (steps, values)) in zip(axes[0], curves.items()):
        ax.plot(steps, values)
        ax.set(title=title, xlabel="step")
        if len(values) and min(values) > 0:
            ax.set_yscale("log")
    fig.tight_layout()
    return _finish(fig, path)


def image_grid(images, path, nrow=None):
    """Images [N, C, H, W] in [-1, 1] as one PNG grid (square by default), written atomically."""
    from torchvision.utils import save_image   # here: importing torchvision takes seconds
    nrow = nrow or math.ceil(math.sqrt(len(images)))
    atomic_write(path, lambda f: save_image(images.detach().float().cpu(), f, nrow=nrow, normalize=True,
                                            value_range=(-1, 1), format="png"))


def _finish(fig, path):
    if path is None:
        return fig
    atomic_write(path, lambda f: fig.savefig(f, dpi=110, format="png"))
    plt.close(fig)
    return None
