"""The EDM denoiser: preconditioning around a raw network, and its training loss.

Karras et al., "Elucidating the Design Space of Diffusion-Based Generative Models",
arXiv 2206.00364, Table 1 and §5. Every model in dmd_minimal (teacher, fake score, generator)
is a denoiser D(x; sigma) that predicts the clean sample from x_t = x + sigma * n, and the score
of the noisy distribution follows from it: s(x; sigma) = (D(x; sigma) - x) / sigma^2.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


def append_dims(t, ndim):
    """Append trailing singleton dims so a per-sample [B] tensor broadcasts against [B, ...]."""
    return t.reshape(t.shape + (1,) * (ndim - t.ndim))


def as_sigma(sigma, x):
    """Any sigma (float, 0-d tensor or [B]) as a float32 tensor of shape [B] on x's device."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
    return sigma.reshape(-1).expand(x.shape[0])


class Denoiser(nn.Module):
    """D(x; sigma, class) = c_skip x + c_out F(c_in x; c_noise, class)   (EDM Table 1)."""

    def __init__(self, backbone, sigma_data=0.5, label_dim=0):
        super().__init__()
        self.backbone = backbone      # raw network F(x_in, c_noise, class_labels)
        self.sigma_data = sigma_data  # std of the data: 0.5 for images in [-1, 1]
        self.label_dim = label_dim    # number of classes (0: unconditional)
        self.amp_dtype = None         # torch.bfloat16 / float16: autocast around F only

    def class_vector(self, class_labels, batch_size, device):
        """One-hot [B, label_dim] from integer labels [B], a zero vector when none given (EDM)."""
        if self.label_dim == 0:
            return None
        if class_labels is None:
            return torch.zeros(batch_size, self.label_dim, device=device)
        if not class_labels.is_floating_point():
            return F.one_hot(class_labels.long(), self.label_dim).float()
        if class_labels.shape[-1] != self.label_dim:
            raise ValueError(f"class_labels have {class_labels.shape[-1]} entries per sample, "
                             f"but this network has label_dim {self.label_dim}")
        return class_labels.float()

    def forward(self, x, sigma, class_labels=None, **backbone_kwargs):
        x = x.float()
        sigma = append_dims(as_sigma(sigma, x), x.ndim)         # [B, 1, ...]
        c_skip = self.sigma_data**2 / (sigma**2 + self.sigma_data**2)
        c_out = sigma * self.sigma_data / (sigma**2 + self.sigma_data**2).sqrt()
        c_in = 1 / (self.sigma_data**2 + sigma**2).sqrt()
        c_noise = sigma.log().flatten() / 4                       # [B]
        labels = self.class_vector(class_labels, x.shape[0], x.device)
        with torch.autocast(x.device.type, self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None):
            F_x = self.backbone(c_in * x, c_noise, labels, **backbone_kwargs)
        D_x = c_skip * x + c_out * F_x.float()
        return D_x


def score(denoiser, x, sigma, class_labels=None):
    """Score of the noisy distribution: s(x; sigma) = (D(x; sigma) - x) / sigma^2."""
    sigma = append_dims(as_sigma(sigma, x), x.ndim)
    return (denoiser(x, sigma.flatten(), class_labels) - x) / sigma**2


def denoising_loss(denoiser, x, sigma, class_labels=None, noise=None):
    """Per-sample EDM loss lambda(sigma) |D(x + sigma n; sigma) - x|^2, averaged over dims.

    lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 = 1/sigma^2 + 1/sigma_data^2,
    which makes the loss unit-scale at every sigma (EDM §5). Shared by the teacher's training
    and DMD's fake-score update (DMD Eq. 6), which differ only in how sigma is drawn.
    noise: n [B, ...] drawn beforehand (default: drawn here).
    """
    sigma = append_dims(sigma, x.ndim)
    weight = 1 / sigma**2 + 1 / denoiser.sigma_data**2
    x_t = x + sigma * (torch.randn_like(x) if noise is None else noise)
    D_x = denoiser(x_t, sigma.flatten(), class_labels)
    return (weight * (D_x - x) ** 2).flatten(1).mean(1)   # [B]


def edm_loss(denoiser, x, class_labels=None, P_mean=-1.2, P_std=1.2):
    """EDM training loss, ln(sigma) ~ N(P_mean, P_std^2)   (EDM Table 1, "Training")."""
    sigma = (P_mean + P_std * torch.randn(x.shape[0], device=x.device)).exp()
    return denoising_loss(denoiser, x, sigma, class_labels).mean()
