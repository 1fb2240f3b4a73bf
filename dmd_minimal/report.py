"""What a run shows: image grids from fixed noise while it trains, the toy2d report when it ends.

Every grid of a run uses the same noise z and labels, so successive grids show the same samples improving,
next to what the teacher's ODE makes from that noise.
"""
import json

import numpy as np
import torch

from .dmd_loss import dmd_gradient, draw_sigmas, sigma_levels
from .metrics import toy_metrics
from .networks import sample_shape
from .pairs import heun_sampler
from .plots import image_grid, loss_curves, sample_panels, scatter_panels
from .sampler import sample_ode
from .toy2d import sample_toy
from .utils import atomic_write, per_index_noise


def grid_noise(num, shape, label_dim, seed, device):
    """The fixed z [num, *shape] and labels (every class in turn, None if unconditional) of a run's grids."""
    z = per_index_noise(range(num), shape, seed, device)
    labels = torch.arange(num, device=device) % label_dim if label_dim else None
    return z, labels


def write_log(out, history):
    """OUT/log.jsonl: one JSON line per record of the run's history, rewritten whole and atomically, so a
    line is never half written and the log holds exactly what a resumed checkpoint holds."""
    lines = "".join(json.dumps(record) + "\n" for record in history)
    atomic_write(out / "log.jsonl", lambda f: f.write(lines.encode()))


@torch.no_grad()
def write_grids(generator, noise, path, teacher=None, teacher_steps=18):
    """The generator's one-step samples from noise (z, labels) as a PNG grid; the teacher's too, once."""
    z, labels = noise
    image_grid(generator(z, labels), path)
    teacher_path = path.parent / "teacher.png"
    if teacher is not None and not teacher_path.exists():
        image_grid(sample_ode(teacher, z, teacher_steps, labels), teacher_path)


@torch.no_grad()
def write_samples(generator, teacher, path, steps=18, seed=0, class_names=None, columns=8):
    """samples.png: one-step samples beside the teacher's Heun samples from the same noise, a row per class
    (the first 10 classes; rows of unlabelled samples without a teacher's label_dim)."""
    rows = min(teacher.label_dim, 10) or 4
    device = next(teacher.parameters()).device
    z = per_index_noise(range(rows * columns), sample_shape(teacher), seed, device)           # [rows * columns, ...]
    labels = torch.arange(rows, device=device).repeat_interleave(columns) if teacher.label_dim else None
    names = [class_names[k] if class_names else f"class {k}" for k in range(rows)] if teacher.label_dim \
        else [""] * rows
    sample_panels({"one-step generator (1 NFE)": generator(z, labels),
                   f"teacher, Heun {steps} steps ({2 * steps - 1} NFE)": sample_ode(teacher, z, steps, labels)},
                  columns, names, path)


def copying_distance(x, y):
    """Mean Euclidean distance |x_i - y_i| between generator outputs x [N, ...] and the teacher's ODE outputs y."""
    return float((x - y).flatten(1).norm(dim=1).mean())


@torch.no_grad()
def copying(generator, teacher, z, sampler, pairs=None, num=10000):
    """How far G follows the teacher's noise -> sample map, not only its distribution: the copying distance
    on held-out noise z (to the teacher's ODE with the pairs' sampler, pairs.heun_sampler) and on the first
    `num` training pairs (None without pairs). Memorised pairs show as a small distance on the pairs only."""
    held_out = copying_distance(generator(z), sample_ode(teacher, z, **sampler))
    if pairs is None:
        return dict(copy_heldout=held_out, copy_pairs=None)
    i = torch.arange(min(num, len(pairs["z"])))
    z_pair, y = pairs["z"][i].to(z.device), pairs["y"][i].to(z.device)
    return dict(copy_heldout=held_out, copy_pairs=copying_distance(generator(z_pair), y))


PUSH_LEVELS = {"small sigma": (20, 500), "large sigma": (500, 980)}   # grid indices: sigma 0.003-2.5, 2.5-72


