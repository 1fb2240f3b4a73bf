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
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def training_curves(history, teacher_scores, path):
    """curves.png of a DMD run: losses, gradient norms and FID (with precision and recall where scored)
    against the step, the teacher's scores from the same noise as horizontal lines."""
    def series(key, records):
        points = [(h["step"], h[key]) for h in records if key in h]
        return zip(*points) if points else ((), ())
    evals = [dict(step=h["step"], **h["eval"]) for h in history if "eval" in h]
    panels = [("losses", ("loss_dm", "loss_reg", "loss_fake"), history, True),
              ("gradient norms (before clipping)", ("grad_norm", "grad_norm_fake"), history, True),
              (evals[0]["metric"] if evals else "FID", ("fid",), evals, True)]
    if evals and "recall" in evals[0]:
        panels.append(("precision and recall (k = 3)", ("precision", "recall"), evals, False))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (title, keys, records, log) in zip(axes[0], panels):
        for key in keys:
            steps, values = series(key, records)
            if steps:
                ax.plot(steps, values, marker="o" if records is evals else None, ms=3, label=key)
            for name, scores in (teacher_scores or {}).items():
                if records is evals and key in scores:
                    ax.axhline(scores[key], ls="--", lw=1, color="C1" if name == "euler1" else "C2",
                               label=f"teacher {'1 Euler step' if name == 'euler1' else name.replace('heun', 'Heun ')}"
                                     + ("" if len(keys) == 1 else f" {key}"))
        ax.set(title=title, xlabel="step")
        if log and any(ax.get_lines()):
            ax.set_yscale("log")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return _finish(fig, path)


def sample_panels(panels, columns, row_names, path):
    """Image grids side by side, one per {title: images [N, C, H, W] in [-1, 1]}, rows named by row_names."""
    from torchvision.utils import make_grid   # here: importing torchvision takes seconds
    fig, axes = plt.subplots(1, len(panels), figsize=(0.5 * columns * len(panels) + 1.5, 0.5 * len(row_names) + 0.8),
                             squeeze=False)
    for ax, (title, images) in zip(axes[0], panels.items()):
        grid = make_grid(images.detach().float().cpu().clamp(-1, 1), nrow=columns, padding=1, pad_value=1)   # [3, H', W']
        ax.imshow(((grid + 1) / 2).permute(1, 2, 0).numpy(), interpolation="nearest")
        step = grid.shape[1] / len(row_names)
        ax.set(title=title, xticks=[], yticks=[step * (i + 0.5) for i in range(len(row_names))])
        ax.set_yticklabels(row_names, fontsize=8)
    fig.tight_layout()
    return _finish(fig, path)
