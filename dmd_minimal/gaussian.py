"""Exact denoisers for Gaussian data, in closed form at every sigma (DMD.md §9).

If x ~ N(c, S) and x_t = x + sigma n, then x_t ~ N(c, S + sigma^2 I) and
E[x | x_t] = c + S (S + sigma^2 I)^-1 (x_t - c). A mixture's denoiser is the mix of its
components' posterior means, weighted by each component's responsibility for x_t. These give an
exact "real score" (and, for a Gaussian generator, an exact "fake score") with the same contract
D(x, sigma, class_labels=None) as a trained network.
"""
import torch
import torch.nn as nn

from .denoiser import append_dims, as_sigma


class GaussianMixtureDenoiser(nn.Module):
    """Mixture of isotropic Gaussians N(c_k, s^2 I) with weights pi_k, for x of any shape."""

    label_dim = 0   # unconditional, like a Denoiser without classes

    def __init__(self, centers, std, weights=None):
        super().__init__()
        centers = torch.as_tensor(centers, dtype=torch.float32)     # [K, *sample_shape]
        weights = torch.full((len(centers),), 1 / len(centers)) if weights is None else torch.as_tensor(weights)
        self.register_buffer("centers", centers)
        self.register_buffer("log_weights", weights.float().log())  # [K]
        self.std = float(std)

    def forward(self, x, sigma, class_labels=None):
        x = x.float()
        sigma = as_sigma(sigma, x)                                   # [B]
        var_t = self.std**2 + sigma**2                               # [B] variance of x_t per component
        diff = x.flatten(1)[:, None, :] - self.centers.flatten(1)[None]   # [B, K, d]
        log_lik = -0.5 * diff.pow(2).sum(-1) / var_t[:, None]       # [B, K] (shared constants dropped)
        r = torch.softmax(log_lik + self.log_weights, dim=1)         # [B, K] responsibilities
        shrink = self.std**2 / var_t                                 # [B] S (S + sigma^2 I)^-1
        posterior = self.centers.flatten(1)[None] + shrink[:, None, None] * diff   # [B, K, d]
        return (r[:, :, None] * posterior).sum(1).reshape(x.shape)

    def log_prob(self, x, sigma):
        """log p_sigma(x) [B] of the noised mixture, whose components are N(c_k, (s^2 + sigma^2) I)."""
        x = x.float()
        sigma = as_sigma(sigma, x)                                   # [B]
        var_t = self.std**2 + sigma**2                               # [B]
        diff = x.flatten(1)[:, None, :] - self.centers.flatten(1)[None]   # [B, K, d]
        dims = diff.shape[-1]
        log_normal = -0.5 * diff.pow(2).sum(-1) / var_t[:, None] - 0.5 * dims * torch.log(2 * torch.pi * var_t)[:, None]
        return torch.logsumexp(log_normal + self.log_weights, dim=1)

    def sample(self, n, generator=None):
        k = torch.multinomial(self.log_weights.exp(), n, replacement=True, generator=generator)
        noise = torch.randn((n,) + self.centers.shape[1:], generator=generator)
        return self.centers[k] + self.std * noise


class GaussianDenoiser(nn.Module):
    """A single Gaussian N(mean, cov) with full covariance, for flat x of shape [B, d]."""

    label_dim = 0

    def __init__(self, mean, cov):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))   # [d]
        self.register_buffer("cov", torch.as_tensor(cov, dtype=torch.float32))     # [d, d]

    def forward(self, x, sigma, class_labels=None):
        x = x.float()
        sigma = as_sigma(sigma, x)
        eye = torch.eye(len(self.mean), device=x.device)
        cov_t = self.cov + append_dims(sigma**2, 3) * eye            # [B, d, d] S + sigma^2 I
        gain = self.cov @ torch.linalg.inv(cov_t)                    # [B, d, d] S (S + sigma^2 I)^-1
        return self.mean + (gain @ (x - self.mean)[:, :, None]).squeeze(-1)


def isotropic_gaussian(dim, mean=0.0, std=1.0):
    """N(mean, std^2 I) in `dim` dimensions as a (one-component) mixture denoiser."""
    return GaussianMixtureDenoiser(torch.full((1, dim), float(mean)), std)

