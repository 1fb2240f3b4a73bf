"""Pictures for the tutorials: 2D samples, vector fields, ODE paths, image grids and metric tables.

Each helper draws onto an Axes the caller made with `panels`, so a notebook composes a figure from
a few calls; nothing is saved (plots.py writes the training report's files). 2D helpers take torch
tensors or numpy arrays of shape [N, 2]. The exceptions close the file: tutorial 03's two figures of the
DMD gradient s_real - s_fake (`score_rows`, `training_strip`, drawn from `dmd_fields`) and tutorial 05's
update of one image (`dmd_image_rows`) are whole figures, shown through `small_png` to keep the notebooks small.
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


def heat_map(ax, points, values, title=None, log=True, cmap="magma"):
    """Values [M] given at grid_points [M, 2] as an image (log colour scale by default); returns it for a colour bar."""
    import matplotlib.colors as mcolors

    p, v = as_numpy(points), as_numpy(values)
    n = math.isqrt(len(p))
    lim = float(p[:, 0].max())
    norm = mcolors.LogNorm(vmin=max(float(v.min()), 1e-12), vmax=float(v.max())) if log else None
    image = ax.imshow(v.reshape(n, n), origin="lower", extent=(-lim, lim, -lim, lim), cmap=cmap, norm=norm,
                      interpolation="nearest")
    frame(ax, title, lim)
    return image


def arrows(ax, x, v, color="C3", length=None, max_points=300):
    """Arrows from points x along v, to scale (x + v is the tip), or all `length` long (directions only)."""
    x, v = as_numpy(x)[:max_points], as_numpy(v)[:max_points]
    if length is not None:
        v = length * v / (np.linalg.norm(v, axis=1, keepdims=True) + 1e-12)
    ax.quiver(x[:, 0], x[:, 1], v[:, 0], v[:, 1], angles="xy", scale_units="xy", scale=1,
              color=color, width=0.005, headwidth=3, headlength=3.5)


def zoom_inset(ax, x, half=0.5, bounds=(0.52, 0.52, 0.46, 0.46)):
    """An inset in ax's upper right showing the samples x [N, 2] within `half` of their median, as bigger dots, and a
    box on ax where it looks: for a collapsed cloud too small to see at the full view."""
    x = as_numpy(x)
    centre = np.median(x, axis=0)
    inset = ax.inset_axes(bounds)
    inset.scatter(x[:, 0], x[:, 1], s=2, c="C0", alpha=0.5, linewidths=0, rasterized=True)
    inset.set(xlim=(centre[0] - half, centre[0] + half), ylim=(centre[1] - half, centre[1] + half), aspect="equal",
              xticks=[], yticks=[])
    inset.text(0.5, 0.03, f"zoom x{ax.get_xlim()[1] / half:.0f}", transform=inset.transAxes, ha="center", va="bottom",
               fontsize=7)
    ax.indicate_inset_zoom(inset, edgecolor="0.3")
    return inset


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
    """A Markdown table from {row name: {column: value}}: every row's columns, '-' where a row has none."""
    columns = list(dict.fromkeys(c for row in rows.values() for c in row))
    lines = ["| | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, row in rows.items():
        values = [row.get(c) for c in columns]
        cells = [f"{v:.{digits}g}" if isinstance(v, float) else "-" if v is None else str(v) for v in values]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def source(*functions):
    """The code of functions, without their docstrings, as a Markdown block: a notebook shows the package's lines."""
    import inspect

    from IPython.display import Markdown

    blocks = []
    for f in functions:
        code = inspect.getsource(f)
        if f.__doc__:
            head, _, rest = code.partition('"""')
            code = head.rstrip(" ") + rest.partition('"""')[2].lstrip("\n")   # drop the docstring and its line
        blocks.append(code.rstrip())
    return Markdown("```python\n" + "\n\n".join(blocks) + "\n```")


def density_ratio(axes, real, fake, x, sigma, lim=4.0, num_arrows=40):
    """One noise level of a 1D DMD picture, on two axes (a column): top p_real,sigma and p_fake,sigma; bottom
    log(p_real,sigma / p_fake,sigma) with the samples x [N, 1] on it, each with an arrow along s_real - s_fake
    there. real and fake are gaussian.GaussianMixtureDenoisers (their log_prob is exact); one arrow scale per call."""
    from .denoiser import score   # here: the other notebooks import viz without the denoisers

    u = torch.linspace(-lim, lim, 400)[:, None]                                   # [400, 1]
    log_real, log_fake = real.log_prob(u, sigma), fake.log_prob(u, sigma)        # [400]
    top, bottom = axes
    top.plot(u[:, 0], log_real.exp(), color="C1", label="p_real,sigma (data)")
    top.plot(u[:, 0], log_fake.exp(), color="C0", label="p_fake,sigma (generator)")
    top.set(title=f"sigma = {sigma:g}", xlim=(-lim, lim), yticks=[])
    ratio = as_numpy(log_real - log_fake)
    bottom.plot(u[:, 0], ratio, color="k", linewidth=1)
    bottom.axhline(0, color="0.7", linewidth=0.8)
    x = torch.as_tensor(x).float()[:num_arrows]                                  # [n, 1]
    push = as_numpy(score(real, x, sigma) - score(fake, x, sigma))[:, 0]         # s_real - s_fake at x
    height = as_numpy(real.log_prob(x, sigma) - fake.log_prob(x, sigma))
    length = 0.12 * 2 * lim * push / (np.abs(push).max() + 1e-12)                # the longest: 12% of the width
    bottom.quiver(as_numpy(x)[:, 0], height, length, np.zeros_like(length), angles="xy", scale_units="xy", scale=1,
                  color="C3", width=0.008, headwidth=3.5, headlength=4, zorder=3)
    bottom.plot(as_numpy(x)[:, 0], height, "|", color="C0", markersize=8, zorder=4)
    low = min(float(height.min()), float(ratio.min()))
    bottom.set(xlim=(-lim, lim), ylim=(low - 0.1 * (float(ratio.max()) - low), float(ratio.max()) + 0.5), xlabel="x",
               ylabel="log p_real,sigma / p_fake,sigma" if bottom.get_subplotspec().is_first_col() else None)


# --- The DMD gradient, drawn (tutorial 03) ------------------------------------------------------------------


@torch.no_grad()
def dmd_fields(teacher, fake_score, x, sigma, lim=5.0, n=41, num_noise=16):
    """What one DMD step sees at noise level sigma, as numpy arrays for `score_rows` and `training_strip`.

    grid [n * n, 2] over [-lim, lim]^2 with s_real, s_fake [n * n, 2] there (denoiser.score); x [N, 2], the
    samples, with update [N, 2] = -grad (dmd_loss.dmd_gradient, Eq. 7-8) averaged over num_noise draws of
    the noise n: the direction in which L_DM moves each sample.
    """
    from .denoiser import score              # here: the other notebooks import viz without training anything
    from .dmd_loss import dmd_gradient

    grid = grid_points(lim, n)
    x = torch.as_tensor(x).float()
    x_rep = x.repeat(num_noise, 1)                                               # [K * N, 2]
    with torch.random.fork_rng(devices=[]):    # the same noise on every call; the caller's random stream untouched
        torch.manual_seed(0)
        grad = dmd_gradient(x_rep, torch.full((len(x_rep),), float(sigma)), teacher, fake_score)
    update = -grad.reshape(num_noise, len(x), 2).mean(0)                         # [N, 2]
    return dict(sigma=float(sigma), grid=as_numpy(grid), s_real=as_numpy(score(teacher, grid, sigma)),
                s_fake=as_numpy(score(fake_score, grid, sigma)), x=as_numpy(x), update=as_numpy(update))


def shared_levels(grid, fields, inside=4.5, num=8):
    """One colour scale for several fields on the same grid [M, 2]: num + 1 contour levels from 0 to the 99th
    percentile of their magnitudes within [-inside, inside]^2 (where the data is), square-root spaced."""
    mask = (np.abs(as_numpy(grid)) <= inside).all(1)
    magnitude = np.concatenate([np.linalg.norm(as_numpy(f)[mask], axis=1) for f in fields])
    return float(np.percentile(magnitude, 99) + 1e-12) * np.linspace(0, 1, num + 1) ** 2


def score_map(ax, grid, vectors, levels, title=None, cmap="Blues"):
    """A field on grid_points as its magnitude (filled contours at `levels`) under its streamlines."""
    import matplotlib.colors as mcolors

    p, v = as_numpy(grid), as_numpy(vectors)
    n = math.isqrt(len(p))
    ticks = p[:n, 0]                                                             # grid_points: x varies fastest
    U, V = v[:, 0].reshape(n, n), v[:, 1].reshape(n, n)                          # [n, n], rows are y
    norm = mcolors.BoundaryNorm(levels, 256, extend="max")                       # evenly spaced colours per band
    bands = ax.contourf(ticks, ticks, np.hypot(U, V), levels=levels, cmap=cmap, norm=norm, extend="max")
    ax.streamplot(ticks, ticks, U, V, color="0.45", linewidth=0.5, density=0.7, arrowsize=0.6)
    frame(ax, title, lim=float(ticks[-1]))
    return bands


ARROWS = 150   # samples that get an update arrow (all get a dot)


def update_size(updates, q=90):
    """The q-th percentile of the lengths of the updates that get arrows, over one or more [N, 2] arrays."""
    lengths = [np.linalg.norm(as_numpy(u)[:ARROWS], axis=1) for u in updates]
    return float(np.percentile(np.concatenate(lengths), q)) + 1e-12


def samples_with_updates(ax, x, update, size=None, length=0.8, key=True):
    """The first ARROWS samples as black dots, each with its update as a red arrow: an update `size` long
    (default: their 90th percentile) is drawn `length` long, as a key under the panel shows. Returns the quiver."""
    x, update = as_numpy(x)[:ARROWS], as_numpy(update)[:ARROWS]
    size = size or update_size([update])
    arrow = update * (length / size)                                             # in the panel's units
    norm = np.linalg.norm(arrow, axis=1, keepdims=True) + 1e-12
    arrow = arrow * np.minimum(1, 2 * length / norm)                             # cut at twice the key's length
    lim = ax.get_xlim()[1]                                                       # the caller framed the panel
    safe = np.where(arrow != 0, arrow, 1)
    inside = np.min(np.where(arrow != 0, (np.sign(arrow) * lim - x) / safe, 1), axis=1)   # fraction to the edge
    arrow = arrow * np.clip(inside, 0, 1)[:, None]                               # and at the panel's edge
    q = ax.quiver(x[:, 0], x[:, 1], arrow[:, 0], arrow[:, 1], angles="xy", scale_units="xy",
                  scale=1, color="C3", width=0.007, headwidth=3.5, headlength=4, zorder=4)
    ax.scatter(x[:, 0], x[:, 1], s=9, c="k", edgecolors="white", linewidths=0.4, zorder=5)
    if key:
        key = float(f"{size:.1g}")                                               # a round length near `size`
        ax.quiverkey(q, 0.62, -0.05, key * length / size, f"update {key:g}", labelpos="E",
                     fontproperties=dict(size=8))
    return q


LEGEND = ("orange +: the data's modes    black dots: the generator's samples x = G(z)\n"
          "red arrows: each sample's DMD update -grad = w (mu_real - mu_fake), averaged over the noise "
          "(scale: the key; cut at twice its length)\n"
          "colour: the length of the field drawn, one scale per row    grey lines: the field's streamlines")


def _figure(width, row_height, rows, legend):
    """A figure of `rows` subfigures under a header holding the legend."""
    fig = plt.figure(figsize=(width, row_height * rows + 0.65), dpi=DPI)
    header, body = fig.subfigures(2, 1, height_ratios=[0.65, row_height * rows])
    header.text(0.01, 0.1, legend, fontsize=9, ha="left", va="bottom")
    return fig, body.subfigures(rows, 1, squeeze=False)[:, 0]


def _panel_row(subfig, n, caption):
    """n square panels and a thin colour-bar axes in one subfigure, with the caption (wrapped) under them."""
    import textwrap

    axes = subfig.subplots(1, n + 1, gridspec_kw=dict(width_ratios=[1] * n + [0.06]))
    subfig.subplots_adjust(left=0.01, right=0.99 - 0.2 / n, top=0.9, bottom=0.2 if caption else 0.02, wspace=0.06)
    if caption:
        subfig.text(0.02, 0.01, textwrap.fill(caption, 140), fontsize=9, ha="left", va="bottom")
    return axes[:-1], axes[-1]


def score_rows(rows, centers, captions=None, size=3.0):
    """One row per noise level (each from dmd_fields): the real score, the fake score, and s_real - s_fake with
    the samples and their updates; a row's three panels share one colour scale (|score|), its caption below."""
    fig, subfigs = _figure(3 * size + 0.7, size + 0.75, len(rows), LEGEND)
    c = as_numpy(centers)
    for subfig, f, caption in zip(subfigs, rows, captions or [None] * len(rows)):
        (real, fake, difference), cax = _panel_row(subfig, 3, caption)
        diff = f["s_real"] - f["s_fake"]
        levels = shared_levels(f["grid"], [f["s_real"], f["s_fake"], diff])
        image = score_map(real, f["grid"], f["s_real"], levels, f"real score s_real (teacher), sigma = {f['sigma']:g}")
        real.scatter(c[:, 0], c[:, 1], marker="+", s=30, c="C1", linewidths=1.2, zorder=3)
        score_map(fake, f["grid"], f["s_fake"], levels, "fake score s_fake, with the samples")
        fake.scatter(f["x"][:, 0], f["x"][:, 1], s=2, c="k", linewidths=0, alpha=0.6, zorder=3, rasterized=True)
        score_map(difference, f["grid"], diff, levels, "s_real - s_fake; update at samples")
        samples_with_updates(difference, f["x"], f["update"])
        subfig.colorbar(image, cax=cax, label="|score|", format="%.2g")
    return fig


def training_strip(snapshots, centers, captions=None, size=2.4):
    """The generator and its fake score over training, one column per snapshot {step, fields} (fields from
    dmd_fields, all at one sigma). Top: the samples and the fake score s_fake; bottom: s_real - s_fake with
    the samples' updates. Each row has one colour scale, and the arrows one length scale, across the steps."""
    legend = LEGEND.replace("one scale per row", "one scale per row, across the steps")
    fig, (top, bottom) = _figure(len(snapshots) * size + 0.6, size + 0.75, 2, legend)
    captions = captions or [None, None]
    fields = [s["fields"] for s in snapshots]
    grid, c = fields[0]["grid"], as_numpy(centers)

    axes, cax = _panel_row(top, len(snapshots), captions[0])
    levels = shared_levels(grid, [f["s_fake"] for f in fields])
    for ax, snap, f in zip(axes, snapshots, fields):
        image = score_map(ax, grid, f["s_fake"], levels, f"step {snap['step']}: s_fake, sigma = {f['sigma']:g}")
        ax.scatter(f["x"][:, 0], f["x"][:, 1], s=1.5, c="k", linewidths=0, alpha=0.6, zorder=3, rasterized=True)
        ax.scatter(c[:, 0], c[:, 1], marker="+", s=25, c="C1", linewidths=1.0, zorder=4)
    top.colorbar(image, cax=cax, label="|score|", format="%.2g")

    axes, cax = _panel_row(bottom, len(snapshots), captions[1])
    diffs = [f["s_real"] - f["s_fake"] for f in fields]
    levels, arrow_size = shared_levels(grid, diffs), update_size([f["update"] for f in fields])
    for ax, snap, f, diff in zip(axes, snapshots, fields, diffs):
        image = score_map(ax, grid, diff, levels, f"step {snap['step']}: s_real - s_fake")
        samples_with_updates(ax, f["x"], f["update"], arrow_size, length=0.6, key=ax is axes[-1])
    bottom.colorbar(image, cax=cax, label="|score|", format="%.2g")
    return fig


# --- The DMD gradient of one image (tutorial 05) ---------------------------------------------------------


def _show_image(ax, image, title, value_range=(-1, 1)):
    """One image [C, H, W] (grey or RGB) with `value_range` mapped to black..white."""
    lo, hi = value_range
    image = ((as_numpy(image) - lo) / (hi - lo)).clip(0, 1).transpose(1, 2, 0)    # [H, W, C]
    ax.imshow(image[..., 0] if image.shape[2] == 1 else image, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set(xticks=[], yticks=[])
    ax.set_title(title, fontsize=9)


def dmd_image_rows(x, sigma, terms, mean_grad=None, size=1.7):
    """The DMD update of one image x [C, H, W], one row per noise level sigma [rows]: terms are dmd_loss.dmd_terms
    of x repeated once per row at those sigmas; mean_grad [rows, C, H, W] (optional) its grad averaged over many
    draws of the noise. x (first row), x_t (scaled to its own range), mu_real and mu_fake in grey; the step L_DM
    takes, -grad = w (mu_real - mu_fake) (the channels' mean), on a diverging scale symmetric about 0 (red: the
    pixel is made brighter), one for all rows (another for mean_grad)."""
    grads = [-as_numpy(g).mean(1) for g in (terms["grad"], mean_grad) if g is not None]   # [rows, H, W] each
    ratios = [1] * 4 + [1, 0.08] * len(grads)                                     # the grads with their colour bars
    fig, axes = plt.subplots(len(sigma), len(ratios), figsize=(sum(ratios) * size + 0.6, size * len(sigma)), dpi=DPI,
                             squeeze=False, gridspec_kw=dict(width_ratios=ratios))
    for row, s in enumerate(as_numpy(sigma)):
        a, x_t = axes[row], terms["x_t"][row]
        if row == 0:
            _show_image(a[0], x, "x = G(z)")
        else:
            a[0].axis("off")
        _show_image(a[1], x_t, f"x_t, sigma = {s:g}", (float(x_t.min()), float(x_t.max())))
        _show_image(a[2], terms["mu_real"][row], "mu_real (teacher)")
        _show_image(a[3], terms["mu_fake"][row], "mu_fake (fake score)")
        titles = (f"-grad, w = {float(terms['w'][row]):.3g}", "-grad, mean over n")
        for k, (grad, title) in enumerate(zip(grads, titles)):
            ax, cax, limit = a[4 + 2 * k], a[5 + 2 * k], float(np.abs(grad).max()) + 1e-12
            image = ax.imshow(grad[row], cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest")
            ax.set(xticks=[], yticks=[])
            ax.set_title(title, fontsize=9)
            fig.colorbar(image, cax=cax)
    fig.tight_layout()
    return fig


def small_png(fig, colors=128):
    """fig as a PNG of `colors` palette colours, for a notebook to show, and closed: about a quarter of the bytes
    of matplotlib's own PNG for the dense figures above, so the committed notebooks stay small."""
    import io

    from IPython.display import Image
    from PIL import Image as PILImage

    rendered, small = io.BytesIO(), io.BytesIO()
    fig.savefig(rendered, format="png", bbox_inches="tight")
    plt.close(fig)
    rgb = PILImage.open(rendered).convert("RGB")
    palette = rgb.quantize(colors, method=PILImage.Quantize.MEDIANCUT, dither=PILImage.Dither.NONE)
    palette.save(small, "png", optimize=True)
    return Image(small.getvalue())