@torch.no_grad()
def expected_push(generator, teacher, fake_score, z, draws=256):
    """Does the DMD update pull the generator's samples x = G(z) together or push them apart?

    E_n[grad | z], the update of each sample averaged over `draws` noise draws n of x_t = x + sigma n,
    fitted as slope * (x - centre) around the samples' centre, at small and at large noise levels
    (PUSH_LEVELS: only the large ones see far-away modes). x - grad is the step, so slope > 0 pulls the
    samples together and slope < 0 spreads them. At a point mass every x is the same, the update differs
    between samples through n alone, and its mean cannot split the point: the slope times the spread is
    what could. Returns the samples' spread (root mean square distance from the centre) and, per level
    range, the size of the mean push and the slope.
    """
    x = generator(z)                                                             # [Z, ...]
    offset = (x - x.mean(0)).flatten(1)                                          # [Z, d]
    result = dict(sample_std=float(offset.pow(2).sum(1).mean().sqrt()))
    levels = sigma_levels(device=x.device)
    for name, (lo, hi) in PUSH_LEVELS.items():
        x_rep = x.repeat_interleave(draws, 0)                                    # [Z * draws, ...]
        grad = dmd_gradient(x_rep, draw_sigmas(levels, len(x_rep), lo, hi), teacher, fake_score)
        per_z = grad.view(len(x), draws, -1).mean(1)                             # [Z, d]
        result[f"mean push, {name}"] = float(per_z.mean(0).norm())
        result[f"slope, {name}"] = float(((per_z - per_z.mean(0)) * offset).sum() / offset.pow(2).sum())
    return result


@torch.no_grad()
def report_toy(cfg, nets, history, out, pairs=None):
    """samples.npz, metrics.json and the pictures, all from the same fixed noise z (pairs: for the copying distance)."""
    z = torch.randn(cfg.num_eval, 2, generator=torch.Generator().manual_seed(cfg.seed + 1)).to(cfg.device)
    samples = {
        "teacher, Heun 18 steps (35 NFE)": sample_ode(nets["teacher"], z, 18).cpu(),
        "teacher, 1 Euler step": sample_ode(nets["teacher"], z, 1, solver="euler").cpu(),
        "one-step generator": nets["generator"](z).cpu(),
    }
    names = dict(zip(samples, ("teacher_heun18", "teacher_euler1", "generator")))
    nfe = dict(teacher_heun18=35, teacher_euler1=1, generator=1)
    metrics = {names[k]: dict(nfe=nfe[names[k]], **toy_metrics(x, cfg.toy, cfg.seed)) for k, x in samples.items()}
    sampler = heun_sampler(cfg.pair_steps, cfg.sigma_min, cfg.sigma_max, cfg.rho)   # the pairs' ODE
    metrics["generator"].update(copying(nets["generator"], nets["teacher"], z, sampler, pairs, cfg.num_eval))
    atomic_write(out / "metrics.json", lambda f: f.write(json.dumps(metrics, indent=2).encode()))
    atomic_write(out / "samples.npz", lambda f: np.savez(f, x=samples["one-step generator"].numpy()))
    data = sample_toy(cfg.toy, cfg.num_eval, torch.Generator().manual_seed(cfg.seed + 2))
    scatter_panels({f"data ({cfg.toy})": data, **samples}, out / "samples.png")
    curves = {k: ([h["step"] for h in history if k in h], [h[k] for h in history if k in h])
              for k in ("loss_dm", "loss_reg", "loss_fake") if any(k in h for h in history)}
    if curves:
        loss_curves(curves, out / "losses.png")
    print_metrics(metrics)
    print(f"wrote {out}/: teacher.pt pairs/ checkpoint.pt log.jsonl samples.npz metrics.json samples.png losses.png")


def print_metrics(metrics):
    """metrics.json as a table; '-' where a row has no such value (copying: the generator only)."""
    columns = list(dict.fromkeys(c for row in metrics.values() for c in row))
    cell = lambda v: f"{'-':>16}" if v is None else f"{v:>16.4g}"   # noqa: E731
    print(f"{'':16}" + "".join(f"{c:>16}" for c in columns))
    for name, row in metrics.items():
        print(f"{name:16}" + "".join(cell(row.get(c)) for c in columns))
