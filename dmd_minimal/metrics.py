"""Sample-quality metrics for toy 2D distributions (DMD.md §9).

Mode metrics as in the GAN mode-collapse literature: a sample is high quality when it lies within
3 std of its nearest mixture centre; a mode is covered when it holds at least 20% of its expected
share of the high-quality samples; the KL between the mode histogram and uniform measures balance.
The energy distance compares any two sample sets, so it also serves the non-mixture shapes.
"""
import torch

from .toy2d import MIXTURE_STD, MIXTURES, mixture_centers, sample_toy


def mode_metrics(x, centers, std=MIXTURE_STD):
    """Modes covered, high-quality share and mode-histogram KL of samples x [N, 2]."""
    x = torch.as_tensor(x, dtype=torch.float32)
    dist, nearest = torch.cdist(x, centers).min(dim=1)                # [N], [N]
    high_quality = dist < 3 * std
    counts = torch.bincount(nearest[high_quality], minlength=len(centers)).float()   # [K]
    n_hq = counts.sum()
    covered = counts >= 0.2 * n_hq / len(centers)
    p = counts / n_hq.clamp(min=1)
    kl = (p * (p * len(centers)).clamp(min=1e-12).log()).sum()       # KL(p || uniform), 0 log 0 = 0
    return {
        "modes": int(covered.sum()) if n_hq > 0 else 0,
        "high_quality": float(high_quality.float().mean()),
        "mode_kl": float(kl) if n_hq > 0 else float("inf"),
    }


def energy_distance(x, y, max_points=4000):
    """Energy distance 2 E|X - Y| - E|X - X'| - E|Y - Y'|: zero iff the distributions are equal."""
    x = torch.as_tensor(x, dtype=torch.float32)[:max_points]
    y = torch.as_tensor(y, dtype=torch.float32)[:max_points]
    n, m = len(x), len(y)
    xy = torch.cdist(x, y).mean()
    xx = torch.cdist(x, x).sum() / (n * (n - 1))                      # diagonal zeros excluded
    yy = torch.cdist(y, y).sum() / (m * (m - 1))
    return float(2 * xy - xx - yy)


def toy_metrics(x, toy, seed=0):
    """All §9 metrics of samples x [N, 2] from the toy distribution `toy`."""
    reference = sample_toy(toy, len(x), torch.Generator().manual_seed(seed + 12345))
    metrics = {"energy_distance": energy_distance(x, reference)}
    if toy in MIXTURES:
        metrics.update(mode_metrics(x, mixture_centers(toy)))
    return metrics
