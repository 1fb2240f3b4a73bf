"""Distribution Matching Distillation losses: distribution matching, fake score, regression.

Yin et al., "One-step Diffusion with Distribution Matching Distillation", arXiv 2311.18828.
The generator follows the gradient of KL(p_fake || p_real) between the diffused output and data
distributions (§3.2, Eq. 7): s_real - s_fake, estimated with the frozen teacher (real score) and a
fake score trained online on the generator's own samples (Eq. 6), plus a regression loss to the
teacher's noise -> image pairs (§3.3, Eq. 9). Each loss is a function returning a tensor.
"""
import os
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from .denoiser import append_dims, denoising_loss
from .sampler import karras_sigmas
from .utils import DMDError, file_lock, reason


VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"   # what torchvision's VGG16 fetches for LPIPS


def sigma_levels(num_levels=1000, sigma_min=0.002, sigma_max=80.0, rho=7.0, device=None):
    """The discrete noise grid [num_levels], ascending: index 0 is sigma_min, the last sigma_max."""
    return karras_sigmas(num_levels, sigma_min, sigma_max, rho, device)[:-1].flip(0).float()


def draw_sigmas(levels, batch_size, lo=0, hi=None):
    """One sigma per sample [B], uniform over the grid indices lo..hi (inclusive)."""
    hi = len(levels) - 1 if hi is None else hi
    index = torch.randint(lo, hi + 1, (batch_size,), device=levels.device)
    return levels[index]


@torch.no_grad()
def dmd_terms(x, sigma, teacher, fake_score, class_labels=None, real_score_only=False, noise=None):
    """What one DMD update direction is made of (DMD Eq. 7-8, Algorithm 2): dict(x_t, mu_real, mu_fake [B, ...],
    w [B], grad [B, ...]), in fp32. dmd_gradient returns grad; the tutorials draw the rest.

    x_t = x + sigma n, mu = D(x_t; sigma) of the teacher (real) and the fake score, grad = w (mu_fake - mu_real).
    Since s = (mu - x_t) / sigma^2, grad is proportional to s_fake - s_real, so x - grad moves x towards
    "more real, less fake". w = 1 / mean|x - mu_real| (per sample) normalises the gradient's size across sigmas.
    real_score_only: mu_fake = x, so grad = w (x - mu_real) follows the real score alone (the paper's Fig. 3
    ablation, which collapses onto the nearest mode). noise: n [B, ...] drawn beforehand (default: drawn here).
    """
    x = x.float()
    x_t = x + append_dims(sigma, x.ndim) * (torch.randn_like(x) if noise is None else noise)
    mu_real = teacher(x_t, sigma, class_labels)
    mu_fake = x if real_score_only else fake_score(x_t, sigma, class_labels)
    w = 1 / ((x - mu_real).abs().flatten(1).mean(1) + 1e-8)          # [B]   Eq. 8
    grad = torch.nan_to_num(append_dims(w, x.ndim) * (mu_fake - mu_real))
    return dict(x_t=x_t, mu_real=mu_real, mu_fake=mu_fake, w=w, grad=grad)


def dmd_gradient(x, sigma, teacher, fake_score, class_labels=None, real_score_only=False, noise=None):
    """The per-sample DMD update direction grad = w (mu_fake - mu_real) [B, ...] (DMD Eq. 7-8; see dmd_terms)."""
    return dmd_terms(x, sigma, teacher, fake_score, class_labels, real_score_only, noise)["grad"]


def distribution_matching_loss(x, grad):
    """0.5 mean((x - sg(x - grad))^2): its gradient with respect to x is grad / x.numel().

    The stop-gradient target turns the score difference, which is not the gradient of any loss we
    can write down, into one autograd carries back through the generator.
    """
    target = (x.float() - grad).detach()
    return 0.5 * F.mse_loss(x.float(), target)


def fake_score_loss(fake_score, x, sigma, class_labels=None, noise=None):
    """The fake score's denoising loss on detached generator samples (Eq. 6), at sigma [B]: uniform over the
    grid, draw_sigmas(levels, B)."""
    return denoising_loss(fake_score, x.detach().float(), sigma, class_labels, noise).mean()


def regression_loss(x, y, lpips=None, resolution=224):
    """Regression of G(z_pair) onto the teacher's ODE output y (Eq. 9): LPIPS for images, else MSE.

    LPIPS sees both images, in [-1, 1], upsampled bilinearly to resolution x resolution (DMD §3.3: 224);
    VGG takes RGB, so a gray channel is repeated three times.
    """
    if lpips is None:
        return F.mse_loss(x.float(), y.float())
    size = (resolution, resolution)
    x, y = (F.interpolate(t.float(), size=size, mode="bilinear", align_corners=False) for t in (x, y))
    x, y = (t.expand(-1, 3, -1, -1) if t.shape[1] == 1 else t for t in (x, y))   # [B, 3, size, size]
    return lpips(x, y).mean()


def lpips_vgg(device="cpu", pooling="avg", random_vgg=False):
    """LPIPS with the VGG16 backbone (Zhang et al. 2018, arXiv 1801.03924), frozen and in eval mode.

    pooling="avg" (as DMD used it): DMD (Appendix B) takes PIQ's LPIPS "following Consistency Models", whose
    code (github.com/openai/consistency_models, cm/karras_diffusion.py) builds piq.LPIPS(replace_pooling=True):
    PIQ replaces each of VGG16's 2x2 max poolings by a 2x2 average pooling (piq/perceptual.py,
    ContentLoss.replace_pooling). "max": the original LPIPS. The linear heads and their weights are the
    lpips package's, which PIQ's match. torchvision downloads VGG16's ImageNet weights into torch.hub's
    cache on first use, which fails without internet: then a one-line error says where to put the file.
    It runs in fp32: lpips normalises features with eps 1e-10, zero in fp16. random_vgg: VGG16 with random
    weights (no download; the same cost, for timing a run, not for training one).
    """
    if pooling not in ("avg", "max"):
        raise DMDError(f"LPIPS pooling must be avg or max, not {pooling!r}")
    import lpips   # here: importing it (and torchvision's models) takes seconds, and toy runs never need it
    folder = os.path.join(torch.hub.get_dir(), "checkpoints")
    try:   # under the lock, one process (of torchrun's) downloads VGG16 while the others wait for it
        with file_lock(os.path.join(folder, os.path.basename(VGG16_URL) + ".lock")), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)   # lpips 0.1.4 passes torchvision's deprecated pretrained=True
            net = lpips.LPIPS(net="vgg", pnet_rand=random_vgg, verbose=False)
    except (OSError, RuntimeError) as e:   # no internet (urllib's errors are OSErrors), or a corrupt file
        raise DMDError(f"cannot load LPIPS's VGG16 weights ({reason(e)}): put {VGG16_URL} into {folder}/, "
                       f"or use --regression-loss l2") from None
    if pooling == "avg":
        for stage in net.net.children():   # lpips's VGG16: five nn.Sequential slices, a max pooling opening slices 2-5
            for name, layer in stage.named_children():
                if isinstance(layer, nn.MaxPool2d):
                    setattr(stage, name, nn.AvgPool2d(kernel_size=2, stride=2))
    return net.to(device).eval().requires_grad_(False)
