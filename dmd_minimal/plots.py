"""Pictures shared by the training report and the tutorials: scatter panels, loss curves, image grids."""
import itertools
import math

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")   # files only; notebooks switch to their inline backend themselves
import matplotlib.pyplot as plt  # noqa: E402

from .utils import atomic_write  # noqa: E402

REFERENCE_STYLES = ("--", ":", "-.", (0, (6, 2, 1, 2, 1, 2)), (0, (1, 4)))   # step_curves' horizontal lines


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


def step_curves(curves, references, path=None, title="", ylabel=""):
    """One panel: a line per {label: (steps, values)}, each reference {label: value} a horizontal line; log-scaled."""
    fig, ax = plt.subplots(figsize=(8.8, 4.0))
    for label, (steps, values) in curves.items():
        ax.plot(steps, values, marker="o", ms=3, label=label)
    for (label, value), style in zip(references.items(), itertools.cycle(REFERENCE_STYLES)):
        ax.axhline(value, color="gray", ls=style, lw=1.2, label=label)
    ax.set(title=title, xlabel="step", ylabel=ylabel, yscale="log")
    plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")   # 60, not 6 x 10^1
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))   # beside the panel: no line hidden
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


def training_curves(history, teacher_scores, path):
    """curves.png of a DMD run: losses, gradient norms and FID (with precision and recall where scored)
    against the step, the teacher's scores from the same noise as dashed horizontal lines."""
    evals = [dict(step=h["step"], **h["eval"]) for h in history if "eval" in h]
    teacher = {f"teacher, {'1 Euler step' if name == 'euler1' else name.replace('heun', 'Heun ') + ' steps'}": scores
               for name, scores in (teacher_scores or {}).items()}   # {label: scores}
    panels = [("losses", ("loss_dm", "loss_reg", "loss_fake"), history, {}),
              ("gradient norms (before clipping)", ("grad_norm", "grad_norm_fake"), history, {}),
              (evals[0]["metric"] if evals else "FID", ("fid",), evals, teacher)]
    if evals and "recall" in evals[0]:   # the teacher's ODE only: its one step has no recall to speak of
        panels.append(("precision and recall (k = 3)", ("precision", "recall"), evals,
                       {label: scores for label, scores in teacher.items() if "Heun" in label}))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (title, keys, records, lines) in zip(axes[0], panels):
        for k, key in enumerate(keys):
            points = [(h["step"], h[key]) for h in records if h.get(key) is not None]
            if points:
                ax.plot(*zip(*points), color=f"C{k}", marker="o" if records is evals else None, ms=3, label=key)
            for style, (label, scores) in zip(("--", ":"), lines.items()):
                if scores.get(key) is not None:
                    ax.axhline(scores[key], ls=style, lw=1.2, color="C3" if len(keys) == 1 else f"C{k}",
                               label=label if len(keys) == 1 else f"{label}: {key}")
        ax.set(title=title, xlabel="step")
        if keys != ("precision", "recall") and any(ax.get_lines()):   # losses, norms and FID span decades
            ax.set_yscale("log")
        if keys == ("fid",) and any(ax.get_lines()):   # FID from ~100 down to ~10: label the minor ticks too
            plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")   # 20, not 2 x 10^1
            ax.yaxis.set_minor_locator(matplotlib.ticker.LogLocator(subs=(1.2, 1.5, 2, 3, 5, 7)))   # 12 and 15 too
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(plain)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return _finish(fig, path)


def sample_panels(panels, columns, row_names, path, column_names=None):
    """Image grids side by side, one per {title: images [N, C, H, W] in [-1, 1]}, rows named by row_names
    (and columns by column_names, under each grid)."""
    from torchvision.utils import make_grid   # here: importing torchvision takes seconds
    fig, axes = plt.subplots(1, len(panels), figsize=(0.5 * columns * len(panels) + 1.5, 0.5 * len(row_names) + 0.8),
                             squeeze=False)
    for ax, (title, images) in zip(axes[0], panels.items()):
        grid = make_grid(images.detach().float().cpu().clamp(-1, 1), nrow=columns, padding=1, pad_value=1)   # [3, H', W']
        ax.imshow(((grid + 1) / 2).permute(1, 2, 0).numpy(), interpolation="nearest")
        step = grid.shape[1] / len(row_names)
        ax.set(title=title, xticks=[], yticks=[step * (i + 0.5) for i in range(len(row_names))])
        ax.set_yticklabels(row_names, fontsize=8)
        if column_names:
            width = grid.shape[2] / columns
            ax.set_xticks([width * (i + 0.5) for i in range(columns)])
            ax.set_xticklabels(column_names, fontsize=7, rotation=90)
    fig.tight_layout()
    return _finish(fig, path)
